"""Sessions -> samples through ``datasets.map``, cached on disk: a second run does not tokenize again.

``SampleSpec`` is what decides a session's samples: the tokenizer, the template, the strategy, ``max_seq_len`` and
the supervision policy. One row per sample: ``input_ids``, ``labels``, ``turn_ids``, the weight of every turn of
its session (``turn_weights``, by turn id), the session's index and its counters. The cache key
(``SampleSpec.fingerprint``) covers the sessions (their content, or the files they come from), the spec, and the
source of every module that shapes samples (reading, sessions, templates, strategies, samples, this file, the
tokenizer, the supervision policies), so that a change to any of them builds anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import pyarrow

from glm_session.constants import IGNORE_INDEX
from glm_session.data.samples import Sample, SegmentEncoder, SessionLayout, build_sample
from glm_session.data.session import Session
from glm_session.data.strategy import Plan, Strategy
from glm_session.data.template import Template
from glm_session.supervision import ALL_ANSWERS, Supervision
from glm_session.tokenizer import ChatGLM2Tokenizer

log = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "glm_session"
COUNTERS = (
    "trained_turns",
    "truncated_turns",
    "dropped_history_turns",
    "skipped_turns",
    "windows",
    "window_tokens",  # sessions cut into windows: the windows' tokens, and what split samples of them would take
    "window_split_tokens",
)
FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "turn_ids": datasets.Sequence(datasets.Value("int16")),
        "turn_weights": datasets.Sequence(datasets.Value("float32")),
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
# Every module whose code shapes a sample, from the file's bytes to the sample's ids and labels.
CODE_FILES = ("data/readers.py", "data/session.py", "data/source.py", "data/template.py", "data/strategy.py",
              "data/samples.py", "data/build.py", "tokenizer.py", "supervision.py")  # fmt: skip


def sessions_fingerprint(sessions: list[Session]) -> str:
    """Hash of the sessions' content (ids, system texts, turns), in order."""
    digest = hashlib.sha256()
    for session in sessions:
        texts = [session.id, session.system or ""] + [
            t for turn in session.turns for t in (turn.question, turn.answer)
        ]
        digest.update(json.dumps(texts, ensure_ascii=False).encode())
    return digest.hexdigest()


def code_fingerprint() -> str:
    """Hash of the source of every module in ``CODE_FILES``."""
    package = Path(__file__).parent.parent
    digest = hashlib.sha256()
    for name in CODE_FILES:
        digest.update((package / name).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class SampleSpec:
    """What decides the samples of a session: tokenizer, template, strategy, the most tokens in a sample, and which
    answers are trained how much (``supervision``)."""

    tokenizer: ChatGLM2Tokenizer
    template: Template
    strategy: Strategy
    max_seq_len: int
    supervision: Supervision = ALL_ANSWERS

    def fingerprint(self, sessions_key: str) -> str:
        """The cache key of the samples of the sessions identified by ``sessions_key``."""
        key = {
            "sessions": sessions_key,
            "tokenizer": self.tokenizer.fingerprint,
            "template": asdict(self.template),
            "strategy": self.strategy.name,
            "max_seq_len": self.max_seq_len,
            "supervision": self.supervision.describe(),
            "code": code_fingerprint(),
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def cache_file(fingerprint: str, cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or DEFAULT_CACHE_DIR) / f"samples-{fingerprint}.arrow"


def cached_samples(fingerprint: str, cache_dir: str | Path | None = None) -> datasets.Dataset | None:
    """The samples cached under ``fingerprint``; ``None`` when there are none, or when the file cannot be read as
    them (cut by a full disk, damaged): it is removed, with a warning, and the samples are built again."""
    path = cache_file(fingerprint, cache_dir)
    if not path.exists():
        return None
    try:
        samples = datasets.Dataset.from_file(str(path))
        if samples.features == FEATURES:
            return samples
        reason = "other columns than a sample's"
    except (OSError, ValueError, pyarrow.ArrowException) as err:
        reason = _one_line(err)
    log.warning("%s: a damaged sample cache (%s): removed, the samples are built again", path, reason)
    path.unlink(missing_ok=True)
    return None


def _one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def build_samples(
    sessions: list[Session],
    spec: SampleSpec,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    fingerprint: str | None = None,
) -> datasets.Dataset:
    """The samples of ``sessions`` (a ``datasets.Dataset``, memory-mapped from the cache).

    ``fingerprint``: the cache key, when the caller knows one (``spec.fingerprint`` of the files the sessions come
    from); by default it is computed from the sessions' content.
    """
    if fingerprint is None and sessions:
        fingerprint = spec.fingerprint(sessions_fingerprint(sessions))
    cached = cached_samples(fingerprint, cache_dir) if fingerprint else None
    if cached is not None:  # what map would load, without building its input first
        return cached
    if not sessions:
        return datasets.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)
    path = cache_file(fingerprint, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
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
        fn_kwargs={"spec": spec},
        cache_file_name=str(path),
        new_fingerprint=fingerprint,
        num_proc=num_proc,
        desc=f"Building {spec.strategy.name} samples",
    )


def session_samples(
    session: Session,
    tokenizer: ChatGLM2Tokenizer,
    template: Template,
    strategy: Strategy,
    max_seq_len: int,
    supervision: Supervision = ALL_ANSWERS,
) -> tuple[list[Sample], Plan]:
    """The samples ``strategy`` makes of one session under ``supervision``, and its plan (views and counts)."""
    weights = [float(w) for w in supervision.session_weights(len(session.turns))]
    layout = SessionLayout(session, template, SegmentEncoder(tokenizer), weights)
    plan = strategy.plan(layout, max_seq_len)
    return [build_sample(layout, view) for view in plan.views], plan


def _build_batch(batch: dict[str, list], indices: list[int], spec: SampleSpec) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in FEATURES}
    for row, session_index in enumerate(indices):
        session = Session.from_record({key: values[row] for key, values in batch.items()})
        samples, plan = session_samples(
            session, spec.tokenizer, spec.template, spec.strategy, spec.max_seq_len, spec.supervision
        )
        windows = len(plan.views) if spec.strategy.name != "split" and len(plan.views) > 1 else 0
        for number, (view, sample) in enumerate(zip(plan.views, samples, strict=True)):
            out["input_ids"].append(sample.input_ids)
            out["labels"].append(sample.labels)
            out["turn_ids"].append(sample.turn_ids)
            out["turn_weights"].append(sample.turn_weights)
            out["session_index"].append(session_index)
            out["length"].append(len(sample.input_ids))
            out["supervised_tokens"].append(len(sample.labels) - sample.labels.count(IGNORE_INDEX))
            out["trained_turns"].append(
                sum(w > 0 for w in sample.turn_weights[view.trained_start + 1 : view.end + 1])
            )
            out["truncated_turns"].append(int(view.answer_limit is not None))
            out["dropped_history_turns"].append(view.start)
            # Session-level counters go on the session's first sample.
            out["skipped_turns"].append(plan.skipped_turns if number == 0 else 0)
            out["windows"].append(windows if number == 0 else 0)
            out["window_tokens"].append(sum(len(s.input_ids) for s in samples) if windows and number == 0 else 0)
            out["window_split_tokens"].append(plan.split_tokens if windows and number == 0 else 0)
        if not plan.views and plan.skipped_turns:  # keep the count: an empty row that batching leaves out
            for name in FEATURES:
                out[name].append([] if name in ("input_ids", "labels", "turn_ids", "turn_weights") else 0)
            out["session_index"][-1] = session_index
            out["skipped_turns"][-1] = plan.skipped_turns
    return out
