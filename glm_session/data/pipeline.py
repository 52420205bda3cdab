"""The data pipeline, one way through: source -> samples -> rows -> batches.

- ``DialogueSource`` (source.py): the files, how they are read and split;
- ``SampleSpec`` (build.py): tokenizer, template, strategy and ``max_seq_len``, the samples cached by ``datasets``;
- ``Rows`` (packing.py): one sample a row, or packed;
- ``Batching`` (batching.py), the loader (loader.py) and the collator (collator.py): batches of tensors.

``DialoguePipeline`` chains them for every split and says what a split costs (``statistics``). It never imports the
model: what leaves it is a dict of tensors (``input_ids``, ``labels``, ``position_ids`` and, per token, ``turn_ids``,
``session_index`` and ``sample_index``, with the loss weights). A second run reads nothing but the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from glm_session.data.batching import Batching, RowBatchSampler
from glm_session.data.build import COUNTERS, DEFAULT_CACHE_DIR, SampleSpec, build_samples, cached_samples
from glm_session.data.collator import Collator, RowDataset
from glm_session.data.loader import ResumableDataLoader
from glm_session.data.packing import Rows, make_rows
from glm_session.data.source import SPLITS, DialogueSource
from glm_session.errors import ConfigError, UserError, file_in_the_way
from glm_session.supervision import SupervisedTurns, supervised_turns

WINDOW_WARNING_SHARE = 0.5  # warn when cut sessions' windows take this share of their split samples' tokens


class EmptySplitError(UserError):
    """A split that the run needs holds no sample; the message says what reading it found."""


class NothingSupervisedError(EmptySplitError):
    """The supervision policy leaves no answer of a training split trained."""


@dataclass
class PreparedSplit:
    """One split, ready to batch. ``summary``: sessions, turns, skipped records, dropped trailing questions."""

    summary: dict[str, Any]
    samples: datasets.Dataset
    rows: Rows


class DialoguePipeline:
    """Samples of dialogue files, in rows and batches, for every split.

    Args:
        source: where the sessions come from.
        samples: the training samples' spec; ``evaluation_samples``: the validation and test samples' (another
            strategy, say), or the same.
        batching: how rows become batches.
        num_workers, pin_memory: dataloader worker processes, and page-locked batches (faster copies to a GPU).
        cache_dir: where ``datasets`` caches the samples (default ``~/.cache/glm_session``).
        num_proc: processes for building samples.
    """

    def __init__(
        self,
        source: DialogueSource,
        samples: SampleSpec,
        evaluation_samples: SampleSpec,
        batching: Batching,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache_dir: str | None = None,
        num_proc: int | None = None,
    ) -> None:
        self.source, self.samples, self.evaluation_samples = source, samples, evaluation_samples
        self.batching, self.num_workers, self.pin_memory = batching, num_workers, pin_memory
        self.cache_dir, self.num_proc = Path(cache_dir or DEFAULT_CACHE_DIR), num_proc
        blocking = file_in_the_way(self.cache_dir)
        if blocking is not None:
            raise ConfigError("data.cache_dir", str(self.cache_dir), f"a folder for the sample cache: {blocking} is a file")
        self._splits: dict[str, PreparedSplit] = {}
        self._supervised: dict[str, SupervisedTurns] = {}

    def spec_of(self, split: str) -> SampleSpec:
        """The spec that builds the samples of ``split``."""
        return self.evaluation_samples if split in ("validation", "test") else self.samples

    def prepared(self, split: str) -> PreparedSplit:
        """Samples and rows of ``split``, built once (from the ``datasets`` cache when it has them)."""
        if split not in self._splits:
            spec = self.spec_of(split)
            fingerprint = spec.fingerprint(f"{self.source.key()}-{split}")
            samples = cached_samples(fingerprint, self.cache_dir)
            if samples is None:
                sessions = self.source.read(split).sessions
                samples = build_samples(sessions, spec, self.cache_dir, self.num_proc, fingerprint)
            table = samples.data
            rows = make_rows(table.column("length").to_pylist(), table.column("supervised_tokens").to_pylist(),
                             spec.max_seq_len, self.batching.packing)  # fmt: skip
            self._splits[split] = PreparedSplit(self.source.summary(split, self.cache_dir), samples, rows)
        return self._splits[split]

    def supervised_turns(self, split: str) -> SupervisedTurns:
        """Every supervised answer turn of ``split``'s samples, with its tokens and weight (computed once)."""
        if split not in self._supervised:
            table = self.prepared(split).samples.data

            def flat(name: str) -> tuple[np.ndarray, np.ndarray]:  # a list column's values end to end, and lengths
                column = table.column(name).combine_chunks()
                return column.flatten().to_numpy(), column.value_lengths().to_numpy()

            (labels, lengths), (turn_ids, _) = flat("labels"), flat("turn_ids")
            self._supervised[split] = supervised_turns(labels, turn_ids, lengths, *flat("turn_weights"))
        return self._supervised[split]

    # batches -------------------------------------------------------------------------------------

    def batch_sampler(self, split: str, num_replicas: int = 1, rank: int = 0) -> RowBatchSampler:
        """The batches of ``split`` (``train`` and ``all`` as training batches), this rank's share of them."""
        prepared = self.prepared(split)
        table = prepared.samples.data
        return self.batching.sampler(
            split in ("train", "all"), prepared.rows, table.column("session_index").to_pylist(),
            table.column("length").to_pylist(), num_replicas, rank,
        )  # fmt: skip

    def dataloader(self, split: str, num_replicas: int = 1, rank: int = 0) -> torch.utils.data.DataLoader:
        prepared = self.prepared(split)
        loader = ResumableDataLoader if split == "train" else torch.utils.data.DataLoader
        return loader(
            RowDataset(prepared.samples, prepared.rows.samples),
            batch_sampler=self.batch_sampler(split, num_replicas, rank),
            collate_fn=Collator(pad_id=self.samples.tokenizer.pad_token_id, width=self.batching.width),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    # what a split costs ------------------------------------------------------------------------------

    def statistics(self, split: str = "train") -> dict[str, Any]:
        """What ``split`` costs: tokens, samples, rows, padding as batched (epoch 0, one process), every count of
        what was dropped, cut, truncated or skipped, and the supervised answers and tokens by turn position."""
        prepared = self.prepared(split)
        turns = self.supervised_turns(split)
        answers_by_turn = np.bincount(turns.turns)
        tokens_by_turn = np.bincount(turns.turns, weights=turns.tokens)
        table = prepared.samples.data
        columns = {name: table.column(name).to_numpy() for name in ("length", "supervised_tokens", *COUNTERS)}
        sampler = self.batch_sampler(split)
        batches = sampler.all_batches(epoch=0)
        width = self.batching.width
        padded = sum(len(b) * (width or max(sampler.row_length(i) for i in b)) for b in batches)
        rows_tokens = sum(sampler.row_length(i) for b in batches for i in b)
        return {
            "split": split,
            "template": self.samples.template.name,
            "strategy": self.spec_of(split).strategy.name,
            "supervision": self.spec_of(split).supervision.describe(),
            "packing": self.batching.packing,
            "max_seq_len": self.samples.max_seq_len,
            "sessions": prepared.summary["sessions"],
            "turns": prepared.summary["turns"],
            "openings": prepared.summary["openings"],  # distinct first questions
            "samples": int((columns["length"] > 0).sum()),
            "rows": sum(len(b) for b in batches),
            "batches": len(batches),
            "input_tokens": int(columns["length"].sum()),
            "supervised_tokens": int(columns["supervised_tokens"].sum()),
            "supervised_answers": len(turns.turns),
            "supervised_by_turn": {
                turn: {"answers": int(answers_by_turn[turn]), "tokens": int(tokens_by_turn[turn])}
                for turn in np.flatnonzero(answers_by_turn).tolist()
            },
            "padding_tokens": padded - rows_tokens,
            "padding_fraction": (padded - rows_tokens) / padded if padded else 0.0,
            **{name: int(columns[name].sum()) for name in COUNTERS if name != "trained_turns"},
            "cut_sessions": int((columns["windows"] > 0).sum()),
            "skipped_records": prepared.summary["skipped_records"],
            "dropped_trailing_questions": prepared.summary["dropped_trailing_questions"],
            "non_nfc_texts": prepared.summary["non_nfc_texts"],
            "normalized_texts": prepared.summary["normalized_texts"],
        }

    def check_supervision(self, split: str) -> None:
        """Raise when the policy of ``split``'s samples does not fit it: a setting for turns no session has
        (``ConfigError``), or no answer supervised (``NothingSupervisedError``)."""
        supervision, summary = self.spec_of(split).supervision, self.prepared(split).summary
        if not summary["sessions"]:
            return
        supervision.check_turns(summary["max_turns"], split)
        if supervision.name != "all" and not len(self.supervised_turns(split).tokens):
            raise NothingSupervisedError(
                f"{self.source.describe(split)}: trains on nothing: supervision={supervision.describe()} leaves 0 "
                f"supervised answers in the {split} split ({summary['sessions']} sessions of at most "
                f"{summary['max_turns']} turns)"
            )

    def require_batches(self, split: str) -> None:
        """Raise ``EmptySplitError`` when ``split`` gives no batch (no sample), saying what reading it found, and
        when its supervision policy trains nothing (``check_supervision``)."""
        self.check_supervision(split)
        stats = self.statistics(split)
        if stats["batches"] > 0:
            return
        if self.source.path is None and self.source.files[split] is None:
            raise EmptySplitError(f"no {split} data: give data.{split}_path (or data.path with data.holdout)")
        found = [f"{stats['sessions']} sessions read"]
        if self.source.holdout and stats["sessions"] == 0:  # the files were read: the holdout left none here
            read = sum(self.source.summary(s, self.cache_dir)["sessions"] for s in SPLITS)
            found = [f"data.holdout={self.source.holdout} puts none of the {read:,} sessions read in it"]
        if stats["skipped_records"]:
            found.append(f"{stats['skipped_records']} records skipped (first: {self.describe_skips(split, 1)[0]})")
        if stats["skipped_turns"]:
            found.append(f"{stats['skipped_turns']} turns skipped: their question alone is longer than "
                         f"data.max_seq_len={self.samples.max_seq_len}")  # fmt: skip
        raise EmptySplitError(f"{self.source.describe(split)}: no {split} sample: " + ", ".join(found))

    def window_warning(self, split: str) -> str | None:
        """A warning when the sessions cut into windows cost nearly what split samples of them would."""
        stats = self.statistics(split)
        windows, split_tokens = stats["window_tokens"], stats["window_split_tokens"]
        if not split_tokens or windows < WINDOW_WARNING_SHARE * split_tokens:
            return None
        return (
            f"{stats['cut_sessions']} {split} sessions longer than data.max_seq_len={self.samples.max_seq_len} were "
            f"cut into {stats['windows']} windows of {windows:,} tokens: {windows / split_tokens:.0%} of the "
            f"{split_tokens:,} that split samples of them take (each window repeats as much history as fits), so "
            "session samples save little on them; a larger data.max_seq_len keeps them whole"
        )

    def length_warning(self, split: str) -> str | None:
        """A warning when ``data.max_seq_len`` skips turns (a question alone longer) or cuts answers short."""
        stats = self.statistics(split)
        skipped, truncated = stats["skipped_turns"], stats["truncated_turns"]
        if not (skipped or truncated):
            return None
        found = [f"{skipped:,} skipped (the question alone is longer)"] if skipped else []
        found += [f"{truncated:,} answers cut short"] if truncated else []
        return (
            f"{split}: of {stats['turns']:,} turns, {' and '.join(found)} at data.max_seq_len="
            f"{self.samples.max_seq_len}; a larger data.max_seq_len keeps them whole"
        )

    def describe_skips(self, split: str, limit: int = 5) -> list[str]:
        """The first ``limit`` skipped records of ``split``, as messages."""
        return self.source.summary(split, self.cache_dir)["skipped"][:limit]


__all__ = ["SPLITS", "DialoguePipeline", "EmptySplitError", "NothingSupervisedError", "PreparedSplit"]
