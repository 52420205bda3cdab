"""Answers generated turn by turn from the gold history, through the training template's inference prompt."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from glm_session.data.samples import SegmentEncoder, SessionLayout, shortest_prompt
from glm_session.data.session import Session
from glm_session.data.strategy import prompt_history_start
from glm_session.data.template import Template, prompt_text
from glm_session.errors import ConfigError, check_bool, check_int, check_number
from glm_session.tokenizer import ChatGLM2Tokenizer
from glm_session.training.progress import track


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated (``conf/generation/``); every value is checked when the config is built.

    Args:
        batch_size: prompts generated together (left-padded, KV cache).
        max_new_tokens: the most tokens of an answer; a prompt gets ``data.max_seq_len - max_new_tokens`` tokens.
        do_sample, temperature, top_p: sampling instead of greedy decoding.
        repetition_penalty: > 1 discourages repeating tokens (1.0: plain greedy).
    """

    batch_size: int = 32
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_int("generation.batch_size", self.batch_size, minimum=1)
        check_int("generation.max_new_tokens", self.max_new_tokens, minimum=1)
        check_bool("generation.do_sample", self.do_sample)
        check_number("generation.temperature", self.temperature, 0.0, exclusive=True)
        if check_number("generation.top_p", self.top_p, 0.0, exclusive=True) > 1:
            raise ConfigError("generation.top_p", self.top_p, "a number in (0, 1]")
        check_number("generation.repetition_penalty", self.repetition_penalty, 0.0, exclusive=True)
        for key, value in (("temperature", self.temperature), ("top_p", self.top_p)):
            if not self.do_sample and value != 1.0:  # greedy decoding ignores it, and metrics.json would record it
                raise ConfigError(f"generation.{key}", value, "left at 1.0 without generation.do_sample=true (greedy "
                                  "decoding does not sample)")  # fmt: skip

    def prompt_budget(self, max_seq_len: int) -> int:
        """The most tokens a prompt may take: what ``max_new_tokens`` leaves of ``max_seq_len``."""
        return max_seq_len - self.max_new_tokens

    def check_room(
        self, max_seq_len: int, tokenizer: ChatGLM2Tokenizer, template: Template, room_key: str = "data.max_seq_len"
    ) -> None:
        """Refuse a budget that leaves no room for any question (``room_key``: the key that set ``max_seq_len``)."""
        shortest = shortest_prompt(tokenizer, template)
        if self.prompt_budget(max_seq_len) < shortest:
            raise ConfigError(
                "generation.max_new_tokens",
                self.max_new_tokens,
                f"at most {max_seq_len - shortest}: {room_key}={max_seq_len} less the shortest prompt "
                f"({shortest} tokens), so that a question fits",
            )


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
) -> tuple[list[Prompt], int]:
    """One prompt per turn of every session, and the number of turns skipped.

    The split strategy's over-length rule (``strategy.prompt_history_start``): the oldest history turns are dropped
    until a prompt fits ``max_prompt_tokens``; a turn whose question alone does not fit is skipped (and counted),
    never cut.
    """
    prompts, skipped = [], 0
    for index, session in enumerate(sessions):
        encoder = SegmentEncoder(tokenizer)
        layout = SessionLayout(session, template, encoder)
        for k, turn in enumerate(session.turns):
            start = prompt_history_start(layout, k, max_prompt_tokens)
            if start is None:
                skipped += 1
                continue
            segments = template.render_prompt(turn.question, session.turns[start:k], session.system)
            ids = [i for segment in segments for i in encoder(segment)]
            prompts.append(Prompt(session.id, index, k + 1, ids, prompt_text(segments), turn.answer, start))
    return prompts, skipped


@contextmanager
def generation_attention(model: torch.nn.Module) -> Iterator[None]:
    """Generate through sdpa when the model trained with flex attention: flex's compiled kernels are for packed
    training rows; with left padding and the KV cache every new shape recompiles them, and on an H200 one such
    recompilation failed (CPsyCoun's 181 test sessions after ``speed=fast`` training, 2026-12-02). The same weights,
    the same masks: only the kernel differs."""
    config = model.config
    before = config._attn_implementation
    if before == "flex_attention":
        config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = before


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

    Prompts are batched by length, left-padded, and generated with the KV cache (``model.generate``), through sdpa
    attention whatever the model trained with (``generation_attention``). The ids of the
    model's vocabulary padding (``len(tokenizer)`` and above), which no text decodes to, are never generated.
    """
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    settings = GenerationSettings(batch_size, max_new_tokens, do_sample, temperature, top_p, repetition_penalty)
    options = generation_options(settings, tokenizer, model.config.vocab_size)
    starts = range(0, len(order), batch_size)
    for start in track(starts, len(starts), f"generating {len(prompts):,} answers"):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i].ids) for i in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = prompts[i].ids
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        with generation_attention(model):
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


def generation_options(settings: GenerationSettings, tokenizer: ChatGLM2Tokenizer, vocab_size: int) -> dict:
    """``model.generate``'s keyword arguments for ``settings`` (the sampling ones only when sampling), with the
    vocabulary's padding ids suppressed."""
    options = {
        "do_sample": settings.do_sample,
        "max_new_tokens": settings.max_new_tokens,
        "repetition_penalty": settings.repetition_penalty,
    }
    padding_ids = vocabulary_padding(tokenizer, vocab_size)
    if padding_ids:
        options["suppress_tokens"] = padding_ids
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p)
    return options


def vocabulary_padding(tokenizer: ChatGLM2Tokenizer, vocab_size: int) -> list[int]:
    """The model's ids beyond the tokenizer's (ChatGLM2 pads 64,794 tokens to 65,024 rows): never to be generated."""
    return list(range(len(tokenizer), vocab_size))
