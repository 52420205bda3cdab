"""The comparison's statistics: token means and arm estimates on hand-written numbers, the paired hierarchical
bootstrap, difference and equivalence tests, and Holm's correction."""

from __future__ import annotations

import numpy as np
import pytest

from glm_session.analysis.statistics import (
    arm_point,
    hierarchical_resamples,
    holm,
    interval,
    paired_difference,
    token_mean,
    tost,
)


def random_arm(rng: np.random.Generator, bases=(0, 1), seeds=(0, 1, 2), sessions: int = 50) -> dict:
    """An arm of runs with per-session token counts and sums of about 2 nats a token, varying by run and session."""
    arm = {}
    for base in bases:
        arm[base] = {}
        for seed in seeds:
            counts = rng.integers(5, 200, size=sessions).astype(float)
            arm[base][seed] = (counts * rng.uniform(1.0, 3.0, size=sessions), counts)
    return arm


def shifted(arm: dict, shift: float) -> dict:
    """The same arm with every session's sum raised by ``shift`` × its count: every token mean ``shift`` higher."""
    return {
        b: {s: (sums + shift * counts, counts) for s, (sums, counts) in runs.items()} for b, runs in arm.items()
    }


def test_holm_hand_example():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert list(adjusted) == ["a", "b", "c"]
    assert adjusted["a"] == pytest.approx(0.03)
    assert adjusted["c"] == pytest.approx(0.06)
    assert adjusted["b"] == pytest.approx(0.06)  # max(0.04 × 1, 0.06): monotone


def test_holm_caps_at_one():
    adjusted = holm({"x": 0.3, "y": 0.5, "z": 0.9})
    assert adjusted == pytest.approx({"x": 0.9, "y": 1.0, "z": 1.0})


def test_token_mean_by_hand():
    assert token_mean(np.array([2.0, 3.0]), np.array([1.0, 2.0])) == pytest.approx(5 / 3)
    # the first session drawn twice, the second not at all: 4 / 2
    assert token_mean(np.array([2.0, 3.0]), np.array([1.0, 2.0]), np.array([2, 0])) == pytest.approx(2.0)
    assert token_mean(np.array([2.0, 3.0]), np.array([1.0, 2.0]), np.array([1, 3])) == pytest.approx(11 / 7)


def test_arm_point_is_the_mean_of_run_token_means():
    arm = {
        0: {0: (np.array([2.0, 3.0]), np.array([1.0, 2.0])), 1: (np.array([4.0, 4.0]), np.array([2.0, 2.0]))},
        1: {0: (np.array([1.0, 0.0]), np.array([1.0, 3.0]))},
    }
    # runs: 5/3, 2, 1/4
    assert arm_point(arm) == pytest.approx((5 / 3 + 2 + 1 / 4) / 3)


def test_bootstrap_is_paired():
    rng = np.random.default_rng(1)
    a = random_arm(rng)
    reps = hierarchical_resamples({"a": a, "b": shifted(a, 0.5)}, resamples=500, seed=3)
    assert arm_point(shifted(a, 0.5)) - arm_point(a) == pytest.approx(0.5)
    low, high = interval(reps["b"] - reps["a"])
    assert abs(low - 0.5) < 1e-12 and abs(high - 0.5) < 1e-12
    for name in ("a", "b"):
        low, high = interval(reps[name])
        assert high - low > 1e-3
    result = paired_difference(reps["b"], reps["a"], arm_point(shifted(a, 0.5)), arm_point(a))
    assert result["diff"] == pytest.approx(0.5)
    assert result["p_two_sided"] == pytest.approx(2 / 501)


def test_bootstrap_unpaired_arms_give_a_wide_difference():
    rng = np.random.default_rng(2)
    reps = hierarchical_resamples({"a": random_arm(rng), "b": random_arm(rng)}, resamples=500, seed=0)
    low, high = interval(reps["a"] - reps["b"])
    assert high - low > 1e-3


def test_one_run_resamples_sessions_only():
    rng = np.random.default_rng(4)
    arm = random_arm(rng, bases=(0,), seeds=(0,), sessions=300)
    point = arm_point(arm)
    reps = hierarchical_resamples({"a": arm}, resamples=2000, seed=0)["a"]
    assert reps.shape == (2000,)
    assert abs(reps.mean() - point) < 0.1 * reps.std()
    low, high = interval(reps)
    assert low < point < high
    assert high - low > 1e-3


def test_tost_identical_arms_are_equivalent():
    rng = np.random.default_rng(5)
    a = random_arm(rng)
    reps = hierarchical_resamples({"a": a, "b": a}, resamples=400, seed=0)
    result = tost(reps["a"], reps["b"], arm_point(a), arm_point(a), margin=0.02)
    assert result["equivalent"] is True
    assert result["p"] < 0.05
    assert result["diff"] == 0.0 and result["margin"] == 0.02


def test_tost_shifted_arms_are_not_equivalent():
    rng = np.random.default_rng(6)
    a = random_arm(rng)
    b = shifted(a, 0.1)
    reps = hierarchical_resamples({"a": a, "b": b}, resamples=400, seed=0)
    result = tost(reps["b"], reps["a"], arm_point(b), arm_point(a), margin=0.02)
    assert result["equivalent"] is False
    assert result["p"] > 0.99
    assert result["p_lower"] == pytest.approx(1 / 401)
    assert result["ci90"] == pytest.approx((0.1, 0.1))


def test_mismatched_structure_names_the_arm():
    rng = np.random.default_rng(7)
    a = random_arm(rng)
    missing_base = {0: random_arm(rng)[0]}
    with pytest.raises(ValueError, match="'lost'"):
        hierarchical_resamples({"a": a, "lost": missing_base})
    fewer_seeds = random_arm(rng, seeds=(0, 1))
    with pytest.raises(ValueError, match="'short'"):
        hierarchical_resamples({"a": a, "short": fewer_seeds})
    other_sessions = random_arm(rng, sessions=49)
    with pytest.raises(ValueError, match="'sessions'"):
        hierarchical_resamples({"a": a, "sessions": other_sessions})


def test_same_seed_same_replicates():
    rng = np.random.default_rng(8)
    arms = {"a": random_arm(rng), "b": random_arm(rng)}
    first = hierarchical_resamples(arms, resamples=300, seed=11)
    second = hierarchical_resamples(arms, resamples=300, seed=11)
    other = hierarchical_resamples(arms, resamples=300, seed=12)
    for name in arms:
        np.testing.assert_array_equal(first[name], second[name])
        assert not np.array_equal(first[name], other[name])


def test_resampling_is_fast():
    import time

    rng = np.random.default_rng(9)
    arms = {f"arm{i}": random_arm(rng, bases=(0, 1), seeds=range(5), sessions=1000) for i in range(10)}
    start = time.perf_counter()
    reps = hierarchical_resamples(arms, resamples=2000, seed=0)
    assert time.perf_counter() - start < 5.0
    assert all(r.shape == (2000,) for r in reps.values())
