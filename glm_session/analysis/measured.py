"""Measured per-turn weights: decompose a real step gradient, computed with autograd, into per-turn gradients.

For a batch and a reduction, the step gradient is ``g = grad L`` with ``L`` the training loss (``loss.py``). For
each trained turn k (turns with the same content key merged), ``h_k`` is the gradient of the mean token loss of
that turn. The coefficients c with ``g = sum_k c_k h_k`` are found by least squares (normal equations in float64);
they are the measured weights, to be compared with ``weights.exact_coefficients`` (not normalised, so that a wrong
scale of the loss shows).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from glm_session.model.loss import loss_terms, reduce_loss, token_losses
from glm_session.supervision import loss_weights, supervised


def _flat_grad(loss: torch.Tensor, parameters: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, parameters, strict=True)]
    )


def measured_weights(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    reduction: str,
    keys: torch.Tensor | None = None,
) -> tuple[dict[Hashable, float], float]:
    """Measured share of every trained content in the gradient of ``batch`` under ``reduction``.

    Args:
        model: a causal LM returning ``.logits`` (fp32 for a precise answer).
        batch: the collator's dict (``input_ids``, ``position_ids``, ``labels``, ``turn_ids``, ``sample_index``,
            ``session_index`` and, for a supervision policy's weights, ``loss_weight``).
        reduction: ``token``, ``sample``, ``turn`` or ``sum``.
        keys: (B, T) integer content key of every token (equal keys merge); default (session, turn).

    Returns:
        The coefficients c_k by key (``(session, turn)`` tuples by default, else the key integers), not normalised,
        so that they show the gradient's scale too (``weights.exact_coefficients``), and the relative residual
        ``|g - sum_k c_k h_k| / |g|`` (0 when the decomposition is exact).
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    labels, turn_ids, sample_index = batch["labels"], batch["turn_ids"], batch["sample_index"]
    weights = loss_weights(labels, turn_ids, sample_index, batch.get("loss_weight"))
    terms = loss_terms(logits, labels, turn_ids, sample_index, reduction, weights)
    step_gradient = _flat_grad(reduce_loss([terms], reduction), parameters).double()

    losses = token_losses(logits, batch["labels"])  # (B, T-1)
    mask = supervised(batch["labels"])
    if keys is None:
        session, turn = batch["session_index"][:, 1:], batch["turn_ids"][:, 1:]
        key_of = {}
        for s, t in zip(session[mask].tolist(), turn[mask].tolist(), strict=True):
            key_of.setdefault((s, t), len(key_of))
        token_keys = torch.tensor(
            [key_of[(s, t)] for s, t in zip(session[mask].tolist(), turn[mask].tolist(), strict=True)]
        )
        names = list(key_of)
    else:
        token_keys = keys[:, 1:][mask]
        names = sorted(set(token_keys.tolist()))
        token_keys = torch.tensor([names.index(k) for k in token_keys.tolist()])
    token_losses_flat = losses[mask]
    directions = torch.stack(
        [_flat_grad(token_losses_flat[token_keys == k].mean(), parameters).double() for k in range(len(names))]
    )  # (K, P)
    gram = directions @ directions.T  # (K, K)
    coefficients = torch.linalg.solve(gram, directions @ step_gradient)  # (K,)
    residual = (step_gradient - coefficients @ directions).norm() / step_gradient.norm()
    return {name: c.item() for name, c in zip(names, coefficients, strict=True)}, residual.item()
