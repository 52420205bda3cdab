"""Evaluation of a model on one split of its data: generated answers scored against the references, and the
teacher-forced loss of every answer (``evaluate_model``); ``python -m glm_session.evaluate`` is its command.

For every session of the split (or ``limit`` of them, chosen by a hash of their ids) and every turn k, the answer
a_k is generated from the gold history through the training template's inference prompt and scored with Chinese
ROUGE (torchmetrics, ``rouge.py``) and ChatGLM2's official ROUGE and BLEU-4 (``official.py``). The teacher-forced loss
of every answer token of the whole split gives the loss and perplexity by turn. The output folder gets
``predictions.jsonl``, ``metrics.json`` and ``test_losses.json`` (each session's loss sum and token count by turn,
for confidence intervals over sessions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from glm_session.atomic_files import atomic_open, write_text
from glm_session.data.datamodule import DialogueDataModule
from glm_session.data.pipeline import EmptySplitError
from glm_session.data.session import Session
from glm_session.evaluation.generation import GenerationSettings, build_prompts, generate_answers
from glm_session.evaluation.official import official_scores
from glm_session.evaluation.rouge import RougeByTurn
from glm_session.model.loss import chunked_token_losses
from glm_session.model.turn_losses import MAX_TURNS, TurnLossMeter, summarise
from glm_session.supervision import supervised
from glm_session.training.progress import track

log = logging.getLogger(__name__)


EVALUATION_CHUNK_TOKENS = 4096  # trained positions whose logits exist at once in the teacher-forced pass


@torch.no_grad()
def answer_token_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = EVALUATION_CHUNK_TOKENS
) -> torch.Tensor:
    """(B, T-1) ``token_losses(model(...).logits, labels)`` without the (B, T, V) logits: the decoder's final hidden
    states, then the model's own output layer (an adapter on it included) on ``chunk_tokens`` trained positions at
    a time. A 65,536-token batch of the 6B's 65,024-token vocabulary would otherwise hold 17 GB of fp32 logits."""
    hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         use_cache=False).last_hidden_state  # fmt: skip
    return chunked_token_losses(hidden, model.lm_head, batch["labels"], chunk_tokens)


@torch.no_grad()
def teacher_forced_by_session(
    model: torch.nn.Module, data: DialogueDataModule, split: str
) -> dict[int, dict[int, list]]:
    """Summed loss and count of the trained tokens of every session of ``split``, by turn:
    ``{session_index: {turn: [loss sum, tokens]}}`` (the answers, teacher-forced)."""
    device = next(model.parameters()).device
    meter = TurnLossMeter(groups=max(1, len(data.read(split).sessions))).to(device)
    batches = data.dataloader(split)
    for batch in track(batches, len(batches), f"teacher-forced loss on {split}"):
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        losses = answer_token_losses(model, batch)  # (B, T-1)
        meter.add(losses, supervised(batch["labels"]), batch["turn_ids"][:, 1:], batch["session_index"][:, 1:])
    return meter.by_group()


def loss_summary(per_session: dict[int, dict[int, list]]) -> dict[str, Any]:
    """Token-mean loss and perplexity, overall and by turn, of ``teacher_forced_by_session``'s sums."""
    sums, counts = torch.zeros(MAX_TURNS + 1, dtype=torch.float64), torch.zeros(MAX_TURNS + 1, dtype=torch.float64)
    for turns in per_session.values():
        for turn, (total, count) in turns.items():
            sums[turn] += total
            counts[turn] += count
    return {**summarise(sums, counts), "sessions": len(per_session)}


def sample_sessions(sessions: list[Session], limit: int | None) -> list[Session]:
    """``limit`` sessions chosen by a hash of their ids (a fixed random sample, whatever the file order), in file
    order; all of them without a limit."""
    if limit is None or limit >= len(sessions):
        return list(sessions)
    chosen = set(
        sorted(range(len(sessions)), key=lambda i: hashlib.sha256(sessions[i].id.encode()).digest())[:limit]
    )
    return [session for i, session in enumerate(sessions) if i in chosen]


def evaluate_model(
    model: torch.nn.Module,
    data: DialogueDataModule,
    split: str,
    output_dir: str | Path,
    generation: GenerationSettings,
    limit: int | None = None,
) -> dict[str, Any]:
    """Generate, score and write ``predictions.jsonl`` and ``metrics.json`` into ``output_dir``.

    Prompts get ``data.max_seq_len - generation.max_new_tokens`` tokens; the oldest history turns of a longer prompt
    are dropped, and a turn whose question alone does not fit is skipped: both are counted in the metrics.
    """
    output_dir = Path(output_dir)
    generation.check_room(data.max_seq_len, data.tokenizer, data.template)
    all_sessions = data.read(split).sessions
    if not all_sessions:
        data.pipeline.require_batches(split)  # says what reading the split found
    sessions = sample_sessions(all_sessions, limit)
    budget = generation.prompt_budget(data.max_seq_len)
    prompts, skipped_turns = build_prompts(sessions, data.template, data.tokenizer, budget)
    if not prompts:
        raise EmptySplitError(
            f"no question of the {len(sessions)} {split} sessions fits in a prompt of data.max_seq_len - "
            f"generation.max_new_tokens = {budget} tokens"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    if device.type == "cuda":  # the evaluation's own peak, below
        torch.cuda.reset_peak_memory_stats(device)
    was_training = model.training
    model.eval()
    clock = time.perf_counter()
    answers = generate_answers(model, prompts, data.tokenizer, **asdict(generation))
    seconds = {"generation": time.perf_counter() - clock}
    with atomic_open(output_dir / "predictions.jsonl", "w", "evaluation's predictions") as f:
        for prompt, answer in zip(prompts, answers, strict=True):
            record = {"session_id": prompt.session_id, "turn": prompt.turn, "prompt": prompt.text,
                      "reference": prompt.reference, "prediction": answer}  # fmt: skip
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    references = [p.reference for p in prompts]
    clock = time.perf_counter()
    rouge = RougeByTurn()
    rouge.update(answers, references, [p.turn for p in prompts])
    scores = rouge.compute()
    official = official_scores(answers, references)
    seconds["scoring"] = time.perf_counter() - clock
    clock = time.perf_counter()
    per_session = teacher_forced_by_session(model, data, split)
    seconds["teacher_forced"] = time.perf_counter() - clock
    ids = [session.id for session in all_sessions]
    write_text(output_dir / "test_losses.json",
               json.dumps({ids[index]: turns for index, turns in sorted(per_session.items())}) + "\n")  # fmt: skip
    metrics = {
        "split": split,
        "sessions": len(all_sessions),
        "generated_sessions": len(sessions),
        "prompts": len(prompts),
        "prompt_tokens_max": budget,
        "prompts_with_dropped_history": sum(p.dropped_history_turns > 0 for p in prompts),
        "dropped_history_turns": sum(p.dropped_history_turns for p in prompts),
        "skipped_turns": skipped_turns,
        "template": data.template.name,
        "generation": asdict(generation),
        "rouge": scores["overall"],
        "rouge_by_turn": scores["by_turn"],
        "chatglm2_official": official,
        "prediction_chars_mean": sum(map(len, answers)) / len(answers),
        "reference_chars_mean": sum(map(len, references)) / len(references),
        "empty_predictions": sum(not a for a in answers),
        "teacher_forced": loss_summary(per_session),
        "seconds": {part: round(value, 3) for part, value in seconds.items()},  # where the evaluation's time goes
    }
    if device.type == "cuda":  # what it held at its peak
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        metrics["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    model.train(was_training)
    if skipped_turns:
        log.warning("%d turns skipped: their question alone is longer than %d tokens", skipped_turns, budget)
    return metrics
