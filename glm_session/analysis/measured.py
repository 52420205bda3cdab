"""Measured per-turn weights: decompose a real step gradient, computed with autograd, into per-turn gradients.

For a batch and a reduction, the step gradient is ``g = grad L`` with ``L`` the training loss (``loss.py``, with the
batch's supervision weights). For each trained turn k (turns with the same content key merged), ``h_k`` is the
gradient of the mean token loss of that turn. The coefficients c with ``g = sum_k c_k h_k`` are found by least
squares (normal equations in float64); they are the measured weights, to be compared with
``weights.exact_coefficients`` (not normalised, so that a wrong scale of the loss shows). The directions h_k do not
depend on the reduction: ``turn_directions`` computes them once, one row of the batch at a time.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from glm_session.model.loss import loss_terms, reduce_loss, token_losses
from glm_session.supervision import loss_weights, supervised


def _flat_grad(loss: torch.Tensor, parameters: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, parameters, strict=True)]
    )


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], rows: slice = slice(None)) -> torch.Tensor:
    return model(
        input_ids=batch["input_ids"][rows], position_ids=batch["position_ids"][rows], use_cache=False
    ).logits


@dataclass
class TurnDirections:
    """The trained turns of a batch (``names``: content keys) and the gradient of each one's token-mean loss
    (``vectors``: (K, P) float64)."""

    names: list[Hashable]
    vectors: torch.Tensor


def turn_directions(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], keys: torch.Tensor | None = None
) -> TurnDirections:
    """h_k of every trained content k of ``batch`` (see ``measured_weights`` for ``keys``), one row at a time: a
    row's backward passes never run through the other rows' logits."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    mask = supervised(batch["labels"])  # (B, T-1)
    if keys is None:  # (session, turn) of every trained position
        trained = list(zip(batch["session_index"][:, 1:][mask].tolist(), batch["turn_ids"][:, 1:][mask].tolist(),
                           strict=True))  # fmt: skip
        names = list(dict.fromkeys(trained))
    else:
        trained = keys[:, 1:][mask].tolist()
        names = sorted(set(trained))
    index = {name: i for i, name in enumerate(names)}
    token_keys = torch.full(mask.shape, -1, dtype=torch.long)  # (B, T-1) the content of every trained position
    token_keys[mask] = torch.tensor([index[key] for key in trained], dtype=torch.long)
    sizes = torch.bincount(token_keys[mask], minlength=len(names))  # tokens of each content, over all rows
    vectors = torch.zeros(len(names), sum(p.numel() for p in parameters), dtype=torch.float64)
    for row in range(mask.shape[0]):
        present = token_keys[row][mask[row]].unique().tolist()
        if not present:
            continue
        losses = token_losses(_logits(model, batch, slice(row, row + 1)), batch["labels"][row : row + 1])[0]
        for k in present:  # h_k = sum over rows of (the row's loss sum of k) / (all tokens of k)
            vectors[k] += _flat_grad(losses[token_keys[row] == k].sum() / sizes[k], parameters).double()
    return TurnDirections(names, vectors)


def measured_weights(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    reduction: str,
    keys: torch.Tensor | None = None,
    directions: TurnDirections | None = None,
) -> tuple[dict[Hashable, float], float]:
    """Measured share of every trained content in the gradient of ``batch`` under ``reduction``.

    Args:
        model: a causal LM returning ``.logits`` (fp32 for a precise answer).
        batch: the collator's dict (``input_ids``, ``position_ids``, ``labels``, ``turn_ids``, ``sample_index``,
            ``session_index`` and, for a supervision policy's weights, ``loss_weight``).
        reduction: ``token``, ``sample``, ``turn`` or ``sum``.
        keys: (B, T) integer content key of every token (equal keys merge); default (session, turn).
        directions: ``turn_directions(model, batch, keys)`` when already computed (they serve every reduction).

    Returns:
        The coefficients c_k by key (``(session, turn)`` tuples by default, else the key integers), not normalised,
        so that they show the gradient's scale too (``weights.exact_coefficients``), and the relative residual
        ``|g - sum_k c_k h_k| / |g|`` (0 when the decomposition is exact).
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    labels, turn_ids, sample_index = batch["labels"], batch["turn_ids"], batch["sample_index"]
    weights = loss_weights(labels, turn_ids, sample_index, batch.get("loss_weight"))
    terms = loss_terms(_logits(model, batch), labels, turn_ids, sample_index, reduction, weights)
    step_gradient = _flat_grad(reduce_loss([terms], reduction), parameters).double()
    directions = directions or turn_directions(model, batch, keys)
    vectors = directions.vectors  # (K, P)
    coefficients = torch.linalg.solve(vectors @ vectors.T, vectors @ step_gradient)  # (K,)
    residual = (step_gradient - coefficients @ vectors).norm() / step_gradient.norm()
    return {name: c.item() for name, c in zip(directions.names, coefficients, strict=True)}, residual.item()
