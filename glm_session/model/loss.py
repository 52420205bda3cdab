"""The loss: a pure function of logits, labels and the turn and sample of every token.

Every reduction is written as ``sum_t w_t * loss_t / D`` over the supervised tokens t of one optimizer step, where
the weight w_t depends only on the token's own sample or turn (so it is known inside its micro-batch) and the
denominator D is a count over the whole step (all micro-batches, all devices). ``w_k`` is the supervision policy's
weight of t's turn (``supervision.py``; 1 for every turn by default): it acts in the numerator only.

======== ============================ =================================
reduction w_t                          D
======== ============================ =================================
token     w_k                          supervised tokens
sample    w_k / tokens of t's sample   samples holding a supervised token
turn      w_k / tokens of t's turn     supervised answer turns
sum       w_k                          1
======== ============================ =================================

A micro-batch contributes its numerator ``sum_t w_t * loss_t`` and its counts; the training module divides by
the step's global D (DESIGN §2: a global count, not a mean of per-micro-batch means).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from glm_session.constants import IGNORE_INDEX
from glm_session.supervision import LossWeights, loss_weights, supervised

REDUCTIONS = ("token", "sample", "turn", "sum")
COUNT_NAMES = ("tokens", "samples", "turns")


@dataclass
class LossTerms:
    """One micro-batch's share of the step loss.

    Attributes:
        numerator: ``sum_t w_t * loss_t`` (a scalar that carries the gradient).
        counts: (3,) supervised tokens, samples and answer turns in this micro-batch.
        losses: (B, T-1) the loss of every position, detached; 0 where nothing is trained.
        mask: (B, T-1) the trained positions.
        turns: (B, T-1) the turn index of every position.
    """

    numerator: torch.Tensor
    counts: torch.Tensor
    losses: torch.Tensor
    mask: torch.Tensor
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


def chunked_token_losses(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_tokens: int,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """``token_losses(head(hidden), labels)``, with logits made only at the trained positions, ``chunk_tokens``
    of them at a time, and made again in the backward pass: the (B, T, V) logits never exist.

    Args:
        hidden: (B, T, d) the final hidden states (after the last norm).
        head: the output layer, (n, d) -> (n, V): the model's ``lm_head``, a LoRA adapter on it included.
        labels: (B, T).
        chunk_tokens: trained positions per chunk.
        positions: the trained positions, flattened over (B, T-1) (the collator's ``supervised_positions``);
            ``None``: computed here (a host synchronisation).

    Returns:
        (B, T - 1), 0 where the label is ignored.
    """
    batch, length, width = hidden.shape
    if positions is None:
        positions = supervised(labels).flatten().nonzero().squeeze(1)
    trained = hidden[:, :-1].reshape(-1, width).index_select(0, positions)  # (N, d)
    targets = labels[:, 1:].reshape(-1).index_select(0, positions)  # (N,)
    chunks = [
        checkpoint(_cross_entropy, head, trained[i : i + chunk_tokens], targets[i : i + chunk_tokens],
                   use_reentrant=False)
        for i in range(0, positions.numel(), chunk_tokens)
    ]  # fmt: skip
    losses = torch.zeros(batch * (length - 1), dtype=torch.float32, device=hidden.device)
    if chunks:
        losses = losses.index_put((positions,), torch.cat(chunks))
    return losses.view(batch, length - 1)


def _cross_entropy(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = head(hidden)  # (n, V), in the autocast dtype as the model's own output layer
    return F.cross_entropy(logits.float(), targets, reduction="none")


def loss_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    turn_ids: torch.Tensor,
    sample_index: torch.Tensor,
    reduction: str,
    weights: LossWeights | None = None,
) -> LossTerms:
    """The numerator and counts of one micro-batch from its logits (see the module docstring and ``reduce``)."""
    return reduce(token_losses(logits, labels), labels, turn_ids, sample_index, reduction, weights)


def reduce(
    losses: torch.Tensor,
    labels: torch.Tensor,
    turn_ids: torch.Tensor,
    sample_index: torch.Tensor,
    reduction: str,
    weights: LossWeights | None = None,
) -> LossTerms:
    """The numerator and counts of one micro-batch from the loss of every position.

    Args:
        losses: (B, T-1) the loss of the label at t+1 (``token_losses`` or ``chunked_token_losses``), 0 where it
            is ignored.
        labels: (B, T), ``IGNORE_INDEX`` where nothing is trained.
        turn_ids: (B, T) the session turn of every token.
        sample_index: (B, T) a sample id, unique within the step, of every token.
        reduction: ``token``, ``sample``, ``turn`` or ``sum``.
        weights: the batch's ``supervision.loss_weights`` when the collator has computed them (on the CPU, so that
            the step needs no synchronisation, with the supervision policy's turn weights); computed here otherwise,
            every turn weighing 1.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown loss reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    if weights is None:
        weights = loss_weights(labels, turn_ids, sample_index)
    weight = {"token": weights.token, "sum": weights.token, "sample": weights.sample, "turn": weights.turn}[
        reduction
    ]
    numerator = (weight * losses).sum()
    return LossTerms(numerator, weights.counts, losses.detach(), supervised(labels), turn_ids[:, 1:])


def denominator(counts: torch.Tensor, reduction: str) -> torch.Tensor:
    """D of ``reduction`` from the step's global (tokens, samples, turns) counts (at least 1)."""
    if reduction == "sum":
        return torch.ones((), dtype=counts.dtype, device=counts.device)
    return counts[{"token": 0, "sample": 1, "turn": 2}[reduction]].clamp(min=1)


def reduce_loss(terms: list[LossTerms], reduction: str) -> torch.Tensor:
    """The step loss of micro-batches on one device: ``sum of numerators / D`` (for tests and analysis)."""
    counts = torch.stack([t.counts for t in terms]).sum(0)
    return torch.stack([t.numerator for t in terms]).sum() / denominator(counts, reduction).to(torch.float32)
