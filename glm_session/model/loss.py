"""The loss: a pure function of logits, labels and the turn and sample of every token.

Every reduction is written as ``sum_t w_t * loss_t / D`` over the supervised tokens t of one optimizer step, where
the weight w_t depends only on the token's own sample or turn (so it is known inside its micro-batch) and the
denominator D is a count over the whole step (all micro-batches, all devices):

======== ============================ =========================
reduction w_t                          D
======== ============================ =========================
token     1                            supervised tokens
sample    1 / tokens of t's sample     samples
turn      1 / tokens of t's turn       answer turns
sum       1                            1
======== ============================ =========================

A micro-batch contributes its numerator ``sum_t w_t * loss_t`` and its counts; the training module divides by
the step's global D (DESIGN §2: a global count, not a mean of per-micro-batch means).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glm_session.constants import IGNORE_INDEX

REDUCTIONS = ("token", "sample", "turn", "sum")
COUNT_NAMES = ("tokens", "samples", "turns")


@dataclass
class LossTerms:
    """One micro-batch's share of the step loss.

    Attributes:
        numerator: ``sum_t w_t * loss_t`` (a scalar that carries the gradient).
        counts: (3,) supervised tokens, samples and answer turns in this micro-batch.
        losses: (N,) the loss of every supervised token, detached.
        turns: (N,) the turn index of every supervised token.
    """

    numerator: torch.Tensor
    counts: torch.Tensor
    losses: torch.Tensor
    turns: torch.Tensor


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the label at t+1 given the logits at t, in fp32; 0 where the label is ignored.

    Args:
        logits: (B, T, V).
        labels: (B, T), aligned with the inputs (Hugging Face style): the loss shifts them.

    Returns:
        (B, T - 1).
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return losses.view(shift_labels.shape)


def _inverse_group_sizes(keys: torch.Tensor) -> tuple[torch.Tensor, int]:
    """For each key, 1 / (how often it occurs); and the number of distinct keys."""
    _, inverse, sizes = torch.unique(keys, return_inverse=True, return_counts=True)
    return 1.0 / sizes[inverse].to(torch.float32), sizes.numel()


def loss_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    turn_ids: torch.Tensor,
    sample_index: torch.Tensor,
    reduction: str,
) -> LossTerms:
    """The numerator and counts of one micro-batch (see the module docstring).

    Args:
        logits: (B, T, V).
        labels: (B, T), ``IGNORE_INDEX`` where nothing is trained.
        turn_ids: (B, T) the session turn of every token.
        sample_index: (B, T) a sample id, unique within the step, of every token.
        reduction: ``token``, ``sample``, ``turn`` or ``sum``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown loss reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    losses = token_losses(logits, labels)  # (B, T-1)
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    losses = losses[mask]  # (N,)
    turns = turn_ids[:, 1:][mask]  # (N,)
    samples = sample_index[:, 1:][mask]  # (N,)
    # A turn is trained in exactly one sample, so (sample, turn) names it within the step.
    turn_keys = samples * (int(turn_ids.max()) + 1) + turns
    per_sample, n_samples = _inverse_group_sizes(samples)
    per_turn, n_turns = _inverse_group_sizes(turn_keys)
    weights = {"token": None, "sum": None, "sample": per_sample, "turn": per_turn}[reduction]
    numerator = losses.sum() if weights is None else (weights * losses).sum()
    counts = torch.tensor([losses.numel(), n_samples, n_turns], dtype=torch.float64, device=losses.device)
    return LossTerms(numerator, counts, losses.detach(), turns)


def denominator(counts: torch.Tensor, reduction: str) -> torch.Tensor:
    """D of ``reduction`` from the step's global (tokens, samples, turns) counts (at least 1)."""
    if reduction == "sum":
        return torch.ones((), dtype=counts.dtype, device=counts.device)
    return counts[{"token": 0, "sample": 1, "turn": 2}[reduction]].clamp(min=1)


def reduce_loss(terms: list[LossTerms], reduction: str) -> torch.Tensor:
    """The step loss of micro-batches on one device: ``sum of numerators / D`` (for tests and analysis)."""
    counts = torch.stack([t.counts for t in terms]).sum(0)
    return torch.stack([t.numerator for t in terms]).sum() / denominator(counts, reduction).to(torch.float32)
