"""The article's toy batch at token level: session 1 = (a), session 2 = (a, b, c); answers of equal length, as the
article has them, or of the lengths given."""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction

from glm_session.analysis.article import ARTICLE_TOY
from glm_session.analysis.weights import TrainedTurn, exact_weights


def toy_turns(strategy: str, tokens: int | Mapping[str, int] = 5) -> list[TrainedTurn]:
    """The trained turns of the toy batch: split trains each answer in its own sample, session all in one.
    ``tokens``: the trained tokens of every answer, or of each of a, b, c."""
    turns = []
    for s, session in enumerate(ARTICLE_TOY):
        for k, content in enumerate(session, start=1):
            sample = (s, k) if strategy == "split" else s
            n = tokens if isinstance(tokens, int) else tokens[content]
            turns.append(TrainedTurn(content, k, sample, n))
    return turns


def exact_toy(tokens: int | Mapping[str, int] = 5) -> dict[str, dict[str, Fraction]]:
    """Token-level weights of a, b, c for every strategy+reduction."""
    return {
        f"{strategy}+{reduction}": dict(sorted(exact_weights(toy_turns(strategy, tokens), reduction).items()))
        for strategy in ("split", "session")
        for reduction in ("token", "sample", "turn")
    }
