"""The strategy x reduction sweep on a tiny scale: a multirun of the fine-tuning arms from a pretrained checkpoint, one job failing on purpose; the aggregate reports it and keeps the other jobs' results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from glm_session.config import CONFIG_DIR, compose_config

TESTS = Path(__file__).parent
ROOT = TESTS.parent
TINY = ["model=chatglm2-tiny", "data.limit=6", "data.max_seq_len=512", "data.batch_tokens=1024",
        "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false", "trainer.val_check_interval=1.0", "evaluate.limit=2",
        "generation.max_new_tokens=4"]  # fmt: skip


def test_sweep_has_18_jobs_of_the_two_arms():
    params = OmegaConf.load(CONFIG_DIR / "sweep" / "strategy_x_reduction.yaml").hydra.sweeper.params
    assert params.experiment.split(",") == ["finetune_split", "finetune_session"]
    assert params.loss.split(",") == ["token", "sample", "turn"] and params.seed.split(",") == ["0", "1", "2"]
    for arm in ("split", "session"):
        arm_cfg = compose_config("train", [f"experiment=finetune_{arm}"])
        assert arm_cfg.strategy._target_.endswith(f"{arm.capitalize()}Strategy")
        assert arm_cfg.evaluate.enabled and arm_cfg.trainer.limit_train_batches == 1.0


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                   **(env or {})}  # fmt: skip
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environment, capture_output=True, text=True)


@pytest.mark.slow
def test_pretrain_export_sweep_with_a_failed_job_and_aggregate(tmp_path, cache_dir):
    cache = f"data.cache_dir={cache_dir}"
    pretrain = run(
        "-m", "glm_session.train", "experiment=pretrain_lm", *TINY, cache, f"hydra.run.dir={tmp_path / 'pre'}"
    )
    assert pretrain.returncode == 0, pretrain.stderr[-3000:]
    (checkpoint,) = (tmp_path / "pre" / "checkpoints").glob("best-*.ckpt")  # every arm's init_from

    sweep = tmp_path / "sweep"
    result = run("-m", "glm_session.train", "-m", "+sweep=strategy_x_reduction", "experiment=finetune_session",
                 "loss=token", "seed=0,1", *TINY, cache, f"hydra.sweep.dir={sweep}",
                 "+callbacks.fail._target_=helpers.FailIfSeed", "+callbacks.fail.seed=${seed}",
                 "+callbacks.fail.failing=1", env={"GLM_SESSION_INIT": str(checkpoint)})  # fmt: skip
    assert result.returncode != 0  # Hydra raises the failure at the end, after every job ran
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["finetune_session_token_seed0", "finetune_session_token_seed1"]
    assert (sweep / jobs[0] / "evaluation" / "metrics.json").exists()
    assert "planned failure" in (sweep / jobs[1] / "failed.txt").read_text()

    out = tmp_path / "report"
    aggregated = run("experiments/strategy_comparison/aggregate.py", str(sweep), "--out", str(out))
    assert aggregated.returncode == 0, aggregated.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert [j.get("error", "") for j in report["jobs"]][1].endswith("planned failure of the job with seed 1")
    assert report["summary"]["arms"]["session+token"]["seeds"] == [0]
    readme = (out / "README.md").read_text()
    assert "finished 1, failed 1" in readme and "finetune_session_token_seed1" in readme
