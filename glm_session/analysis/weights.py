"""Exact token-level weights: the share of an optimizer step's gradient that each trained turn carries.

With the loss of ``glm_session.model.loss`` a step's gradient is ``sum_t (w_t / D) grad loss_t``, and w_t is the
same for every token of a trained turn k of supervision weight v_k (``token``/``sum``: v_k; ``sample``: v_k /
tokens of the sample; ``turn``: v_k / tokens of the turn). So turn k carries ``w_k * n_k / D`` of it, n_k its
supervised tokens; the shares below are these masses normalised to sum to 1. Everything is a ``Fraction``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from glm_session.model.loss import REDUCTIONS
from glm_session.supervision import SupervisedTurns, supervised_turns


@dataclass(frozen=True)
class TrainedTurn:
    """Turn ``turn`` of some session, trained in sample ``sample`` on ``tokens`` supervised tokens, each token loss
    multiplied by the supervision policy's ``weight`` of the turn.

    ``key`` names its content: turns with equal keys (the same answer in the same context) are merged.
    """

    key: Hashable
    turn: int
    sample: Hashable
    tokens: int
    weight: Fraction = Fraction(1)


def turn_masses(turns: Sequence[TrainedTurn], reduction: str) -> list[Fraction]:
    """``w_k * n_k`` of every trained turn of one step (before the division by D)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown loss reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    sample_tokens: dict[Hashable, int] = defaultdict(int)
    for t in turns:
        sample_tokens[t.sample] += t.tokens
    if reduction in ("token", "sum"):
        return [t.weight * t.tokens for t in turns]
    if reduction == "sample":
        return [t.weight * Fraction(t.tokens, sample_tokens[t.sample]) for t in turns]
    return [Fraction(t.weight) for t in turns]  # turn: each turn's token mean counts once, times its weight


def exact_weights(turns: Sequence[TrainedTurn], reduction: str) -> dict[Hashable, Fraction]:
    """Share of the step's gradient carried by each content key (summing to 1)."""
    masses = turn_masses(turns, reduction)
    total = sum(masses)
    shares: dict[Hashable, Fraction] = defaultdict(Fraction)
    for t, mass in zip(turns, masses, strict=True):
        shares[t.key] += mass / total
    return dict(shares)


def exact_coefficients(turns: Sequence[TrainedTurn], reduction: str) -> dict[Hashable, Fraction]:
    """The coefficient c_k of each content key in the step gradient ``g = sum_k c_k h_k``, h_k the gradient of the
    token-mean loss of its turns: ``w_k n_k / D`` with the step's D (tokens, samples, turns, or 1 for ``sum``). For
    ``token``, ``sample`` and ``turn`` with every supervision weight 1 they sum to 1 and equal ``exact_weights``;
    they also fix the gradient's scale (weights other than 1 scale it: they act in the numerator only)."""
    masses = turn_masses(turns, reduction)
    d = {"token": sum(t.tokens for t in turns), "sample": len({t.sample for t in turns}),
         "turn": len(turns), "sum": 1}[reduction]  # fmt: skip
    coefficients: dict[Hashable, Fraction] = defaultdict(Fraction)
    for t, mass in zip(turns, masses, strict=True):
        coefficients[t.key] += mass / d
    return dict(coefficients)


def weights_by_turn_index(turns: Sequence[TrainedTurn], reduction: str) -> dict[int, Fraction]:
    """Share of the step's gradient carried by each turn index (1 = first answer)."""
    masses = turn_masses(turns, reduction)
    total = sum(masses)
    shares: dict[int, Fraction] = defaultdict(Fraction)
    for t, mass in zip(turns, masses, strict=True):
        shares[t.turn] += mass / total
    return dict(sorted(shares.items()))


def trained_turns(
    labels: Iterable[Sequence[int]],
    turn_ids: Iterable[Sequence[int]],
    session_index: Iterable[int],
    sample_ids: Iterable[Hashable],
    turn_weights: Iterable[Sequence[float]] | None = None,
) -> list[TrainedTurn]:
    """The trained turns of samples (label and turn id rows, as the DataModule builds them).

    A label at position t is predicted from position t - 1; its turn is the turn of position t. ``turn_weights``:
    each sample's supervision weight by turn id (the samples' ``turn_weights``); ``None``: 1 for every turn.
    """
    labels, turn_ids = [list(row) for row in labels], [list(row) for row in turn_ids]
    weights = None if turn_weights is None else [list(row) for row in turn_weights]
    found = supervised_turns(
        np.array([x for row in labels for x in row], dtype=np.int64),
        np.array([x for row in turn_ids for x in row], dtype=np.int64),
        np.array([len(row) for row in labels]),
        None if weights is None else np.array([w for row in weights for w in row], dtype=np.float64),
        None if weights is None else np.array([len(row) for row in weights]),
    )
    return turns_of(found, list(session_index), list(sample_ids))


def turns_of(
    found: SupervisedTurns, session_index: Sequence[int], sample_ids: Sequence[Hashable]
) -> list[TrainedTurn]:
    """``found`` as ``TrainedTurn`` s keyed by (session, turn), each weight as the exact value of its float (what
    training multiplies by)."""
    return [
        TrainedTurn((session_index[row], turn), turn, sample_ids[row], n, Fraction(weight))
        for row, turn, n, weight in zip(
            found.rows.tolist(), found.turns.tolist(), found.tokens.tolist(), found.weights.tolist(), strict=True
        )  # fmt: skip
    ]
