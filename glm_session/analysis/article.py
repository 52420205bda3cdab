"""The article's attribution model of per-turn gradient weights, computed exactly with fractions.

The article (DESIGN §2) models a sample's gradient as the mean over the answer contents present in it, history
included, and a batch's gradient as the mean over its samples; identical contents merge. Its toy batch: session 1
= (a), session 2 = (a, b, c), the same content a in both.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from fractions import Fraction

ARTICLE_TOY = (("a",), ("a", "b", "c"))


def samples_of(sessions: Sequence[Sequence[Hashable]], strategy: str) -> list[tuple[Hashable, ...]]:
    """The answer contents present in each sample: split makes q1..qk -> ak for every k, session one per dialogue."""
    if strategy == "session":
        return [tuple(session) for session in sessions]
    if strategy == "split":
        return [tuple(session[: k + 1]) for session in sessions for k in range(len(session))]
    raise ValueError(f"unknown strategy {strategy!r}: split or session")


def attribution_weights(sessions: Sequence[Sequence[Hashable]], strategy: str) -> dict[Hashable, Fraction]:
    """Weight of each content in the batch gradient under the article's model."""
    samples = samples_of(sessions, strategy)
    weights: dict[Hashable, Fraction] = defaultdict(Fraction)
    for sample in samples:
        for content in sample:
            weights[content] += Fraction(1, len(sample)) / len(samples)
    return dict(weights)


def article_toy() -> dict[str, dict[str, str]]:
    """The article's numbers, computed: session a 2/3, b 1/6, c 1/6; split a 17/24, b 5/24, c 1/12."""
    return {
        strategy: {k: str(v) for k, v in sorted(attribution_weights(ARTICLE_TOY, strategy).items())}
        for strategy in ("session", "split")
    }
