"""Which tokens are trained, and the per-token weights of the loss reductions: the one place that computes them.

Labels are aligned with the inputs (Hugging Face style): the label at position t is predicted from the logits at
t - 1, so the loss runs over positions 1..T-1, and ``supervised(labels)`` (B, T-1) marks the trained ones. The
collator computes ``loss_weights`` of every batch on the CPU, with the batch's token counts, so that the training
step needs no host synchronisation to normalise its loss (``model/loss.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm_session.constants import IGNORE_INDEX


def supervised(labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) True where the label of position t + 1 is trained."""
    return labels[:, 1:] != IGNORE_INDEX


@dataclass
class LossWeights:
    """Per-token weights of the ``sample`` and ``turn`` reductions, and the counts of their denominators.

    Attributes:
        sample: (B, T-1) 1 / (trained tokens of the token's sample) where trained, else 0.
        turn: (B, T-1) 1 / (trained tokens of the token's answer turn) where trained, else 0.
        counts: (3,) float64: trained tokens, samples, answer turns.
    """

    sample: torch.Tensor
    turn: torch.Tensor
    counts: torch.Tensor


def _inverse_group_sizes(keys: torch.Tensor) -> tuple[torch.Tensor, int]:
    """For each key, 1 / (how often it occurs); and the number of distinct keys."""
    _, inverse, sizes = torch.unique(keys, return_inverse=True, return_counts=True)
    return 1.0 / sizes[inverse].to(torch.float32), sizes.numel()


def loss_weights(labels: torch.Tensor, turn_ids: torch.Tensor, sample_index: torch.Tensor) -> LossWeights:
    """The weights of every trained token of a batch.

    Args:
        labels: (B, T), ``IGNORE_INDEX`` where nothing is trained.
        turn_ids: (B, T) the session turn of every token.
        sample_index: (B, T) a sample id, unique within the step, of every token.
    """
    mask = supervised(labels)  # (B, T-1)
    samples = sample_index[:, 1:][mask]  # (N,)
    turns = turn_ids[:, 1:][mask]  # (N,)
    # A turn is trained in exactly one sample, so (sample, turn) names it within the step.
    turn_keys = samples * (int(turns.max()) + 1 if turns.numel() else 1) + turns
    per_sample, n_samples = _inverse_group_sizes(samples)
    per_turn, n_turns = _inverse_group_sizes(turn_keys)
    sample_weight = torch.zeros(mask.shape, dtype=torch.float32, device=labels.device)
    turn_weight = torch.zeros(mask.shape, dtype=torch.float32, device=labels.device)
    sample_weight[mask] = per_sample
    turn_weight[mask] = per_turn
    counts = torch.tensor([samples.numel(), n_samples, n_turns], dtype=torch.float64, device=labels.device)
    return LossWeights(sample_weight, turn_weight, counts)
