"""The data pipeline: dialogue files -> sessions -> samples -> rows -> batches.

``DialogueData`` holds it without Lightning (the command-line tools use it, and start fast);
``DialogueDataModule`` (datamodule.py) adds Lightning's hooks. It never imports the model: what leaves it is a
dict of tensors (``input_ids``, ``labels``, ``position_ids`` and, per token, ``turn_ids``, ``session_index`` and
``sample_index``).

A second run reads nothing but the cache: the samples (``datasets``' Arrow file) and a summary of the read
(sessions, turns, skipped records), both keyed by the hash of the input files and the settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import datasets
import numpy as np

from glm_session.data.batching import RowBatchSampler, SessionGroupBatchSampler
from glm_session.data.build import COUNTERS, DEFAULT_CACHE_DIR, build_samples, cache_file, samples_fingerprint
from glm_session.data.packing import pack_first_fit_decreasing
from glm_session.data.readers import Format, OnError, ReadResult, read_sessions
from glm_session.data.samples import shortest_sample
from glm_session.data.session import ROLES
from glm_session.data.strategy import STRATEGIES, Strategy, get_strategy
from glm_session.data.template import Template, get_template
from glm_session.errors import ConfigError, UserError, check_bool, check_choice, check_fraction, check_int
from glm_session.tokenizer import ChatGLM2Tokenizer

if TYPE_CHECKING:
    import torch

    from glm_session.data.collator import Collator

SPLITS = ("train", "validation", "test")
SKIPS_KEPT = 20  # skipped records whose messages the summary keeps
WINDOW_WARNING_SHARE = 0.5  # warn when cut sessions' windows take this share of their split samples' tokens


def _check_holdout(holdout: Mapping[str, float] | None) -> dict[str, float]:
    if holdout is not None and not isinstance(holdout, Mapping):
        raise ConfigError("data.holdout", holdout, "null or a mapping like {validation: 0.05, test: 0.05}")
    holdout = dict(holdout or {})
    for name, fraction in holdout.items():
        if name not in ("validation", "test"):
            raise ConfigError(f"data.holdout.{name}", fraction, "left out: holdout takes validation and test")
        check_fraction(f"data.holdout.{name}", fraction)
    if sum(holdout.values()) >= 1:
        raise ConfigError("data.holdout", holdout, "fractions whose sum is below 1 (some sessions must train)")
    return holdout


def _check_role_map(role_map: Mapping[str, str] | None) -> dict[str, str]:
    if role_map is not None and not isinstance(role_map, Mapping):
        raise ConfigError("data.role_map", role_map, "null or a mapping like {client: user, counselor: assistant}")
    role_map = dict(role_map or {})
    for name, role in role_map.items():
        check_choice(f"data.role_map.{name}", role, ROLES)
    return role_map


class EmptySplitError(UserError):
    """A split that the run needs holds no sample; the message says what reading it found."""


@dataclass
class PreparedSplit:
    """One split, ready to batch. ``summary``: sessions, turns, skipped records, dropped trailing questions."""

    summary: dict[str, Any]
    samples: datasets.Dataset
    rows: list[list[int]]  # sample indices per row
    row_lengths: list[int]
    row_supervised: list[int]  # trained tokens per row


class DialogueData:
    """Split or session samples of dialogue files, padded or packed, for ChatGLM2 (no Lightning).

    Args:
        tokenizer: a ``ChatGLM2Tokenizer``.
        template: a ``Template`` or its name (``chatglm2``, ``chatglm2_article``).
        strategy: a strategy or its name (``split``, ``session``).
        train_path, validation_path, test_path: one file per split.
        path: one file whose sessions are all used, in file order, for training (the split files are then not
            used); ``holdout`` moves a deterministic share of them (by a hash of the session id) to
            validation and test, e.g. ``{"validation": 0.05, "test": 0.05}``.
        format, role_map, on_error, drop_trailing_question: how files are read (``readers.read_sessions``).
        limit: use the first ``limit`` sessions of each file.
        max_seq_len: the most tokens in a sample (and in a packed row).
        packing: first-fit-decreasing packing of samples into rows of ``max_seq_len``.
        batch_size: rows per batch; or ``batch_tokens``: padded tokens per batch.
        pad_to: ``longest`` (row of the batch) or ``max_seq_len`` (every row, as the article's code does).
        batch_sessions: training batches hold every sample of this many sessions (the same sessions, whatever
            the strategy, for the same seed), packed within the batch; or
        batch_supervised_tokens: training batches hold about this many trained tokens. Either replaces
            ``batch_size``/``batch_tokens`` for the training split; the other splits keep those.
        validation_strategy: the strategy of the validation and test samples (``null``: the training strategy).
            ``session`` gives split runs the same validation loss at a third of the compute (Invariant 1: every
            answer token has the same logits in both).
        shuffle, seed: training order, new every epoch, the same on every run.
        num_workers, pin_memory: dataloader worker processes, and page-locked batches (faster copies to a GPU).
        cache_dir: where ``datasets`` caches the samples (default ``~/.cache/glm_session``).
        num_proc: processes for building samples.
    """

    def __init__(
        self,
        tokenizer: ChatGLM2Tokenizer,
        template: Template | str = "chatglm2",
        strategy: Strategy | str = "session",
        train_path: str | None = None,
        validation_path: str | None = None,
        test_path: str | None = None,
        path: str | None = None,
        holdout: Mapping[str, float] | None = None,
        format: Format = "auto",
        role_map: Mapping[str, str] | None = None,
        on_error: OnError = "raise",
        drop_trailing_question: bool = False,
        limit: int | None = None,
        max_seq_len: int = 2048,
        packing: bool = False,
        batch_size: int | None = 8,
        batch_tokens: int | None = None,
        batch_sessions: int | None = None,
        batch_supervised_tokens: int | None = None,
        validation_strategy: str | None = None,
        pad_to: Literal["longest", "max_seq_len"] = "longest",
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache_dir: str | None = None,
        num_proc: int | None = None,
    ) -> None:
        super().__init__()
        self.world_size, self.rank = 1, 0  # this process's share of the training batches
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
        self.files = {"train": train_path, "validation": validation_path, "test": test_path}
        self.path, self.holdout = path, _check_holdout(holdout)
        self.read_options = {
            "format": check_choice("data.format", format, ("auto", "sharegpt", "openai", "chatglm")),
            "role_map": _check_role_map(role_map),
            "on_error": check_choice("data.on_error", on_error, ("raise", "skip")),
            "limit": check_int("data.limit", limit, minimum=1, optional=True),
            "drop_trailing_question": check_bool("data.drop_trailing_question", drop_trailing_question),
        }
        shortest = shortest_sample(self.tokenizer, self.template)
        self.max_seq_len = check_int("data.max_seq_len", max_seq_len, minimum=shortest)
        self.packing = check_bool("data.packing", packing)
        check_int("data.batch_size", batch_size, minimum=1, optional=True)
        check_int("data.batch_tokens", batch_tokens, minimum=1, optional=True)
        if batch_tokens is not None:
            batch_size = None
        elif batch_size is None:
            raise ConfigError(
                "data.batch_size", None, "given when data.batch_tokens is null (rows or tokens a batch)"
            )
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        check_int("data.batch_sessions", batch_sessions, minimum=1, optional=True)
        check_int("data.batch_supervised_tokens", batch_supervised_tokens, minimum=1, optional=True)
        if batch_sessions is not None and batch_supervised_tokens is not None:
            raise ConfigError(
                "data.batch_supervised_tokens", batch_supervised_tokens, "null with data.batch_sessions"
            )
        self.batch_sessions, self.batch_supervised_tokens = batch_sessions, batch_supervised_tokens
        if validation_strategy is not None:
            check_choice("data.validation_strategy", validation_strategy, tuple(STRATEGIES))
        self.validation_strategy = get_strategy(validation_strategy) if validation_strategy else self.strategy
        self.pad_to = check_choice("data.pad_to", pad_to, ("longest", "max_seq_len"))
        self.shuffle, self.seed = check_bool("data.shuffle", shuffle), check_int("data.seed", seed)
        self.num_workers = check_int("data.num_workers", num_workers, minimum=0)
        self.pin_memory = check_bool("data.pin_memory", pin_memory)
        self.cache_dir, self.num_proc = cache_dir, check_int("data.num_proc", num_proc, minimum=1, optional=True)
        self._splits: dict[str, PreparedSplit] = {}
        self._reads: dict[str, ReadResult] = {}

    # sessions -> samples -> rows -------------------------------------------------------------------

    def read(self, split: str) -> ReadResult:
        """The sessions of ``split`` (``train``, ``validation``, ``test``, or ``all`` of them, batched as train)."""
        if split == "all":
            parts = [self.read(s) for s in SPLITS]
            return ReadResult([x for p in parts for x in p.sessions], [x for p in parts for x in p.skipped])
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)} or all")
        if split not in self._reads:
            if self.path is not None:
                self._reads.update(self._holdout(read_sessions(self.path, **self.read_options)))
            else:
                path = self.files[split]
                self._reads[split] = read_sessions(path, **self.read_options) if path else ReadResult()
        return self._reads[split]

    def _holdout(self, result: ReadResult) -> dict[str, ReadResult]:
        splits = {name: ReadResult() for name in SPLITS}
        splits["train"].skipped = result.skipped
        validation, test = self.holdout.get("validation", 0.0), self.holdout.get("test", 0.0)
        for session in result.sessions:
            u = int(hashlib.sha256(session.id.encode()).hexdigest()[:8], 16) / 2**32
            name = "validation" if u < validation else "test" if u < validation + test else "train"
            splits[name].sessions.append(session)
        return splits

    def source_key(self) -> str:
        """Hash of the input files' bytes and of how they are read and split."""
        digest = hashlib.sha256()
        paths = [self.path] if self.path is not None else [p for p in self.files.values() if p]
        for path in paths:
            file = Path(path)
            digest.update(str(file.resolve()).encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest() if file.is_file() else b"missing")
        settings = {
            "files": self.files,
            "path": self.path,
            "holdout": self.holdout,
            "read": self.read_options,
        }
        digest.update(json.dumps(settings, sort_keys=True).encode())
        return digest.hexdigest()[:32]

    def summary(self, split: str) -> dict[str, Any]:
        """What reading ``split`` found (from the cache when the same files were read before)."""
        path = Path(self.cache_dir or DEFAULT_CACHE_DIR) / f"read-{self.source_key()}-{split}.json"
        if path.exists():
            return json.loads(path.read_text())
        read = self.read(split)
        summary = {
            "sessions": len(read.sessions),
            "turns": sum(len(s.turns) for s in read.sessions),
            "skipped_records": len(read.skipped),
            "skipped": [str(e) for e in read.skipped[:SKIPS_KEPT]],
            "dropped_trailing_questions": read.dropped_trailing_questions,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, ensure_ascii=False, indent=1))
        return summary

    def strategy_of(self, split: str) -> Strategy:
        """The strategy that builds the samples of ``split``."""
        return self.validation_strategy if split in ("validation", "test") else self.strategy

    def prepared(self, split: str) -> PreparedSplit:
        """Samples and rows of ``split``, built once (from the ``datasets`` cache when it has them)."""
        if split not in self._splits:
            strategy = self.strategy_of(split)
            fingerprint = samples_fingerprint(
                f"{self.source_key()}-{split}", self.tokenizer, self.template, strategy, self.max_seq_len
            )
            cached = cache_file(fingerprint, self.cache_dir).exists()
            samples = build_samples(
                [] if cached else self.read(split).sessions, self.tokenizer, self.template, strategy,
                self.max_seq_len, cache_dir=self.cache_dir, num_proc=self.num_proc, fingerprint=fingerprint,
            )  # fmt: skip
            lengths = samples.data.column("length").to_numpy()
            nonempty = np.flatnonzero(lengths > 0)
            if self.packing:
                packed = pack_first_fit_decreasing(lengths[nonempty].tolist(), self.max_seq_len)
                rows = [[int(nonempty[j]) for j in row] for row in packed]
            else:
                rows = [[i] for i in nonempty.tolist()]
            all_lengths, supervised = lengths.tolist(), samples.data.column("supervised_tokens").to_pylist()
            row_lengths = [sum(all_lengths[i] for i in row) for row in rows]
            row_supervised = [sum(supervised[i] for i in row) for row in rows]
            self._splits[split] = PreparedSplit(self.summary(split), samples, rows, row_lengths, row_supervised)
        return self._splits[split]

    # batches -------------------------------------------------------------------------------------

    def batch_sampler(self, split: str) -> RowBatchSampler:
        train = split in ("train", "all")
        prepared = self.prepared(split)
        replicas = {"num_replicas": self.world_size, "rank": self.rank}  # evaluation batches are shared out too
        if train and self.batch_sessions is not None:
            table = prepared.samples.data
            return SessionGroupBatchSampler(
                table.column("session_index").to_pylist(), table.column("length").to_pylist(), self.batch_sessions,
                self.max_seq_len, self.packing, shuffle=self.shuffle, seed=self.seed, drop_last=True, **replicas,
            )  # fmt: skip
        budget = {"batch_size": self.batch_size, "batch_tokens": self.batch_tokens}
        if train and self.batch_supervised_tokens is not None:
            budget = {
                "batch_supervised_tokens": self.batch_supervised_tokens,
                "supervised": prepared.row_supervised,
            }
        return RowBatchSampler(
            prepared.row_lengths,
            shuffle=self.shuffle and train,
            seed=self.seed,
            drop_last=train,
            fixed_width=self.max_seq_len if self.pad_to == "max_seq_len" else None,
            **budget,
            **replicas,
        )

    def collator(self) -> Collator:
        from glm_session.data.collator import Collator

        width = self.max_seq_len if self.pad_to == "max_seq_len" else None
        return Collator(pad_id=self.tokenizer.pad_token_id, width=width)

    def dataloader(self, split: str, batch_sampler: RowBatchSampler | None = None) -> torch.utils.data.DataLoader:
        import torch

        from glm_session.data.collator import RowDataset
        from glm_session.data.loader import ResumableDataLoader

        prepared = self.prepared(split)
        loader = ResumableDataLoader if split == "train" else torch.utils.data.DataLoader
        return loader(
            RowDataset(prepared.samples, prepared.rows),
            batch_sampler=batch_sampler or self.batch_sampler(split),
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    # statistics ----------------------------------------------------------------------------------

    def statistics(self, split: str = "train") -> dict[str, Any]:
        """What ``split`` costs: tokens, samples, rows, padding as batched (epoch 0), and every count of
        what was dropped, cut, truncated or skipped."""
        prepared = self.prepared(split)
        table = prepared.samples.data
        columns = {name: table.column(name).to_numpy() for name in ("length", "supervised_tokens", *COUNTERS)}
        sampler = self.batch_sampler(split)
        sampler.num_replicas, sampler.rank = 1, 0
        batches = sampler.all_batches(epoch=0)
        width = self.max_seq_len if self.pad_to == "max_seq_len" else None
        padded = sum(len(b) * (width or max(sampler.row_length(i) for i in b)) for b in batches)
        rows_tokens = sum(sampler.row_length(i) for b in batches for i in b)
        return {
            "split": split,
            "template": self.template.name,
            "strategy": self.strategy_of(split).name,
            "packing": self.packing,
            "max_seq_len": self.max_seq_len,
            "sessions": prepared.summary["sessions"],
            "turns": prepared.summary["turns"],
            "samples": int((columns["length"] > 0).sum()),
            "rows": sum(len(b) for b in batches),
            "batches": len(batches),
            "input_tokens": int(columns["length"].sum()),
            "supervised_tokens": int(columns["supervised_tokens"].sum()),
            "padding_tokens": padded - rows_tokens,
            "padding_fraction": (padded - rows_tokens) / padded if padded else 0.0,
            **{name: int(columns[name].sum()) for name in COUNTERS if name != "trained_turns"},
            "cut_sessions": int((columns["windows"] > 0).sum()),
            "skipped_records": prepared.summary["skipped_records"],
            "dropped_trailing_questions": prepared.summary["dropped_trailing_questions"],
        }

    def require_batches(self, split: str) -> None:
        """Raise ``EmptySplitError`` when ``split`` gives no batch (no sample), saying what reading it found."""
        stats = self.statistics(split)
        if stats["batches"] > 0:
            return
        source = self.path if self.path is not None else self.files[split]
        if source is None:
            raise EmptySplitError(f"no {split} data: give data.{split}_path (or data.path with data.holdout)")
        if self.path is not None and split != "train":
            source = f"{source} (data.holdout.{split}={self.holdout.get(split, 0.0)})"
        found = [f"{stats['sessions']} sessions read"]
        if stats["skipped_records"]:
            found.append(f"{stats['skipped_records']} records skipped (first: {self.describe_skips(split, 1)[0]})")
        if stats["skipped_turns"]:
            found.append(
                f"{stats['skipped_turns']} turns skipped: their question alone is longer than "
                f"data.max_seq_len={self.max_seq_len}"
            )
        raise EmptySplitError(f"{source}: no {split} sample: " + ", ".join(found))

    def window_warning(self, split: str) -> str | None:
        """A warning when the sessions cut into windows cost nearly what split samples of them would."""
        stats = self.statistics(split)
        windows, split_tokens = stats["window_tokens"], stats["window_split_tokens"]
        if not split_tokens or windows < WINDOW_WARNING_SHARE * split_tokens:
            return None
        return (
            f"{stats['cut_sessions']} {split} sessions longer than data.max_seq_len={self.max_seq_len} were cut into "
            f"{stats['windows']} windows of {windows:,} tokens: {windows / split_tokens:.0%} of the {split_tokens:,} "
            "that split samples of them take (each window repeats as much history as fits), so session samples "
            "save little on them; a larger data.max_seq_len keeps them whole"
        )

    def describe_skips(self, split: str, limit: int = 5) -> list[str]:
        """The first ``limit`` skipped records of ``split``, as messages."""
        return self.summary(split)["skipped"][:limit]
