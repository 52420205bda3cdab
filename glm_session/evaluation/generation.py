"""Answers generated turn by turn from the gold history, through the training template's inference prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from glm_session.data.samples import SegmentEncoder
from glm_session.data.session import Session
from glm_session.data.template import Template, prompt_text
from glm_session.tokenizer import ChatGLM2Tokenizer


@dataclass
class Prompt:
    """The prompt of turn ``turn`` (1-based) of a session: its gold history and question."""

    session_id: str
    session_index: int
    turn: int
    ids: list[int]
    text: str
    reference: str
    dropped_history_turns: int = 0


def build_prompts(
    sessions: Sequence[Session], template: Template, tokenizer: ChatGLM2Tokenizer, max_prompt_tokens: int
) -> list[Prompt]:
    """One prompt per turn of every session; the oldest history turns are dropped until a prompt fits
    ``max_prompt_tokens`` (as the split strategy does); a question that does not fit alone keeps its tail."""
    prompts = []
    for index, session in enumerate(sessions):
        encode = SegmentEncoder(tokenizer)
        for k, turn in enumerate(session.turns):
            for start in range(k + 1):
                segments = template.render_prompt(turn.question, session.turns[start:k], session.system)
                ids = [i for segment in segments for i in encode(segment)]
                if len(ids) <= max_prompt_tokens:
                    break
            if len(ids) > max_prompt_tokens:
                ids = tokenizer.prefix_ids + ids[len(ids) - max_prompt_tokens + len(tokenizer.prefix_ids) :]
            prompts.append(Prompt(session.id, index, k + 1, ids, prompt_text(segments), turn.answer, start))
    return prompts


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    prompts: Sequence[Prompt],
    tokenizer: ChatGLM2Tokenizer,
    batch_size: int = 32,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
) -> list[str]:
    """The decoded answer of every prompt (up to eos), in the order of ``prompts``.

    Prompts are batched by length, left-padded, and generated with the KV cache (``model.generate``).
    """
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    options = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i].ids) for i in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = prompts[i].ids
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )[:, width:]  # (B, new)
        for row, i in enumerate(chunk):
            new = output[row].tolist()
            if tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id)]
            answers[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return answers
