"""Batches of rows: a fixed number of rows, a token budget, a budget of trained tokens, or the samples of a fixed
number of sessions; the same on every run and every rank."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from glm_session.data.packing import Rows, pack_first_fit_decreasing
from glm_session.errors import ConfigError, check_bool, check_choice, check_int

RowKey = int | tuple[int, ...]  # a row of the prepared split, or the samples of a row packed for one batch


def ghost(row: RowKey) -> RowKey:
    """The key of a ghost of ``row``: the same tokens, nothing trained or counted (``RowDataset``)."""
    return -1 - row if isinstance(row, int) else tuple(-1 - i for i in row)


class RowBatchSampler:
    """Batches of row indices for one split, deterministic in (seed, epoch).

    Args:
        lengths: tokens of every row.
        batch_size: rows per batch; or
        batch_tokens: a budget of padded tokens per batch (rows x widest row). Rows are then grouped by length
            within chunks of the shuffled order, so that batches pad little, and the batches are shuffled; or
        batch_supervised_tokens: a budget of trained tokens per batch (``supervised``: of every row): rows in the
            shuffled order, each batch closed where its trained tokens come nearest the budget.
        shuffle: a new order every epoch (``set_epoch``), else the rows' order.
        seed: the shuffling seed.
        num_replicas, rank: this process's share of the batches (``batches[rank::num_replicas]``); every rank
            gets as many batches: with ``drop_last`` the last few are left out, else ghost batches fill up.
        fixed_width: the width every batch is padded to (``pad_to=max_seq_len``), for the token budget.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int | None = None,
        batch_tokens: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        fixed_width: int | None = None,
        batch_supervised_tokens: int | None = None,
        supervised: Sequence[int] | None = None,
    ) -> None:
        if sum(x is not None for x in (batch_size, batch_tokens, batch_supervised_tokens)) != 1:
            raise ValueError("give exactly one of batch_size (rows), batch_tokens and batch_supervised_tokens")
        if batch_supervised_tokens is not None and supervised is None:
            raise ValueError("batch_supervised_tokens needs the trained tokens of every row (supervised)")
        if batch_tokens is not None and lengths and max(lengths) > batch_tokens:
            raise ConfigError(
                "data.batch_tokens", batch_tokens, f"at least the longest row ({max(lengths)} tokens)"
            )
        self.lengths = list(lengths)
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.batch_supervised_tokens = batch_supervised_tokens
        self.supervised = list(supervised) if supervised is not None else None
        self.shuffle, self.seed = shuffle, seed
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.fixed_width = fixed_width
        self.epoch = 0
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches of it already trained), when resuming

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> RowBatchSampler:
        """Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler`` at the start of every epoch: this."""
        return self

    def row_length(self, row: RowKey) -> int:
        return self.lengths[row]

    def all_batches(self, epoch: int | None = None) -> list[list[RowKey]]:
        """Every rank's batches of ``epoch``, in order."""
        epoch = self.epoch if epoch is None else epoch
        return self._for_replicas(self._batches(random.Random(f"{self.seed}-{epoch}")))

    def _batches(self, rng: random.Random) -> list[list[RowKey]]:
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.batch_size is not None:
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.batch_supervised_tokens is not None:
            return self._supervised_batches(order)
        batches = self._token_batches(order)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def _for_replicas(self, batches: list[list[RowKey]]) -> list[list[RowKey]]:
        if self.drop_last:
            return batches[: len(batches) - len(batches) % self.num_replicas]
        if len(batches) % self.num_replicas:
            # Every rank must run as many forward passes (sharded models gather parameters in each one): the
            # ranks short of a batch get a ghost of the last one (nothing trained).
            batches += [[ghost(row) for row in batches[-1]]] * (
                self.num_replicas - len(batches) % self.num_replicas
            )
        return batches

    def _supervised_batches(self, order: list[int]) -> list[list[int]]:
        """Rows in ``order``; a batch is closed before a row that would take it further from the budget."""
        budget, batches, batch, total = self.batch_supervised_tokens, [], [], 0
        for i in order:
            tokens = self.supervised[i]
            if batch and total + tokens - budget > budget - total:
                batches.append(batch)
                batch, total = [], 0
            batch.append(i)
            total += tokens
        if batch:
            batches.append(batch)
        return batches

    def _token_batches(self, order: list[int]) -> list[list[int]]:
        width_of = (lambda i: self.fixed_width) if self.fixed_width else (lambda i: self.lengths[i])
        chunk = max(1, 64 * self.batch_tokens // max(1, max(self.lengths, default=1)))
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            rows = sorted(order[start : start + chunk], key=lambda i: -self.lengths[i])
            batch: list[int] = []
            for i in rows:  # longest first, so a batch is as wide as its first row
                width = width_of(batch[0] if batch else i)
                if batch and (len(batch) + 1) * width > self.batch_tokens:
                    batches.append(batch)
                    batch = []
                batch.append(i)
            if batch:
                batches.append(batch)
        return batches

    @property
    def skip(self) -> int:
        """Batches of this epoch that were trained before the run was resumed."""
        return self.resume_at[1] if self.resume_at and self.resume_at[0] == self.epoch else 0

    def __iter__(self) -> Iterator[list[RowKey]]:
        mine = self.all_batches()[self.rank :: self.num_replicas]
        skip, self.resume_at = self.skip, None
        yield from mine[skip:]

    def __len__(self) -> int:
        """Batches of a whole epoch on this rank (resuming or not)."""
        return len(self.all_batches()[self.rank :: self.num_replicas])


class SessionGroupBatchSampler(RowBatchSampler):
    """Batches that each hold every sample of ``batch_sessions`` sessions, packed into rows within the batch.

    The sessions are shuffled (in ``(seed, epoch)``) and cut into groups; a batch is one group's samples. Whatever
    the strategy, the same seed gives the same groups: a split and a session run then train the same sessions in
    every step (``split_grouped`` of the strategy comparison). Rows are keyed by their sample indices.

    Args:
        sample_sessions: the session of every sample (``-1``: an empty sample, never batched).
        sample_lengths: the tokens of every sample.
        batch_sessions: sessions per batch.
        max_seq_len, packing: rows of at most ``max_seq_len`` tokens, packed first-fit-decreasing, else one sample
            each.
        the others: ``RowBatchSampler``'s.
    """

    def __init__(
        self,
        sample_sessions: Sequence[int],
        sample_lengths: Sequence[int],
        batch_sessions: int,
        max_seq_len: int,
        packing: bool,
        shuffle: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(sample_lengths, batch_size=batch_sessions, shuffle=shuffle, seed=seed,
                         num_replicas=num_replicas, rank=rank, drop_last=drop_last)  # fmt: skip
        self.max_seq_len, self.packing = max_seq_len, packing
        self.samples_of: dict[int, list[int]] = {}
        for sample, session in enumerate(sample_sessions):
            if session >= 0 and sample_lengths[sample] > 0:
                self.samples_of.setdefault(session, []).append(sample)

    def row_length(self, row: RowKey) -> int:
        return sum(self.lengths[i if i >= 0 else -1 - i] for i in row)

    def _batches(self, rng: random.Random) -> list[list[RowKey]]:
        sessions = sorted(self.samples_of)
        if self.shuffle:
            rng.shuffle(sessions)
        batches = []
        for start in range(0, len(sessions), self.batch_size):
            samples = [
                i for session in sessions[start : start + self.batch_size] for i in self.samples_of[session]
            ]
            if self.packing:
                rows = pack_first_fit_decreasing([self.lengths[i] for i in samples], self.max_seq_len)
                batches.append([tuple(samples[j] for j in row) for row in rows])
            else:
                batches.append([(i,) for i in samples])
        return batches


@dataclass(frozen=True)
class Batching:
    """How rows become batches, checked when built (the data group's keys of the same names).

    Args:
        batch_size: rows per batch; or ``batch_tokens``: padded tokens per batch (it wins when both are given).
        batch_sessions: training batches hold every sample of this many sessions (``SessionGroupBatchSampler``); or
        batch_supervised_tokens: training batches hold about this many trained tokens. Either replaces
            ``batch_size``/``batch_tokens`` for the training split; the other splits keep those.
        pad_to: ``longest`` (row of the batch) or ``max_seq_len`` (every row, as the article's code does).
        max_seq_len, packing: the rows' most tokens, and whether rows pack several samples.
        shuffle, seed: training order, new every epoch, the same on every run.
    """

    batch_size: int | None = 8
    batch_tokens: int | None = None
    batch_sessions: int | None = None
    batch_supervised_tokens: int | None = None
    pad_to: str = "longest"
    max_seq_len: int = 2048
    packing: bool = False
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("data.batch_size", self.batch_size, minimum=1, optional=True)
        check_int("data.batch_tokens", self.batch_tokens, minimum=1, optional=True)
        if self.batch_tokens is not None:
            object.__setattr__(self, "batch_size", None)
        elif self.batch_size is None:
            raise ConfigError(
                "data.batch_size", None, "given when data.batch_tokens is null (rows or tokens a batch)"
            )
        check_int("data.batch_sessions", self.batch_sessions, minimum=1, optional=True)
        check_int("data.batch_supervised_tokens", self.batch_supervised_tokens, minimum=1, optional=True)
        if self.batch_sessions is not None and self.batch_supervised_tokens is not None:
            raise ConfigError(
                "data.batch_supervised_tokens", self.batch_supervised_tokens, "null with data.batch_sessions"
            )
        check_choice("data.pad_to", self.pad_to, ("longest", "max_seq_len"))
        check_bool("data.packing", self.packing)
        check_bool("data.shuffle", self.shuffle)
        check_int("data.seed", self.seed)

    @property
    def width(self) -> int | None:
        """The width every batch is padded to, or ``None``: its longest row."""
        return self.max_seq_len if self.pad_to == "max_seq_len" else None

    def sampler(
        self, train: bool, rows: Rows, sample_sessions: Sequence[int], sample_lengths: Sequence[int],
        num_replicas: int = 1, rank: int = 0,
    ) -> RowBatchSampler:  # fmt: skip
        """The batch sampler of a split's ``rows`` (``train``: shuffled, the training batch sizes, last batches of
        an uneven share left out; otherwise in order, ghost batches filling the ranks' shares)."""
        replicas = {"num_replicas": num_replicas, "rank": rank}
        if train and self.batch_sessions is not None:
            return SessionGroupBatchSampler(sample_sessions, sample_lengths, self.batch_sessions, self.max_seq_len,
                                            self.packing, shuffle=self.shuffle, seed=self.seed, drop_last=True,
                                            **replicas)  # fmt: skip
        budget = {"batch_size": self.batch_size, "batch_tokens": self.batch_tokens}
        if train and self.batch_supervised_tokens is not None:
            budget = {"batch_supervised_tokens": self.batch_supervised_tokens, "supervised": rows.supervised}
        return RowBatchSampler(rows.lengths, shuffle=self.shuffle and train, seed=self.seed, drop_last=train,
                               fixed_width=self.width, **budget, **replicas)  # fmt: skip
