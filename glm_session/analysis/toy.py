"""The article's toy batch at token level: session 1 = (a), session 2 = (a, b, c); answers of equal length, as the
article has them, or of the lengths given; every turn trained, or as a supervision policy says."""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction

from glm_session.analysis.article import ARTICLE_TOY
from glm_session.analysis.weights import TrainedTurn, exact_weights
from glm_session.supervision import ALL_ANSWERS, Supervision

STRATEGIES = ("split", "session")
REDUCTIONS = ("token", "sample", "turn")


def toy_turns(
    strategy: str, tokens: int | Mapping[str, int] = 5, supervision: Supervision = ALL_ANSWERS
) -> list[TrainedTurn]:
    """The trained turns of the toy batch: split trains each supervised answer in its own sample, session all of a
    session's in one. ``tokens``: the trained tokens of every answer, or of each of a, b, c; turns of weight 0 are
    context only."""
    turns = []
    for s, session in enumerate(ARTICLE_TOY):
        for k, (content, weight) in enumerate(
            zip(session, supervision.session_weights(len(session)), strict=True), start=1
        ):
            if weight == 0:
                continue
            sample = (s, k) if strategy == "split" else s
            n = tokens if isinstance(tokens, int) else tokens[content]
            turns.append(TrainedTurn(content, k, sample, n, weight))
    return turns


def exact_toy(
    tokens: int | Mapping[str, int] = 5, supervision: Supervision = ALL_ANSWERS
) -> dict[str, dict[str, Fraction]]:
    """Token-level weights of a, b, c for every strategy+reduction under ``supervision``."""
    return {
        f"{strategy}+{reduction}": dict(
            sorted(exact_weights(toy_turns(strategy, tokens, supervision), reduction).items())
        )
        for strategy in STRATEGIES
        for reduction in REDUCTIONS
    }
