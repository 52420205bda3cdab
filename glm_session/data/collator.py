"""Rows of samples -> padded batch tensors, as the model sees them, with what the loss and the run's counters need
(computed here, on the CPU, so that the training step needs no host synchronisation)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import torch

from glm_session.constants import IGNORE_INDEX
from glm_session.data.batching import ghost
from glm_session.supervision import loss_weights, supervised

ROW_COLUMNS = ("input_ids", "labels", "turn_ids", "turn_weights", "session_index", "length")
# The per-token fields of a batch: the rows as the model is fed (``python -m glm_session.data export`` writes these,
# and ``WEIGHT_FIELD`` when the supervision policy weighs turns).
ROW_FIELDS = ("input_ids", "labels", "position_ids", "turn_ids", "session_index", "sample_index")
WEIGHT_FIELD = "loss_weight"  # the supervision weight w_k of every trained label, 0 where nothing is trained


class RowDataset(torch.utils.data.Dataset):
    """Row ``i`` is the concatenation of the samples ``rows[i]`` (one sample per row without packing); a tuple of
    sample indices is the row of those samples (batch samplers that pack per batch).

    Every sample keeps its own position ids (0, 1, ...), so transformers sees where one ends and the next begins
    and keeps attention block-diagonal; ``sample_index`` is the sample's row in ``samples``; ``sample_lengths`` and
    ``turn_weights`` are each sample's tokens and supervision weights by turn id (the collator makes the per-token
    weights of them).
    """

    def __init__(self, samples: datasets.Dataset, rows: Sequence[Sequence[int]]) -> None:
        self.samples = samples.select_columns(list(ROW_COLUMNS))
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int | tuple[int, ...]) -> dict[str, list[int]]:
        if isinstance(index, int) and index < 0 or isinstance(index, tuple) and index[0] < 0:
            row = self[ghost(index)]  # a ghost (batching.ghost) of that row: the same tokens, nothing counted
            n = len(row["input_ids"])
            untrained = {"labels": [IGNORE_INDEX] * n, "sample_index": [-1] * n, "session_index": [-1] * n}
            return {**row, **untrained, "sample_lengths": [], "turn_weights": []}
        indices = list(index) if isinstance(index, tuple) else list(self.rows[index])
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
        row["sample_lengths"], row["turn_weights"] = list(batch["length"]), list(batch["turn_weights"])
        return row


@dataclass
class Collator:
    """Pad rows at their end to the longest row of the batch (or to ``width``).

    Padding: ``pad_id`` inputs, ignored labels, turn 0, session and sample index -1, weight 0. Its position ids continue
    those of the row's last sample, so a row holding one sample stays one causal sequence (no block mask
    needed); the padded positions come after every real token, so they never change a real token's logits.

    Besides ``ROW_FIELDS`` a batch holds ``loss_weight`` (B, T): the supervision weight of every trained label (its
    sample's ``turn_weights`` at its turn; 0 where nothing is trained), the loss weights of
    ``supervision.loss_weights`` (``token_weight``, ``sample_weight``, ``turn_weight``, ``loss_counts``), the trained
    positions flattened over (B, T-1) (``supervised_positions``, for the chunked loss), and as plain Python numbers,
    which stay on the CPU when Lightning moves the batch: ``sample_lengths`` (every sample's tokens) and
    ``supervised_tokens``.
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
        pads = {"input_ids": self.pad_id, "labels": IGNORE_INDEX, "turn_ids": 0, "session_index": -1,
                "sample_index": -1}  # fmt: skip
        columns: dict[str, list[int]] = {name: [] for name in ROW_FIELDS}
        for row in rows:  # one flat list per field, turned into a tensor at once (torch.tensor of lists is slow)
            n = len(row["input_ids"])
            for name, pad in pads.items():
                columns[name] += row[name]
                columns[name] += [pad] * (width - n)
            last = row["position_ids"][-1]
            columns["position_ids"] += row["position_ids"]
            columns["position_ids"] += range(last + 1, last + 1 + width - n)
        shape = (len(rows), width)
        batch = {name: torch.from_numpy(np.array(values, dtype=np.int64)).view(shape)
                 for name, values in columns.items()}  # fmt: skip
        lengths = [row.get("sample_lengths") or _run_lengths(row) for row in rows]
        batch[WEIGHT_FIELD] = _token_weights([row["turn_weights"] for row in rows], lengths, batch)
        weights = loss_weights(batch["labels"], batch["turn_ids"], batch["sample_index"], batch[WEIGHT_FIELD])
        batch.update(token_weight=weights.token, sample_weight=weights.sample, turn_weight=weights.turn,
                     loss_counts=weights.counts)  # fmt: skip
        batch["supervised_positions"] = supervised(batch["labels"]).flatten().nonzero().squeeze(1)
        batch["sample_lengths"] = [n for row_lengths in lengths for n in row_lengths]
        batch["supervised_tokens"] = int(weights.counts[0])
        return batch


def _token_weights(
    turn_weights: Sequence[Sequence[Sequence[float]]],
    lengths: Sequence[Sequence[int]],
    batch: dict[str, torch.Tensor],
) -> torch.Tensor:
    """(B, T) the supervision weight of every trained label: each row's samples' ``turn_weights`` (one list by turn id
    per sample) looked up at the token's turn, 0 where the label is not trained. One table lookup for the batch."""
    tables = [weights for row in turn_weights for weights in row]
    turn_ids = batch["turn_ids"].numpy()
    width = max([int(turn_ids.max()) + 1, *map(len, tables)])  # ghosts keep their turn ids but have no table
    table = np.zeros((len(tables) + 1, width), dtype=np.float32)  # the last row: padding and ghosts
    for i, weights in enumerate(tables):
        table[i, : len(weights)] = weights
    slots = np.full(tuple(batch["turn_ids"].shape), len(tables))  # (B, T) the table row of every position
    first = 0
    for b, row_lengths in enumerate(lengths):
        slots[b, : sum(row_lengths)] = np.repeat(np.arange(first, first + len(row_lengths)), row_lengths)
        first += len(row_lengths)
    weights = table[slots, turn_ids] * (batch["labels"].numpy() != IGNORE_INDEX)
    return torch.from_numpy(weights.astype(np.float32))


def _run_lengths(row: dict[str, list[int]]) -> list[int]:
    """The lengths of a row's samples, from its ``sample_index`` (padding and ghosts, -1, left out)."""
    return [len(list(run)) for sample, run in itertools.groupby(row["sample_index"]) if sample >= 0]
