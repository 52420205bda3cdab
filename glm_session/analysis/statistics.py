"""The statistics declared for a comparison of fine-tuning arms: point estimates, a paired hierarchical bootstrap,
difference and equivalence tests, and Holm's correction.

An arm is a set of runs indexed by base (the pretrained model's seed) and seed: ``{base: {seed: (sums, counts)}}``,
where ``sums`` and ``counts`` hold, for every test session in one fixed order shared by all runs and arms, the loss
summed over the session's scored tokens and the number of those tokens. A run's loss is the token mean over the
sessions (sum of sums / sum of counts); an arm's estimate is the mean of its runs' losses, every run counting once.

The bootstrap resamples the three sources of variation in turn: bases with replacement, then each drawn base's seeds
with replacement, then the test sessions with replacement (multinomial weights). Every replicate uses the same
draws for every arm, seeds matched by their position in the sorted seed list of their base (seed s of every arm
starts from the same base with the same data order), so a difference between two arms' replicates is paired and
the variation the arms share cancels. Tests read the replicate differences: percentile intervals, a two-sided
bootstrap p-value, and two one-sided tests (TOST) for equivalence within a margin; p-values are ``(count + 1) /
(B + 1)`` so that none is zero.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Run = tuple[np.ndarray, np.ndarray]
Arm = Mapping[int, Mapping[int, Run]]


def token_mean(sums: np.ndarray, counts: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Token-mean loss over sessions: sum(w * sums) / sum(w * counts), ``weights`` = times each session is drawn."""
    sums, counts = np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)
    w = np.ones_like(sums) if weights is None else np.asarray(weights, dtype=float)
    total = float(np.dot(w, counts))
    if total <= 0:
        raise ValueError("token_mean: no tokens (the weighted count is not positive)")
    return float(np.dot(w, sums)) / total


def arm_point(arm: Arm) -> float:
    """The arm's estimate: the mean over all its runs (every base, every seed) of each run's token-mean loss."""
    losses = [token_mean(*arm[base][seed]) for base in sorted(arm) for seed in sorted(arm[base])]
    if not losses:
        raise ValueError("arm_point: the arm has no runs")
    return float(np.mean(losses))


def _structure(arm: Arm) -> tuple[tuple[int, int], ...]:
    """The arm's bases in sorted order with each one's number of seeds."""
    return tuple((base, len(arm[base])) for base in sorted(arm))


def _check_arms(arms: Mapping[str, Arm]) -> tuple[tuple[tuple[int, int], ...], int]:
    """The structure shared by all arms and their number of sessions; ValueError naming the arm that differs."""
    if not arms:
        raise ValueError("no arms to resample")
    names = list(arms)
    first = names[0]
    structure = _structure(arms[first])
    if not structure or any(n == 0 for _, n in structure):
        raise ValueError(f"arm {first!r} has no runs in some base (or no bases): {dict(structure)}")
    n_sessions = None
    for name in names:
        arm = arms[name]
        if sorted(arm) != [base for base, _ in structure]:
            raise ValueError(
                f"arm {name!r} has bases {sorted(arm)}, arm {first!r} has {[base for base, _ in structure]}"
            )
        if _structure(arm) != structure:
            raise ValueError(
                f"arm {name!r} has seeds per base {dict(_structure(arm))}, arm {first!r} has {dict(structure)}"
            )
        for base in arm:
            for seed, (sums, counts) in arm[base].items():
                shape = np.shape(sums)
                if (
                    len(shape) != 1
                    or np.shape(counts) != shape
                    or (n_sessions is not None and shape[0] != n_sessions)
                ):
                    raise ValueError(
                        f"arm {name!r} base {base} seed {seed}: sums {np.shape(sums)} and counts {np.shape(counts)}"
                        f" are not both ({n_sessions if n_sessions is not None else 'n_sessions'},)"
                    )
                n_sessions = shape[0]
    return structure, int(n_sessions)


def _run_matrices(arm: Arm) -> tuple[np.ndarray, np.ndarray]:
    """Sums and counts of every run, rows in base order then sorted-seed order: two (runs, sessions) arrays."""
    runs = [arm[base][seed] for base in sorted(arm) for seed in sorted(arm[base])]
    return np.stack([r[0] for r in runs]).astype(float), np.stack([r[1] for r in runs]).astype(float)


def _draws(
    structure: tuple[tuple[int, int], ...], n_sessions: int, resamples: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One set of draws for all arms: how many times each run is drawn (resamples, runs) and each session's weight
    (resamples, sessions)."""
    seeds_per_base = np.array([n for _, n in structure])
    offsets = np.concatenate([[0], np.cumsum(seeds_per_base)[:-1]])
    n_bases, n_runs, most = len(structure), int(seeds_per_base.sum()), int(seeds_per_base.max())
    bases = rng.integers(0, n_bases, size=(resamples, n_bases))
    n_seeds = seeds_per_base[bases]
    slots = rng.integers(0, n_seeds[..., None], size=(resamples, n_bases, most))
    drawn = np.arange(most) < n_seeds[..., None]
    runs = offsets[bases][..., None] + slots
    flat = (np.arange(resamples)[:, None, None] * n_runs + runs)[drawn]
    multiplicity = np.bincount(flat, minlength=resamples * n_runs).reshape(resamples, n_runs)
    weights = rng.multinomial(n_sessions, np.full(n_sessions, 1.0 / n_sessions), size=resamples)
    return multiplicity.astype(float), weights.astype(float)


def hierarchical_resamples(arms: Mapping[str, Arm], resamples: int = 2000, seed: int = 0) -> dict[str, np.ndarray]:
    """``resamples`` paired bootstrap replicates of every arm's estimate: bases, then seeds within each drawn base,
    then sessions, drawn with replacement, the same draws for every arm."""
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    structure, n_sessions = _check_arms(arms)
    multiplicity, weights = _draws(structure, n_sessions, resamples, np.random.default_rng(seed))
    replicates = {}
    for name, arm in arms.items():
        sums, counts = _run_matrices(arm)
        losses = (weights @ sums.T) / (weights @ counts.T)
        replicates[name] = (multiplicity * losses).sum(axis=1) / multiplicity.sum(axis=1)
    return replicates


def interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the replicates at ``level``."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    tail = (1 - level) / 2
    low, high = np.quantile(np.asarray(replicates, dtype=float), [tail, 1 - tail])
    return float(low), float(high)


def _tail(hits: np.ndarray) -> float:
    """Bootstrap p-value of a tail: (count + 1) / (B + 1)."""
    return float((np.count_nonzero(hits) + 1) / (hits.size + 1))


def paired_difference(a_reps: np.ndarray, b_reps: np.ndarray, a_point: float, b_point: float) -> dict:
    """Difference a - b: the point difference, its 95% percentile interval and a two-sided bootstrap p-value."""
    d = np.asarray(a_reps, dtype=float) - np.asarray(b_reps, dtype=float)
    p = min(1.0, 2 * min(_tail(d <= 0), _tail(d >= 0)))
    return {"diff": float(a_point - b_point), "ci95": interval(d, 0.95), "p_two_sided": p}


def tost(a_reps: np.ndarray, b_reps: np.ndarray, a_point: float, b_point: float, margin: float) -> dict:
    """Two one-sided tests of equivalence of a and b within ±``margin``; equivalent when the 90% interval of the
    difference lies inside (-margin, margin)."""
    if margin <= 0:
        raise ValueError(f"margin must be positive, got {margin}")
    d = np.asarray(a_reps, dtype=float) - np.asarray(b_reps, dtype=float)
    p_lower, p_upper = _tail(d <= -margin), _tail(d >= margin)
    ci90 = interval(d, 0.90)
    return {
        "diff": float(a_point - b_point),
        "margin": float(margin),
        "p_lower": p_lower,
        "p_upper": p_upper,
        "p": max(p_lower, p_upper),
        "ci90": ci90,
        "equivalent": bool(-margin < ci90[0] and ci90[1] < margin),
    }


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values: step-down, monotone in the sorted order, capped at 1; same keys."""
    order = sorted(pvalues, key=lambda key: pvalues[key])
    m, running, adjusted = len(order), 0.0, {}
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[key])))
        adjusted[key] = running
    return {key: adjusted[key] for key in pvalues}
