"""Sessions -> samples through ``datasets.map``, cached on disk: a second run does not tokenize again.

One row per sample: ``input_ids``, ``labels``, ``turn_ids``, the session's index and its counters. The cache key
is the content of the sessions, the tokenizer model, the template, the strategy, ``max_seq_len`` and the source
of this package's data code, so that a change to any of them builds anew.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import datasets

from glm_session.constants import IGNORE_INDEX
from glm_session.data.samples import SegmentEncoder, SessionLayout, build_sample
from glm_session.data.session import Session
from glm_session.data.strategy import SessionStrategy, SplitStrategy
from glm_session.data.template import Template
from glm_session.tokenizer import ChatGLM2Tokenizer

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "glm_session"
COUNTERS = ("trained_turns", "truncated_turns", "dropped_history_turns", "skipped_turns", "windows")
FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "turn_ids": datasets.Sequence(datasets.Value("int16")),
        "session_index": datasets.Value("int32"),
        "length": datasets.Value("int32"),
        "supervised_tokens": datasets.Value("int32"),
        **{name: datasets.Value("int32") for name in COUNTERS},
    }
)
SESSION_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "system": datasets.Value("string"),
        "questions": datasets.Sequence(datasets.Value("string")),
        "answers": datasets.Sequence(datasets.Value("string")),
    }
)
_CODE_FILES = ("build.py", "samples.py", "strategy.py", "template.py", "session.py")


def sessions_fingerprint(sessions: list[Session]) -> str:
    """Hash of the sessions' content (ids, system texts, turns), in order."""
    digest = hashlib.sha256()
    for session in sessions:
        texts = [session.id, session.system or ""] + [t for turn in session.turns for t in (turn.question, turn.answer)]
        digest.update(json.dumps(texts, ensure_ascii=False).encode())
    return digest.hexdigest()


def _code_fingerprint() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256(Path(here.parent / "tokenizer.py").read_bytes())
    for name in _CODE_FILES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def build_samples(
    sessions: list[Session],
    tokenizer: ChatGLM2Tokenizer,
    template: Template,
    strategy: SplitStrategy | SessionStrategy,
    max_seq_len: int,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """The samples of ``sessions`` (a ``datasets.Dataset``, memory-mapped from the cache)."""
    key = {
        "sessions": sessions_fingerprint(sessions),
        "tokenizer": tokenizer.fingerprint,
        "template": asdict(template),
        "strategy": strategy.name,
        "max_seq_len": max_seq_len,
        "code": _code_fingerprint(),
    }
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file = cache_dir / f"samples-{fingerprint}.arrow"
    if cache_file.exists():  # what map would load, without building its input first
        return datasets.Dataset.from_file(str(cache_file))
    columns: dict[str, list] = {name: [] for name in SESSION_FEATURES}
    for session in sessions:
        for name, value in session.to_record().items():
            columns[name].append(value)
    records = datasets.Dataset.from_dict(columns, features=SESSION_FEATURES)
    return records.map(
        _build_batch,
        batched=True,
        batch_size=256,
        with_indices=True,
        remove_columns=records.column_names,
        features=FEATURES,
        fn_kwargs={"tokenizer": tokenizer, "template": template, "strategy": strategy, "max_seq_len": max_seq_len},
        cache_file_name=str(cache_file),
        new_fingerprint=fingerprint,
        num_proc=num_proc,
        desc=f"Building {strategy.name} samples",
    )


def _build_batch(
    batch: dict[str, list],
    indices: list[int],
    tokenizer: ChatGLM2Tokenizer,
    template: Template,
    strategy: SplitStrategy | SessionStrategy,
    max_seq_len: int,
) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in FEATURES}
    for row, session_index in enumerate(indices):
        session = Session.from_record({key: values[row] for key, values in batch.items()})
        layout = SessionLayout(session, template, SegmentEncoder(tokenizer))
        plan = strategy.plan(layout, max_seq_len)
        windows = len(plan.views) if strategy.name == "session" and len(plan.views) > 1 else 0
        for number, view in enumerate(plan.views):
            sample = build_sample(layout, view)
            out["input_ids"].append(sample.input_ids)
            out["labels"].append(sample.labels)
            out["turn_ids"].append(sample.turn_ids)
            out["session_index"].append(session_index)
            out["length"].append(len(sample.input_ids))
            out["supervised_tokens"].append(len(sample.labels) - sample.labels.count(IGNORE_INDEX))
            out["trained_turns"].append(view.end - view.trained_start)
            out["truncated_turns"].append(int(view.answer_limit is not None))
            out["dropped_history_turns"].append(view.start)
            # Session-level counters go on the session's first sample.
            out["skipped_turns"].append(plan.skipped_turns if number == 0 else 0)
            out["windows"].append(windows if number == 0 else 0)
        if not plan.views and plan.skipped_turns:  # keep the count: an empty row that batching leaves out
            for name in FEATURES:
                out[name].append([] if name in ("input_ids", "labels", "turn_ids") else 0)
            out["session_index"][-1] = session_index
            out["skipped_turns"][-1] = plan.skipped_turns
    return out
