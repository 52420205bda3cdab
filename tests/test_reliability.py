"""A run that is stopped loses nothing and says so; nothing a checkpoint says can run code (issue 20).

Signals (SIGTERM, SIGINT, SLURM's preemption) stop training after the optimizer step in flight with an exact
checkpoint, a status record and one line saying how to resume; a stopped sweep says what became of every job; a run
folder has one owner; a full disk keeps the previous state and says so in one line; a checkpoint's model config cannot
make transformers fetch code; resuming compares data by content; texts with nothing visible are input errors; every
command's error is one line.
"""

import errno
import json
import os
import stat
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from test_resume import OVERRIDES

from glm_session.atomic_files import WriteError, new_folder, write_text
from glm_session.config import compose_config
from glm_session.errors import ConfigError
from glm_session.run_status import run_status
from glm_session.train import train
from glm_session.training.run_lock import RunFolderLock

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
STOP = ["trainer.accumulate_grad_batches=2", "+callbacks.signal._target_=helpers.SignalAtStep",
        "+callbacks.signal.step=3"]  # fmt: skip


def command(run_dir: Path, *extra: str, multirun: bool = False) -> list[str]:
    folder = f"hydra.sweep.dir={run_dir}" if multirun else f"hydra.run.dir={run_dir}"
    return [sys.executable, "-m", "glm_session.train", *(["-m"] if multirun else []), *OVERRIDES, folder, *extra]


def launch(arguments: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(arguments, env=env or ENV, capture_output=True, text=True, timeout=600)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())  # valid JSON, whatever happened


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir) -> dict:
    """The run the stopped ones must end like: 2 micro-batches a step, never interrupted."""
    folder = tmp_path_factory.mktemp("whole")
    cfg = compose_config("train", [*OVERRIDES, "trainer.accumulate_grad_batches=2", f"data.cache_dir={cache_dir}",
                                   f"output_dir={folder}"])  # fmt: skip
    return train(cfg)[0]


@pytest.mark.slow
@pytest.mark.parametrize("signal,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_after_the_step_in_flight_and_the_run_resumes_exactly(
    tmp_path, cache_dir, uninterrupted, signal, code
):
    """The signal comes while the first micro-batch of step 4 trains: step 4 is finished, saved, recorded."""
    cache = f"data.cache_dir={cache_dir}"
    stopped = tmp_path / "stopped"
    result = launch(command(stopped, cache, *STOP, f"+callbacks.signal.signal={signal}"))
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    record = metrics(stopped)
    assert record["status"] == "stopped" and record["signal"] == signal and record["stopped_at_step"] == 4
    checkpoint = stopped / "checkpoints" / "last.ckpt"
    assert (
        record["checkpoint"] == str(checkpoint) and torch.load(checkpoint, weights_only=True)["global_step"] == 4
    )
    line = [line for line in result.stderr.splitlines() if line.startswith("stopped by")]
    assert line == [f"stopped by {signal} after optimizer step 4 (epoch 0); checkpoint {checkpoint}; resume with: "
                    f"{line[0].split('resume with: ')[1]}"]  # fmt: skip
    assert line[0].endswith(f"ckpt_path={checkpoint}")

    resumed = tmp_path / "resumed"
    result = launch(command(resumed, cache, "trainer.accumulate_grad_batches=2", f"ckpt_path={checkpoint}"))
    assert result.returncode == 0, result.stderr[-3000:]
    final = metrics(resumed)
    assert final["status"] == "completed" and final["global_steps"] == uninterrupted["global_steps"]
    assert final["val_loss_by_epoch"] == pytest.approx(uninterrupted["val_loss_by_epoch"], abs=1e-6)


@pytest.mark.slow
def test_stop_after_step_stops_as_a_signal_would_and_the_run_resumes_exactly(tmp_path, cache_dir, uninterrupted):
    cache = f"data.cache_dir={cache_dir}"
    stopped = tmp_path / "stopped"
    result = launch(command(stopped, cache, "trainer.accumulate_grad_batches=2", "stop_after_step=3"))
    assert result.returncode == 0, result.stderr[-3000:]  # asked for: not an interruption
    record = metrics(stopped)
    assert record["status"] == "stopped" and record["signal"] == "stop_after_step"
    assert record["stopped_at_step"] == record["global_steps"] == 3
    # how far it got, for a driver that must know whether the rest fits in its time
    assert record["planned_steps"] == uninterrupted["planned_steps"] == uninterrupted["global_steps"]
    checkpoint = stopped / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 3
    assert [line for line in result.stderr.splitlines() if line.startswith("stopped by")][0].startswith(
        f"stopped by stop_after_step after optimizer step 3 (epoch 0); checkpoint {checkpoint}; resume with: "
    )
    # The resumed run keeps stop_after_step=3: it starts after step 3, so it does not stop again.
    result = launch(command(stopped, cache, "trainer.accumulate_grad_batches=2", "stop_after_step=3",
                            f"ckpt_path={checkpoint}"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    final = metrics(stopped)
    assert final["status"] == "completed" and final["global_steps"] == uninterrupted["global_steps"]
    assert final["val_loss_by_epoch"] == pytest.approx(uninterrupted["val_loss_by_epoch"], abs=1e-6)


def test_stop_after_step_must_be_a_positive_step(tmp_path):
    result = launch(command(tmp_path / "run", "stop_after_step=0"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert error_lines(result.stderr) == ["error: stop_after_step=0: must be an integer >= 1 or null"]


@pytest.mark.slow
def test_a_stopped_sweep_says_which_jobs_ran_stopped_and_never_started(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    result = launch(command(sweep, f"data.cache_dir={cache_dir}", "trainer.max_epochs=1", "seed=0,1,2",
                            "+callbacks.signal._target_=helpers.SignalAtStepIfSeed", "+callbacks.signal.step=2",
                            "+callbacks.signal.seed=1", "+callbacks.signal.run_seed=${seed}", multirun=True))  # fmt: skip
    assert result.returncode == 143, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert "sweep: completed: jobs 0" in lines and "sweep: stopped: jobs 1" in lines
    assert "sweep: never started: 2 (seed=2)" in lines
    assert any(line.startswith("job 1 stopped by SIGTERM after optimizer step 3") for line in lines)
    assert run_status(sweep / "0") == "completed" and run_status(sweep / "1") == "stopped"
    assert not (sweep / "2").exists()


@pytest.mark.slow
def test_a_slurm_preemption_saves_at_a_step_boundary_requeues_and_the_relaunch_resumes(
    tmp_path, cache_dir, uninterrupted
):
    """SLURM's environment as Lightning's own tests fake it, and an ``scontrol`` that records its arguments. The
    relaunch (same command, a new run folder) resumes through the project's resume check: with another strategy
    it is refused."""
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "glm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip
    env = {**ENV, **slurm, "PATH": f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}"}
    cache = f"data.cache_dir={cache_dir}"
    first = tmp_path / "runs" / "first"
    result = launch(command(first, cache, *STOP, "+callbacks.signal.signal=SIGUSR1"), env)
    assert result.returncode == 128 + 10, result.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    record = metrics(first)
    assert record["preempted"] and record["stopped_at_step"] == 4 and record["slurm_job"] == "4242"
    assert not list(first.glob("hpc_ckpt_*"))  # Lightning's mid-batch save is not made

    refused = launch(command(tmp_path / "runs" / "split", cache, "trainer.accumulate_grad_batches=2", "strategy=split"),
                     {**env, "SLURM_RESTART_COUNT": "1"})  # fmt: skip
    assert refused.returncode == 2 and "strategy: 'session' -> 'split'" in error_lines(refused.stderr)[0]
    relaunch = tmp_path / "runs" / "relaunch"
    result = launch(
        command(relaunch, cache, "trainer.accumulate_grad_batches=2"), {**env, "SLURM_RESTART_COUNT": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming SLURM job 4242's preempted run from {first / 'checkpoints' / 'last.ckpt'}" in result.stdout
    final = metrics(relaunch)
    assert final["global_steps"] == uninterrupted["global_steps"]
    assert final["val_loss_by_epoch"] == pytest.approx(uninterrupted["val_loss_by_epoch"], abs=1e-6)


def test_a_second_run_into_a_busy_folder_ends_with_one_line_naming_the_owner(tmp_path, cache_dir):
    folder = tmp_path / "run"
    with RunFolderLock(folder):
        result = launch(command(folder, f"data.cache_dir={cache_dir}"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: {folder}: in use by another run (pid {os.getpid()} on ")
    assert not (folder / "checkpoints").exists()
    with RunFolderLock(folder):  # free again once its owner let go (or died: the system releases it)
        pass


def test_run_folder_names_differ_between_processes_started_together():
    code = "from glm_session.config import run_stamp; print(run_stamp())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "WORLD_SIZE"}
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(3)]  # fmt: skip
    stamps = [p.communicate()[0].strip() for p in processes]
    assert len(set(stamps)) == 3 and all(s.endswith(f"_{p.pid}") for s, p in zip(stamps, processes, strict=True))


# a full disk ----------------------------------------------------------------------------------------


def test_an_atomic_write_that_fails_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_text(path, '{"status": "completed"}\n')

    def full(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(
        WriteError, match=r"metrics.json: the file could not be written \(No space left on device\)"
    ):
        write_text(path, '{"status": "compl')
    assert json.loads(path.read_text()) == {"status": "completed"} and os.listdir(tmp_path) == ["metrics.json"]


@pytest.mark.slow
def test_a_full_disk_during_training_keeps_the_last_checkpoint_and_says_so_in_one_line(tmp_path, cache_dir):
    """Saves fail with ENOSPC from step 3's on (helpers.FullDiskAfterStep): one line, exit 2, the step-2
    checkpoint whole, metrics.json valid JSON."""
    run_dir = tmp_path / "run"
    result = launch(command(run_dir, f"data.cache_dir={cache_dir}", "callbacks.last_checkpoint.every_n_train_steps=1",
                            "+callbacks.full._target_=helpers.FullDiskAfterStep", "+callbacks.full.step=3"))  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert (
        "last.ckpt: the checkpoint could not be written (No space left on device); the previous one is kept"
        in line
    )
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert metrics(run_dir)["status"] == "failed" and "No space left on device" in metrics(run_dir)["error"]
    assert "failed_after_training" not in metrics(run_dir)  # it failed in its training: not resumed to evaluate
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_failed_export_leaves_nothing_and_can_be_retried(tmp_path, monkeypatch):
    dst = tmp_path / "export"

    def full_disk(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "model.safetensors"))

    with pytest.raises(WriteError, match="the export could not be written .No space left on device."):
        with new_folder(dst, "export") as folder:
            full_disk(folder)
    assert os.listdir(tmp_path) == []  # no partial folder, nothing that blocks the retry
    with new_folder(dst, "export") as folder:
        (folder / "config.json").write_text("{}")
    assert os.listdir(dst) == ["config.json"]


# code from a checkpoint --------------------------------------------------------------------------------


def test_a_checkpoint_config_never_makes_transformers_fetch_code(tmp_path, cache_dir, monkeypatch, caplog):
    import transformers.integrations.hub_kernels as hub_kernels
    import transformers.modeling_utils as modeling_utils

    from glm_session.checkpoints import load_model

    def fetch(*args, **kwargs):
        raise AssertionError("transformers was asked to fetch a Hub kernel")

    for module, name in ((hub_kernels, "get_kernel"), (modeling_utils, "lazy_import_flash_attention")):
        monkeypatch.setattr(module, name, fetch, raising=False)
    cfg = compose_config("train", [*OVERRIDES, "trainer.max_steps=1", f"data.cache_dir={cache_dir}",
                                   f"output_dir={tmp_path / 'run'}"])  # fmt: skip
    train(cfg)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    planted = checkpoint["glm_session"]["model_config"]
    planted.update(attn_implementation="kernels-community/flash-attn", auto_map={"AutoModel": "evil.Model"},
                   use_kernels=True)  # fmt: skip
    torch.save(checkpoint, tmp_path / "planted.ckpt")
    model, _ = load_model(tmp_path / "planted.ckpt")
    assert model.config._attn_implementation == "sdpa"
    assert "ignored auto_map={'AutoModel': 'evil.Model'}; use_kernels=True; attn_implementation=" in caplog.text
    with pytest.raises(
        ConfigError, match="model.attn_implementation='kernels-community/flash-attn': must be one of"
    ):
        train(compose_config("train", [*OVERRIDES, "model.attn_implementation=kernels-community/flash-attn",
                                       f"output_dir={tmp_path / 'refused'}"]))  # fmt: skip


# resuming with the same data elsewhere -----------------------------------------------------------------------


def test_resume_compares_data_by_content_and_says_what_changed(tmp_path, cache_dir, caplog):
    from glm_session.checkpoints import CheckpointError

    original = tmp_path / "original"
    train(compose_config("train", [*OVERRIDES, "trainer.max_steps=2", f"data.cache_dir={cache_dir}",
                                   f"output_dir={original}"]))  # fmt: skip
    checkpoint = original / "checkpoints" / "last.ckpt"
    copy = tmp_path / "copy"
    copy.mkdir()
    resources = Path(compose_config("train").data.train_path).parent
    for split in ("train", "validation", "test"):
        (copy / f"{split}.jsonl").write_bytes((resources / f"{split}.jsonl").read_bytes())
    moved = [f"data.{split}_path={copy / f'{split}.jsonl'}" for split in ("train", "validation", "test")]
    train(compose_config("train", [*OVERRIDES, "trainer.max_steps=3", *moved, f"data.cache_dir={cache_dir}",
                                   f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'moved'}"]))  # fmt: skip
    assert "data: the same content at another path, allowed (data.train_path: " in caplog.text
    lines = (resources / "train.jsonl").read_text().splitlines(keepends=True)
    (copy / "train.jsonl").write_text("".join(lines[:15]))  # data.limit=24: 24 sessions -> 15
    with pytest.raises(CheckpointError, match=r"data: train 24 sessions, \d+ turns -> 15 sessions, \d+ turns"):
        train(compose_config("train", [*OVERRIDES, "trainer.max_steps=3", *moved, f"data.cache_dir={cache_dir}",
                                       f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'changed'}"]))  # fmt: skip


# texts --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer,reason",
    [("\u200b\u200b", "no visible character"), ("\x00", "no visible character"), ("\ufeff", "no visible character"),
     ("\u200b \u200c", "no visible character"), (" \n\t ", "empty"), ("\u3000", "empty")],
)  # fmt: skip
def test_an_answer_with_nothing_visible_is_an_input_error(tmp_path, answer, reason):
    from glm_session.data.readers import read_sessions
    from glm_session.data.session import DataError

    path = tmp_path / "data.jsonl"
    good = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
    bad = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": answer}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    expected = "assistant text with no visible character" if reason != "empty" else "empty assistant text"
    with pytest.raises(DataError, match=rf"{path}, line 2: message 2: {expected}"):
        read_sessions(path)
    skipped = read_sessions(path, on_error="skip")
    assert len(skipped.sessions) == 1 and len(skipped.skipped) == 1


def test_unicode_forms_are_counted_and_normalised_by_choice(tmp_path, cache_dir):
    from glm_session.data import DialogueDataModule
    from glm_session.tokenizer import ChatGLM2Tokenizer

    composed = unicodedata.normalize("NFD", "café，好")
    assert composed != unicodedata.normalize("NFC", composed)
    path = tmp_path / "data.jsonl"
    record = {"messages": [{"role": "user", "content": composed}, {"role": "assistant", "content": "好的"}]}
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n")
    tokenizer = ChatGLM2Tokenizer.from_pretrained()
    kept = DialogueDataModule(tokenizer, train_path=str(path), cache_dir=cache_dir)
    assert kept.statistics("train")["non_nfc_texts"] == 1 and kept.statistics("train")["normalized_texts"] == 0
    assert kept.read("train").sessions[0].turns[0].question == composed  # as it was: nothing changed silently
    nfc = DialogueDataModule(tokenizer, train_path=str(path), cache_dir=cache_dir, normalize="NFC")
    assert nfc.statistics("train")["normalized_texts"] == 1
    assert nfc.read("train").sessions[0].turns[0].question == unicodedata.normalize("NFC", composed)
    one_file = DialogueDataModule(tokenizer, path=str(path), cache_dir=cache_dir)  # split by holdout: counted too
    assert one_file.statistics("train")["non_nfc_texts"] == 1
    with pytest.raises(ConfigError, match="data.normalize='NFD': must be null"):
        DialogueDataModule(tokenizer, train_path=str(path), cache_dir=cache_dir, normalize="NFD")


# one line ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_and_evaluate_errors_are_one_line_and_a_failing_job_is_named(tmp_path, cache_dir):
    result = launch(command(tmp_path / "bad", "data.limit=abc"))
    assert result.returncode == 2 and "Error executing job" not in result.stderr
    assert error_lines(result.stderr) == ["error: data.limit='abc': must be an integer >= 1 or null"]
    result = launch([sys.executable, "-m", "glm_session.evaluate", f"ckpt_path={tmp_path / 'none.ckpt'}"])
    assert result.returncode == 2 and "Error executing job" not in result.stderr
    assert error_lines(result.stderr) == [f"error: {tmp_path / 'none.ckpt'}: no such checkpoint file"]
    sweep = tmp_path / "sweep"
    result = launch(command(sweep, f"data.cache_dir={cache_dir}", "trainer.max_steps=1", "data.max_seq_len=1024,0",
                            multirun=True))  # fmt: skip
    assert (
        result.returncode == 2 and "Error executing job" not in result.stderr and "Traceback" not in result.stderr
    )
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: job 1 (") and "data.max_seq_len=0" in line
    assert line.endswith("failed: data.max_seq_len=0: must be an integer >= 18")
    assert run_status(sweep / "0") == "completed" and run_status(sweep / "1") == "failed"
