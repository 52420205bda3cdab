"""Rows of samples -> padded batch tensors, as the model sees them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch

from glm_session.constants import IGNORE_INDEX

ROW_COLUMNS = ("input_ids", "labels", "turn_ids", "session_index", "length")


class RowDataset(torch.utils.data.Dataset):
    """Row ``i`` is the concatenation of the samples ``rows[i]`` (one sample per row without packing).

    Every sample keeps its own position ids (0, 1, ...), so transformers sees where one ends and the next begins
    and keeps attention block-diagonal; ``sample_index`` is the sample's row in ``samples``.
    """

    def __init__(self, samples: datasets.Dataset, rows: Sequence[Sequence[int]]) -> None:
        self.samples = samples.select_columns(list(ROW_COLUMNS))
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if index < 0:  # a ghost of row -1 - index: the same tokens, nothing trained or counted
            row = self[-1 - index]
            n = len(row["input_ids"])
            return {**row, "labels": [IGNORE_INDEX] * n, "sample_index": [-1] * n, "session_index": [-1] * n}
        indices = list(self.rows[index])
        batch = self.samples[indices]
        row: dict[str, list[int]] = {name: [] for name in ("input_ids", "labels", "turn_ids")}
        row["position_ids"], row["session_index"], row["sample_index"] = [], [], []
        for j, sample_index in enumerate(indices):
            length = batch["length"][j]
            for name in ("input_ids", "labels", "turn_ids"):
                row[name] += batch[name][j]
            row["position_ids"] += range(length)
            row["session_index"] += [batch["session_index"][j]] * length
            row["sample_index"] += [sample_index] * length
        return row


@dataclass
class Collator:
    """Pad rows at their end to the longest row of the batch (or to ``width``).

    Padding: ``pad_id`` inputs, ignored labels, turn 0, session and sample index -1. Its position ids continue
    those of the row's last sample, so a row holding one sample stays one causal sequence (no block mask
    needed); the padded positions come after every real token, so they never change a real token's logits.
    """

    pad_id: int
    width: int | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        width = self.width or longest
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if width < longest:
            raise ValueError(f"a row of {longest} tokens does not fit the batch width {width}")
        shape = (len(rows), width)
        batch = {
            "input_ids": torch.full(shape, self.pad_id, dtype=torch.long),
            "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.zeros(shape, dtype=torch.long),
            "turn_ids": torch.zeros(shape, dtype=torch.long),
            "session_index": torch.full(shape, -1, dtype=torch.long),
            "sample_index": torch.full(shape, -1, dtype=torch.long),
        }
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            for name, tensor in batch.items():
                tensor[b, :n] = torch.tensor(row[name], dtype=torch.long)
            last = row["position_ids"][-1]
            batch["position_ids"][b, n:] = torch.arange(last + 1, last + 1 + width - n)
        return batch
