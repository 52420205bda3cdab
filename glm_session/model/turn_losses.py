"""The per-turn loss meter of training, validation and evaluation: summed losses and token counts of the trained
tokens by turn index, on the device, without a host synchronisation; by group too (a session, in evaluation)."""

from __future__ import annotations

import math
from typing import Any

import torch

MAX_TURNS = 64  # turn indices above this are counted with it


class TurnLossMeter(torch.nn.Module):
    """Sums and counts of trained-token losses by (group, turn).

    Args:
        groups: how many groups (sessions) to keep apart; 1 keeps turns only.
        max_turn: turn indices above it are counted with it.
    """

    def __init__(self, groups: int = 1, max_turn: int = MAX_TURNS) -> None:
        super().__init__()
        self.groups, self.width = groups, max_turn + 1
        self.register_buffer("sums", torch.zeros(groups * self.width, dtype=torch.float64), persistent=False)
        self.register_buffer("counts", torch.zeros(groups * self.width, dtype=torch.float64), persistent=False)

    def add(
        self, losses: torch.Tensor, mask: torch.Tensor, turns: torch.Tensor, groups: torch.Tensor | None = None
    ) -> None:
        """Add the losses (B, T-1) of the trained positions (``mask``) to their turn's (and group's) sum and count."""
        index = turns.flatten().clamp(max=self.width - 1)
        if groups is not None:  # positions outside every group are not trained: their weight is 0
            index = index + groups.flatten().clamp(min=0) * self.width
        self.sums.index_add_(0, index, (losses.detach() * mask).flatten().double())
        self.counts.index_add_(0, index, mask.flatten().double())

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()

    def by_group(self) -> dict[int, dict[int, list]]:
        """``{group: {turn: [loss sum, tokens]}}`` of the groups and turns that have tokens (one host copy)."""
        sums, counts = (
            self.sums.view(self.groups, self.width).cpu(),
            self.counts.view(self.groups, self.width).cpu(),
        )
        out: dict[int, dict[int, list]] = {}
        for group, turn in torch.nonzero(counts).tolist():
            out.setdefault(group, {})[turn] = [sums[group, turn].item(), int(counts[group, turn].item())]
        return out


def summarise(sums: torch.Tensor, counts: torch.Tensor) -> dict[str, Any]:
    """Token-mean loss and perplexity, overall and by turn, of per-turn sums and counts (1-D, index = turn)."""
    by_turn = {int(k): (sums[k] / counts[k]).item() for k in torch.nonzero(counts).flatten()}
    total = counts.sum().item()
    loss = sums.sum().item() / total if total else math.nan
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if total else math.nan,
        "loss_by_turn": by_turn,
        "perplexity_by_turn": {turn: math.exp(value) for turn, value in by_turn.items()},
        "tokens": int(total),
    }
