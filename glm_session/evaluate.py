"""Evaluate: ``python -m glm_session.evaluate ckpt_path=... [overrides]``; Hydra config ``conf/evaluate.yaml``.

For every session of the split (or ``limit`` of them, chosen by a hash of their ids) and every turn k, the answer
a_k is generated from the gold history through the training template's inference prompt and scored with Chinese
ROUGE (torchmetrics, ``evaluation/rouge.py``) and ChatGLM2's official ROUGE and BLEU-4 (``evaluation/official.py``).
The teacher-forced loss of every answer token of the whole split gives the loss and perplexity by turn. The output
folder gets ``predictions.jsonl``, ``metrics.json`` and ``test_losses.json`` (each session's loss sum and token count
by turn, for confidence intervals over sessions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from glm_session.checkpoints import CheckpointError, load_model
from glm_session.config import CONFIG_DIR, build
from glm_session.data.datamodule import DialogueDataModule
from glm_session.data.pipeline import EmptySplitError
from glm_session.data.session import Session
from glm_session.data.strategy import SessionStrategy
from glm_session.data.template import get_template
from glm_session.errors import run_hydra_app
from glm_session.evaluation.generation import GenerationSettings, build_prompts, generate_answers
from glm_session.evaluation.official import official_scores
from glm_session.evaluation.rouge import RougeByTurn
from glm_session.model.loss import token_losses
from glm_session.supervision import supervised
from glm_session.tokenizer import ChatGLM2Tokenizer

log = logging.getLogger(__name__)


@torch.no_grad()
def teacher_forced_by_session(
    model: torch.nn.Module, data: DialogueDataModule, split: str
) -> dict[int, dict[int, list]]:
    """Summed loss and count of the trained tokens of every session of ``split``, by turn:
    ``{session_index: {turn: [loss sum, tokens]}}`` (the answers, teacher-forced)."""
    device = next(model.parameters()).device
    sessions: dict[int, dict[int, list]] = {}
    for batch in data.dataloader(split):
        logits = model(
            input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device), use_cache=False
        ).logits
        losses = token_losses(logits, batch["labels"].to(device)).cpu()  # (B, T-1)
        mask = supervised(batch["labels"])
        triples = zip(batch["session_index"][:, 1:][mask].tolist(), batch["turn_ids"][:, 1:][mask].tolist(),
                      losses[mask].tolist(), strict=True)  # fmt: skip
        for session, turn, loss in triples:
            entry = sessions.setdefault(session, {}).setdefault(turn, [0.0, 0])
            entry[0] += loss
            entry[1] += 1
    return sessions


def loss_summary(per_session: dict[int, dict[int, list]]) -> dict[str, Any]:
    """Token-mean loss and perplexity, overall and by turn, of ``teacher_forced_by_session``'s sums."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for turns in per_session.values():
        for turn, (total, count) in turns.items():
            sums[turn] = sums.get(turn, 0.0) + total
            counts[turn] = counts.get(turn, 0) + count
    by_turn = {turn: sums[turn] / counts[turn] for turn in sorted(sums)}
    overall = sum(sums.values()) / max(1, sum(counts.values()))
    return {
        "loss": overall,
        "perplexity": math.exp(overall),
        "loss_by_turn": by_turn,
        "perplexity_by_turn": {turn: math.exp(loss) for turn, loss in by_turn.items()},
        "tokens": sum(counts.values()),
        "sessions": len(per_session),
    }


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
    was_training = model.training
    model.eval()
    answers = generate_answers(model, prompts, data.tokenizer, **asdict(generation))
    with open(output_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for prompt, answer in zip(prompts, answers, strict=True):
            record = {"session_id": prompt.session_id, "turn": prompt.turn, "prompt": prompt.text,
                      "reference": prompt.reference, "prediction": answer}  # fmt: skip
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    references = [p.reference for p in prompts]
    rouge = RougeByTurn()
    rouge.update(answers, references, [p.turn for p in prompts])
    scores = rouge.compute()
    per_session = teacher_forced_by_session(model, data, split)
    ids = [session.id for session in all_sessions]
    (output_dir / "test_losses.json").write_text(
        json.dumps({ids[index]: turns for index, turns in sorted(per_session.items())}) + "\n"
    )
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
        "chatglm2_official": official_scores(answers, references),
        "prediction_chars_mean": sum(map(len, answers)) / len(answers),
        "reference_chars_mean": sum(map(len, references)) / len(references),
        "empty_predictions": sum(not a for a in answers),
        "teacher_forced": loss_summary(per_session),
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    model.train(was_training)
    if skipped_turns:
        log.warning("%d turns skipped: their question alone is longer than %d tokens", skipped_turns, budget)
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split``, with the template and tokenizer the run was trained with."""
    generation = build(cfg.generation)
    model, info = load_model(cfg.ckpt_path)
    # The run's template and (unless tokenizer.path is given) tokenizer; session samples for the loss.
    tokenizer = (
        build(cfg.tokenizer)
        if cfg.tokenizer.get("path")
        else ChatGLM2Tokenizer.from_pretrained(info.tokenizer_path)
    )
    if tokenizer.fingerprint != info.tokenizer_fingerprint:
        raise CheckpointError(
            f"{cfg.ckpt_path}: trained with tokenizer {info.tokenizer_fingerprint}, not with "
            f"{tokenizer.vocab_file} ({tokenizer.fingerprint})"
        )
    data = build(cfg.data, tokenizer=tokenizer, template=get_template(info.template), strategy=SessionStrategy())
    device = (
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    model.to(device)
    log.info("evaluating %s (template %s) on %s", cfg.ckpt_path, info.template, cfg.split)
    return evaluate_model(model, data, cfg.split, cfg.output_dir, generation, cfg.limit)


@hydra.main(config_path=str(CONFIG_DIR), config_name="evaluate", version_base="1.3")
def hydra_app(cfg: DictConfig) -> None:
    metrics = evaluate(cfg)
    log.info("ROUGE-1/2/L %.2f / %.2f / %.2f", *metrics["rouge"].values())


def main() -> None:
    """``python -m glm_session.evaluate`` / ``glm-session-evaluate``: bad input ends with one line and exit code 2."""
    run_hydra_app(hydra_app)


if __name__ == "__main__":
    main()
