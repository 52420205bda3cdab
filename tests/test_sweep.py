"""The strategy comparison's sweeps: every arm differs from the session arm in the one factor it is about, the driver
plans the jobs the sweeps define, and the aggregate's paired statistics behave on hand-made losses."""

import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from glm_session.config import CONFIG_DIR, compose_config

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "experiments" / "strategy_comparison"))
import aggregate  # noqa: E402
import run  # noqa: E402


def flat(experiment: str, *overrides: str) -> dict:
    cfg = compose_config("train", [f"experiment=comparison/{experiment}", "model.init_from=null", *overrides])
    container = OmegaConf.to_container(cfg, resolve=False)
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix.rstrip(".")] = node

    walk(container, "")
    return out


def differences(a: str, b: str) -> set[str]:
    x, y = flat(a), flat(b)
    return {key for key in set(x) | set(y) if x.get(key) != y.get(key)}


@pytest.mark.parametrize(
    "arm,factor",
    [
        ("smile_split_grouped", {"strategy._target_"}),
        ("smile_session_unpacked", {"data.packing"}),
        ("smile_split_shuffled", {"strategy._target_", "data.batch_sessions", "data.batch_supervised_tokens"}),
    ],
)
def test_each_arm_changes_one_factor(arm, factor):
    assert differences("smile_session", arm) == factor
    assert flat(arm)["optimizer.lr"] == flat("smile_session")["optimizer.lr"]  # set per job by the sweep


def test_equal_compute_is_split_shuffled_with_its_own_schedule():
    assert differences("smile_split_shuffled", "smile_split_equal_compute") == {
        "trainer.max_steps", "trainer.val_check_interval"}  # fmt: skip
    assert flat("smile_split_equal_compute")["trainer.max_steps"] == round(100 * 3.0222e15 / 1.0381e16)


def test_the_driver_plans_the_sweeps_jobs():
    jobs = {job.name: job for job in run.plan(Path("/r"), None, [], [])}
    assert len([n for n in jobs if n.startswith("lr/smile")]) == len(run.grid("comparison_lr")) + 3 == 21
    # Seeds 1-4 of every arm (seed 0 is the sweep's job at the chosen rate), from alternating bases.
    seeds = [n for n in jobs if n.startswith("seeds/smile_session+token")]
    assert sorted(seeds) == [f"seeds/smile_session+token_seed{s}" for s in range(1, 5)]
    assert jobs["seeds/smile_session+token_seed3"].base == "base/smile_seed1"
    # The matched runs take the rate of the session run they must equal: split+sample = session+turn.
    assert jobs["matched/smile_split_grouped+token_seed0"].lr_of == "smile_session+token"
    assert jobs["matched/smile_split_grouped+sample_seed0"].lr_of == "smile_session+turn"
    assert jobs["matched/smile_session_unpacked+turn_seed0"].lr_of == "smile_session+turn"
    assert all(
        OmegaConf.load(CONFIG_DIR / "sweep" / f"{s}.yaml") for s in ("comparison_seeds", "comparison_kdconv")
    )


def test_paired_differences_by_hand():
    rng = np.random.default_rng(0)
    sessions = 50
    counts = rng.integers(1, 30, sessions).astype(float)
    sums = counts * rng.uniform(2.0, 3.0, sessions)
    weights = np.stack([np.bincount(rng.integers(0, sessions, sessions), minlength=sessions) for _ in range(200)])
    same = aggregate.paired([(sums, counts)] * 3, [(sums, counts)] * 3, weights.astype(float), rng)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]
    shifted = aggregate.paired(
        [(sums + 0.1 * counts, counts)] * 3, [(sums, counts)] * 3, weights.astype(float), rng
    )
    assert shifted["difference"] == pytest.approx(0.1) and shifted["ci95"] == pytest.approx([0.1, 0.1])
    interval = aggregate.bootstrap([(sums, counts)], weights.astype(float), rng)
    assert interval[0] < sums.sum() / counts.sum() < interval[1]
