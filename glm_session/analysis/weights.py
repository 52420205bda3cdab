"""Exact token-level weights: the share of an optimizer step's gradient that each trained turn carries.

With the loss of ``glm_session.model.loss`` a step's gradient is ``sum_t (w_t / D) grad loss_t``, and w_t is the
same for every token of a trained turn (``token``/``sum``: 1; ``sample``: 1 / tokens of the sample; ``turn``:
1 / tokens of the turn). So turn k carries ``w_k * n_k / D`` of it, n_k its supervised tokens; the shares below
are these masses normalised to sum to 1. Everything is a ``Fraction``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from glm_session.constants import IGNORE_INDEX
from glm_session.model.loss import REDUCTIONS


@dataclass(frozen=True)
class TrainedTurn:
    """Turn ``turn`` of some session, trained in sample ``sample`` on ``tokens`` supervised tokens.

    ``key`` names its content: turns with equal keys (the same answer in the same context) are merged.
    """

    key: Hashable
    turn: int
    sample: Hashable
    tokens: int


def turn_masses(turns: Sequence[TrainedTurn], reduction: str) -> list[Fraction]:
    """``w_k * n_k`` of every trained turn of one step (before the division by D)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown loss reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    sample_tokens: dict[Hashable, int] = defaultdict(int)
    for t in turns:
        sample_tokens[t.sample] += t.tokens
    if reduction in ("token", "sum"):
        return [Fraction(t.tokens) for t in turns]
    if reduction == "sample":
        return [Fraction(t.tokens, sample_tokens[t.sample]) for t in turns]
    return [Fraction(1) for _ in turns]  # turn: each turn's token mean counts once


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
    ``token``, ``sample`` and ``turn`` they sum to 1 and equal ``exact_weights``; they also fix the gradient's scale."""
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
) -> list[TrainedTurn]:
    """The trained turns of samples (label and turn id rows, as the DataModule builds them).

    A label at position t is predicted from position t - 1; its turn is the turn of position t.
    """
    out = []
    for labels_row, turns_row, session, sample in zip(labels, turn_ids, session_index, sample_ids, strict=True):
        counts: dict[int, int] = defaultdict(int)
        for label, turn in zip(labels_row[1:], turns_row[1:], strict=True):
            if label != IGNORE_INDEX:
                counts[turn] += 1
        out += [TrainedTurn((session, turn), turn, sample, n) for turn, n in sorted(counts.items())]
    return out
