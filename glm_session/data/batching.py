"""Batches of rows: a fixed number of rows, or a token budget; the same on every run and every rank."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from glm_session.errors import ConfigError


class RowBatchSampler:
    """Batches of row indices for one split, deterministic in (seed, epoch).

    Args:
        lengths: tokens of every row.
        batch_size: rows per batch; or
        batch_tokens: a budget of padded tokens per batch (rows x widest row). Rows are then grouped by length
            within chunks of the shuffled order, so that batches pad little, and the batches are shuffled.
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
    ) -> None:
        if (batch_size is None) == (batch_tokens is None):
            raise ValueError("give exactly one of batch_size (rows) and batch_tokens")
        if batch_tokens is not None and lengths and max(lengths) > batch_tokens:
            raise ConfigError(
                "data.batch_tokens", batch_tokens, f"at least the longest row ({max(lengths)} tokens)"
            )
        self.lengths = list(lengths)
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
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

    def all_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every rank's batches of ``epoch``, in order."""
        epoch = self.epoch if epoch is None else epoch
        order = list(range(len(self.lengths)))
        rng = random.Random(f"{self.seed}-{epoch}")
        if self.shuffle:
            rng.shuffle(order)
        if self.batch_size is not None:
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        else:
            batches = self._token_batches(order)
            if self.shuffle:
                rng.shuffle(batches)
        if self.drop_last:
            batches = batches[: len(batches) - len(batches) % self.num_replicas]
        elif len(batches) % self.num_replicas:
            # Every rank must run as many forward passes (sharded models gather parameters in each one): the
            # ranks short of a batch get a ghost of the last one, its row indices as -1 - row (nothing trained).
            ghost = [-1 - i for i in batches[-1]]
            batches += [ghost] * (self.num_replicas - len(batches) % self.num_replicas)
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

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.all_batches()[self.rank :: self.num_replicas]
        skip, self.resume_at = self.skip, None
        yield from mine[skip:]

    def __len__(self) -> int:
        """Batches of a whole epoch on this rank (resuming or not)."""
        return len(self.all_batches()[self.rank :: self.num_replicas])
