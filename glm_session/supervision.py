"""Supervision: which answers of a session are trained and how much each turn weighs, and the per-token weights of
the loss reductions that follow from it (DESIGN §2, "Supervision"). The one place that computes them.

A policy gives every answer turn k = 1..T of a session a weight w_k >= 0 (``Supervision.session_weights``). w_k = 0: the
answer is context only (labels ``IGNORE_INDEX``, no stop taught); w_k > 0: its tokens and its stop are trained,
and each of their token losses is multiplied by w_k. Weights act in the numerator of a reduction only; its
denominator counts supervised units (``model/loss.py``), so with every w_k = 1 each reduction is the plain one.

Labels are aligned with the inputs (Hugging Face style): the label at position t is predicted from the logits at
t - 1, so the loss runs over positions 1..T-1, and ``supervised(labels)`` (B, T-1) marks the trained ones. The
collator computes ``loss_weights`` of every batch on the CPU, with the batch's token counts, so that the training
step needs no host synchronisation to normalise its loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np
import torch

from glm_session.constants import IGNORE_INDEX
from glm_session.errors import ConfigError, check_int

# policies ---------------------------------------------------------------------------------------------


class Supervision:
    """A supervision policy: the weight of every answer turn of a session, as an exact fraction."""

    name: ClassVar[str]

    def weight(self, turn: int, num_turns: int) -> Fraction:
        """w_k of answer ``turn`` (1-based) of a session of ``num_turns`` turns."""
        raise NotImplementedError

    def session_weights(self, num_turns: int) -> tuple[Fraction, ...]:
        """(w_1, ..., w_T) of a session of ``num_turns`` turns."""
        return tuple(self.weight(k, num_turns) for k in range(1, num_turns + 1))

    @property
    def weighted(self) -> bool:
        """True when some trained turn may weigh other than 1 (the labels alone do not say what is trained how)."""
        return False

    def check_turns(self, longest: int, split: str) -> None:
        """Raise ``ConfigError`` when a setting names turns beyond ``longest``, the most turns of a session in
        ``split`` (a setting that never applies is a mistake)."""

    def describe(self) -> str:
        """The policy as its overrides write it: ``from_turn m=2``."""
        keys = " ".join(f"{k}={_plain(v)}" for k, v in vars(self).items())
        return f"{self.name} {keys}".strip()


def _plain(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(_plain(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class AllAnswers(Supervision):
    """Every answer trained, each turn weighing 1 (the default: plain multi-turn fine-tuning)."""

    name: ClassVar[str] = "all"

    def weight(self, turn: int, num_turns: int) -> Fraction:
        return Fraction(1)


@dataclass(frozen=True)
class LastAnswer(Supervision):
    """Only each session's final answer is trained; the whole history before it is context (LLaMA-Factory's
    ``mask_history``)."""

    name: ClassVar[str] = "last"

    def weight(self, turn: int, num_turns: int) -> Fraction:
        return Fraction(int(turn == num_turns))


@dataclass(frozen=True)
class FromTurn(Supervision):
    """Answers of turns ``m`` and later are trained, the earlier ones are context (``m=2`` skips the opening)."""

    m: int = 2
    name: ClassVar[str] = "from_turn"

    def __post_init__(self) -> None:
        check_int("supervision.m", self.m, minimum=1)

    def weight(self, turn: int, num_turns: int) -> Fraction:
        return Fraction(int(turn >= self.m))


@dataclass(frozen=True)
class TurnWeights(Supervision):
    """Explicit weights by turn position: ``weights[k-1]`` for turns 1..n, ``rest`` for every later turn.

    Weights are read as written in decimal (``0.1`` is exactly 1/10 in the analysis; training multiplies by the
    nearest float32).
    """

    weights: tuple[float, ...] = (1.0,)
    rest: float = 1.0
    name: ClassVar[str] = "positions"

    def __post_init__(self) -> None:
        weights = (
            list(self.weights)
            if isinstance(self.weights, Sequence) and not isinstance(self.weights, str)
            else None
        )
        if not weights or not all(_is_weight(w) for w in weights):
            raise ConfigError(
                "supervision.weights", weights or self.weights, "a non-empty list of finite numbers >= 0"
            )
        if not _is_weight(self.rest):
            raise ConfigError("supervision.rest", self.rest, "a finite number >= 0")
        object.__setattr__(self, "weights", tuple(float(w) for w in weights))
        object.__setattr__(self, "rest", float(self.rest))

    def weight(self, turn: int, num_turns: int) -> Fraction:
        return _exact(self.weights[turn - 1] if turn <= len(self.weights) else self.rest)

    @property
    def weighted(self) -> bool:
        return any(w not in (0, 1) for w in (*self.weights, self.rest))

    def check_turns(self, longest: int, split: str) -> None:
        if len(self.weights) > longest:
            raise ConfigError(
                "supervision.weights", list(self.weights), f"at most {longest} weights: no {split} session has more "
                f"than {longest} turns, so weights {longest + 1}..{len(self.weights)} would weigh nothing"
            )  # fmt: skip


@dataclass(frozen=True)
class RisingWeights(Supervision):
    """Weights rising linearly with the turn index, w_k = 2k / (T + 1): a session's weights average 1 (its
    total is that of ``all``), the opening weighs 2 / (T + 1) and the last answer 2T / (T + 1), nearly 2. The
    article's argument (openings are alike; later turns should count more) as a policy to test."""

    name: ClassVar[str] = "rising"

    def weight(self, turn: int, num_turns: int) -> Fraction:
        return Fraction(2 * turn, num_turns + 1)

    @property
    def weighted(self) -> bool:
        return True


ALL_ANSWERS = AllAnswers()  # the default policy
POLICIES: dict[str, type[Supervision]] = {
    p.name: p for p in (AllAnswers, LastAnswer, FromTurn, TurnWeights, RisingWeights)
}


def get_supervision(name: str) -> Supervision:
    """The policy called ``name`` with its default settings."""
    if name not in POLICIES:
        raise ConfigError("supervision", name, "one of " + ", ".join(POLICIES))
    return POLICIES[name]()


def _is_weight(value: Any) -> bool:
    """A finite number >= 0 (not a bool or a string)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value >= 0


def _exact(value: float) -> Fraction:
    """A weight as its decimal reads (``0.1`` -> 1/10)."""
    return Fraction(repr(value))


# supervised turns of samples -------------------------------------------------------------------------------


@dataclass
class SupervisedTurns:
    """Every supervised answer turn of some samples (one entry each, by sample then turn id).

    Attributes:
        rows: the sample of each turn (its row among the samples given).
        turns: its turn id (1-based).
        tokens: its supervised tokens (its stop included).
        weights: its supervision weight, the float training multiplies by.
    """

    rows: np.ndarray
    turns: np.ndarray
    tokens: np.ndarray
    weights: np.ndarray


def supervised_turns(
    labels: np.ndarray,
    turn_ids: np.ndarray,
    lengths: np.ndarray,
    turn_weights: np.ndarray | None = None,
    weight_lengths: np.ndarray | None = None,
) -> SupervisedTurns:
    """The supervised turns of samples given as flat arrays (vectorised, for whole data sets).

    Args:
        labels, turn_ids: every sample's labels and turn ids, one sample after the other (``lengths`` tokens each).
            A label at position t is predicted from position t - 1 and belongs to the turn of position t.
        turn_weights: every sample's weights by turn id (the samples' ``turn_weights``), one after the other,
            ``weight_lengths`` each; ``None``: 1 for every turn.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    trained = np.asarray(labels) != IGNORE_INDEX
    trained[starts[lengths > 0]] = False  # position 0 of a sample predicts nothing
    turn_ids = np.asarray(turn_ids, dtype=np.int64)
    width = int(turn_ids.max()) + 1 if turn_ids.size else 1
    sample_rows = np.repeat(np.arange(len(lengths)), lengths)
    keys, tokens = np.unique(sample_rows[trained] * width + turn_ids[trained], return_counts=True)
    rows, turns = np.divmod(keys, width)
    if turn_weights is None:
        weights = np.ones(len(keys))
    else:
        weight_starts = np.cumsum(weight_lengths) - weight_lengths  # (samples,)
        weights = np.asarray(turn_weights, dtype=np.float64)[weight_starts[rows] + turns]
    return SupervisedTurns(rows, turns, tokens, weights)


# per-token weights of the loss reductions ---------------------------------------------------------------


def supervised(labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) True where the label of position t + 1 is trained."""
    return labels[:, 1:] != IGNORE_INDEX


@dataclass
class LossWeights:
    """Per-token weights of the reductions, and the counts of their denominators.

    Attributes:
        token: (B, T-1) w_k of the token's turn where trained, else 0 (``token`` and ``sum``).
        sample: (B, T-1) w_k / (trained tokens of the token's sample) where trained, else 0.
        turn: (B, T-1) w_k / (trained tokens of the token's answer turn) where trained, else 0.
        counts: (3,) float64: trained tokens, samples holding a trained token, trained answer turns.
    """

    token: torch.Tensor
    sample: torch.Tensor
    turn: torch.Tensor
    counts: torch.Tensor


def _inverse_group_sizes(keys: torch.Tensor) -> tuple[torch.Tensor, int]:
    """For each key, 1 / (how often it occurs); and the number of distinct keys."""
    _, inverse, sizes = torch.unique(keys, return_inverse=True, return_counts=True)
    return 1.0 / sizes[inverse].to(torch.float32), sizes.numel()


def loss_weights(
    labels: torch.Tensor,
    turn_ids: torch.Tensor,
    sample_index: torch.Tensor,
    loss_weight: torch.Tensor | None = None,
) -> LossWeights:
    """The weights of every trained token of a batch.

    Args:
        labels: (B, T), ``IGNORE_INDEX`` where nothing is trained.
        turn_ids: (B, T) the session turn of every token.
        sample_index: (B, T) a sample id, unique within the step, of every token.
        loss_weight: (B, T) the policy's weight w_k of every trained label (the collator's ``loss_weight``);
            ``None``: 1 for every trained label.
    """
    mask = supervised(labels)  # (B, T-1)
    samples = sample_index[:, 1:][mask]  # (N,)
    turns = turn_ids[:, 1:][mask]  # (N,)
    # A turn is trained in exactly one sample, so (sample, turn) names it within the step.
    turn_keys = samples * (int(turns.max()) + 1 if turns.numel() else 1) + turns
    per_sample, n_samples = _inverse_group_sizes(samples)
    per_turn, n_turns = _inverse_group_sizes(turn_keys)
    token_weight = torch.zeros(mask.shape, dtype=torch.float32, device=labels.device)
    token_weight[mask] = 1.0 if loss_weight is None else loss_weight[:, 1:][mask].to(torch.float32)
    w = token_weight[mask]
    sample_weight = torch.zeros_like(token_weight)
    turn_weight = torch.zeros_like(token_weight)
    sample_weight[mask] = w * per_sample
    turn_weight[mask] = w * per_turn
    counts = torch.tensor([samples.numel(), n_samples, n_turns], dtype=torch.float64, device=labels.device)
    return LossWeights(token_weight, sample_weight, turn_weight, counts)
