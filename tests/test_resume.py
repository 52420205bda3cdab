"""Resume: a run killed mid-epoch (SIGKILL) and resumed from its last checkpoint ends exactly like a run that was
never interrupted; a kill while a checkpoint is written leaves the previous checkpoint, never a partial one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glm_session.config import compose_config
from glm_session.train import record_failure, train

TESTS = Path(__file__).parent
OVERRIDES = [
    "model=chatglm2-tiny",
    "data.limit=24",
    "data.max_seq_len=1024",
    "data.batch_tokens=1024",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=1.0",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.enable_progress_bar=false",
    "callbacks.last_checkpoint.every_n_train_steps=3",
]


def run(output_dir: Path, *extra: str) -> dict:
    cfg = compose_config("train", [*OVERRIDES, f"output_dir={output_dir}", *extra])
    metrics, _ = train(cfg)
    return metrics


@pytest.mark.slow
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, cache_dir):
    cache = f"data.cache_dir={cache_dir}"
    record = tmp_path / "batches.jsonl"
    uninterrupted = run(tmp_path / "whole", cache, "+callbacks.record._target_=helpers.RecordBatches",
                        f"+callbacks.record.path={record}")  # fmt: skip
    steps_per_epoch = uninterrupted["global_steps"] // 2
    assert steps_per_epoch > 7  # the kill below is in the middle of the first epoch
    # Lightning starts every epoch with set_epoch: each epoch trains every sample once, in a new order.
    batches = [json.loads(line) for line in record.read_text().splitlines()]
    epochs = [[s for b in batches if b[1] == e for s in b[2]] for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "glm_session.train", *OVERRIDES, cache, f"hydra.run.dir={killed}",
               "+callbacks.kill._target_=helpers.KillAtStep", "+callbacks.kill.step=7"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == -9, result.stderr[-2000:]
    last = killed / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 6  # saved after step 6, killed after step 7
    seconds_before_kill = saved["callbacks"]["RunMetrics"]["train_seconds"]

    resumed = run(killed, cache, f"ckpt_path={last}")
    assert resumed["global_steps"] == uninterrupted["global_steps"]
    assert len(resumed["val_loss_by_epoch"]) == 2
    for a, b in zip(resumed["val_loss_by_epoch"], uninterrupted["val_loss_by_epoch"], strict=True):
        assert abs(a - b) < 1e-4
    assert resumed["input_tokens"] == uninterrupted["input_tokens"]  # the same batches, each once
    # The interrupted epoch's training loss covers all its batches, those before the kill too.
    for a, b in zip(resumed["train_loss_by_epoch"], uninterrupted["train_loss_by_epoch"], strict=True):
        assert abs(a - b) < 1e-5
    assert [h["tokens"] for h in resumed["history"]] == [h["tokens"] for h in uninterrupted["history"]]
    # Training time and throughput count the steps trained before the kill.
    assert resumed["train_seconds"] > seconds_before_kill > 0
    assert resumed["tokens_per_second"] == pytest.approx(resumed["input_tokens"] / resumed["train_seconds"])
    assert json.loads((killed / "metrics.json").read_text())["val_loss_by_epoch"] == resumed["val_loss_by_epoch"]


@pytest.mark.slow
def test_a_run_stopped_or_failed_in_its_test_evaluation_resumes_to_the_same_evaluation(
    tmp_path, cache_dir, monkeypatch
):
    """What the unseen_base driver does with a run the deadline stopped after training, in its test evaluation, or
    that failed there (session 19: out of GPU memory): resumed from its last.ckpt (written at the last step), it
    trains nothing more and evaluates as the uninterrupted run did, to the byte."""
    evaluate = [f"data.cache_dir={cache_dir}", "trainer.max_epochs=1", "evaluate.enabled=true", "evaluate.limit=3",
                "generation.max_new_tokens=6"]  # fmt: skip
    whole = run(tmp_path / "whole", *evaluate)
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    last = stopped / "checkpoints" / "last.ckpt"
    last.write_bytes((tmp_path / "whole/checkpoints/last.ckpt").read_bytes())
    assert torch.load(last, weights_only=False)["global_step"] == whole["global_steps"]
    # What the stop leaves: the run record says completed, the evaluation is not written.
    (stopped / "metrics.json").write_text((tmp_path / "whole/metrics.json").read_text())
    resumed = run(stopped, *evaluate, f"ckpt_path={last}")
    assert resumed["global_steps"] == whole["global_steps"] and resumed["input_tokens"] == whole["input_tokens"]
    assert resumed["val_loss_by_epoch"] == whole["val_loss_by_epoch"]
    for name in ("predictions.jsonl", "test_losses.json"):
        assert (stopped / "evaluation" / name).read_bytes() == (tmp_path / "whole/evaluation" / name).read_bytes()

    # A failure in the evaluation: the record says failed, after a completed training (the driver resumes it)
    failed = tmp_path / "failed"
    (failed / "checkpoints").mkdir(parents=True)
    (failed / "checkpoints" / "last.ckpt").write_bytes(last.read_bytes())
    (failed / "metrics.json").write_text((tmp_path / "whole/metrics.json").read_text())

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.94 GiB")

    monkeypatch.setattr("glm_session.evaluation.evaluator.evaluate_model", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as raised:
        run(failed, *evaluate, f"ckpt_path={failed / 'checkpoints' / 'last.ckpt'}")
    record_failure(failed, raised.value)
    record = json.loads((failed / "metrics.json").read_text())
    assert record["status"] == "failed" and record["failed_after_training"] is True
    assert record["error"].startswith("OutOfMemoryError: CUDA out of memory")
    record_failure(failed, ValueError("the checkpoint could not be read"))  # failed again, before training ended
    assert "failed_after_training" not in json.loads((failed / "metrics.json").read_text())
    monkeypatch.undo()
    run(failed, *evaluate, f"ckpt_path={failed / 'checkpoints' / 'last.ckpt'}")
    for name in ("predictions.jsonl", "test_losses.json"):
        assert (failed / "evaluation" / name).read_bytes() == (tmp_path / "whole/evaluation" / name).read_bytes()
    assert json.loads((failed / "metrics.json").read_text())["status"] == "completed"


KILL_WHILE_SAVING = """
import os, signal, sys, torch
from glm_session.training.checkpoint_io import AtomicCheckpointIO
io = AtomicCheckpointIO()
path = sys.argv[1]
io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)

def dying_save(obj, f, *args, **kwargs):
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = dying_save
io.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
"""


def test_kill_while_saving_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    result = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, str(path)], capture_output=True)
    assert result.returncode == -9, result.stderr
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["weights"], torch.ones(1000))
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]  # the partial file is no checkpoint
    assert not any("last" in p.name for p in tmp_path.iterdir() if p.name != "last.ckpt")
