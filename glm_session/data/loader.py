"""A DataLoader that Lightning can save and restore in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from glm_session.data.batching import RowBatchSampler


class ResumableDataLoader(torch.utils.data.DataLoader):
    """Counts the batches it hands out; Lightning stores ``state_dict()`` in checkpoints and, when resuming in
    the middle of an epoch, calls ``load_state_dict`` so that the epoch goes on with the next batch.

    Its length stays that of the whole epoch: Lightning knows how many batches of it were already trained.
    """

    batch_sampler: RowBatchSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handed_out = 0

    def __iter__(self) -> Iterator[Any]:
        self._handed_out = self.batch_sampler.skip
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch, "batches": self._handed_out}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Go on after ``batches`` batches of epoch ``epoch`` (nothing to skip in any other epoch)."""
        self.batch_sampler.resume_at = (state_dict["epoch"], state_dict["batches"])
