"""The benchmark script on a tiny scale: all four configurations in one run, exact epoch token counts, a ratio."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def load_script(name: str, path: str):
    """A script under experiments/ as a module (they are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_run_all():
    return load_script("run_all", "bench/run_all.py")


@pytest.mark.slow
def test_bench_writes_every_configuration_and_the_ratios(tmp_path, cache_dir):
    command = [sys.executable, "experiments/bench/bench.py", "--out", str(tmp_path), "--", "model=chatglm2-tiny",
               "trainer.max_steps=2", "metrics.warmup_batches=1", "data.limit=10", "data.max_seq_len=512",
               "data.batch_tokens=1024", f"data.cache_dir={cache_dir}"]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    by_name = {r["name"]: r for r in summary["results"]}
    assert list(by_name) == ["split+padding", "split+packing", "session+padding", "session+packing"]
    assert all("error" not in r and r["steps"] == 2 for r in by_name.values())
    # both constructions supervise the same answer tokens; split feeds more input tokens for them
    split, session = by_name["split+padding"], by_name["session+packing"]
    assert split["epoch_supervised_tokens"] == session["epoch_supervised_tokens"]
    assert split["epoch_input_tokens"] > session["epoch_input_tokens"]
    assert by_name["split+packing"]["epoch_padding_fraction"] < split["epoch_padding_fraction"]
    assert summary["answer_tokens_per_second_vs_split_padding"]["split+padding"] == 1.0
    assert (tmp_path / "table.md").read_text().count("\n") == 6
    assert (tmp_path / "answer_tokens_per_second.png").stat().st_size > 0


def test_every_variant_of_the_gpu_benchmark_is_a_valid_config():
    """A misspelt override would cost a GPU call: each variant of ``experiments/bench/run_all.py`` composes."""
    from omegaconf import OmegaConf

    from glm_session.config import compose_config

    run_all = load_run_all()
    for variants, common in ((run_all.VARIANTS_1B, run_all.ONE_B), (run_all.VARIANTS_SMALL, run_all.SMALL),
                             (run_all.FSDP_VARIANTS, ["trainer=fsdp", "model=chatglm2-6b"])):  # fmt: skip
        for name, overrides in variants.items():
            cfg = compose_config("train", [*common, *overrides])
            for key, value in (o.split("=", 1) for o in overrides if "." in o.split("=", 1)[0]):
                found = OmegaConf.select(cfg, key)
                assert ("null" if found is None else str(found).lower()) == value.lower(), (name, key)
    bf16_copies = compose_config("train", [*run_all.ONE_B, *run_all.VARIANTS_1B["fast+bf16_copies"]])
    assert bf16_copies.trainer.precision == "32-true"  # bf16 from FSDP2's policy, not autocast
    assert bf16_copies.trainer.strategy.reshard_after_forward is False
    assert not bf16_copies.trainer.strategy.activation_checkpointing
    # FSDP2 on one GPU starts a process group, which stays to the end of bench.py's process: its run goes last;
    # CUDA graphs' memory pools stay too: theirs goes just before
    chosen = ["fast+bf16_copies", "fast+whole_cudagraphs", "reference", "fast+whole_graph"]
    arguments = run_all.bench_arguments(run_all.VARIANTS_1B, chosen)
    assert arguments[:2] == ["--only", "session+packing"]
    assert [a.split("=")[0] for a in arguments[3::2]] == [
        "session+packing fast+whole_graph",
        "session+packing fast+whole_cudagraphs",
        "session+packing fast+bf16_copies",
    ]
    half = compose_config("train", ["trainer=fsdp", *run_all.FSDP_VARIANTS["scale_fast_recompute_half"]])
    assert half.trainer.strategy.checkpoint_every_n_layers == 2
    with pytest.raises(Exception, match="trainer.strategy.checkpoint_every_n_layer"):
        compose_config("train", ["trainer=fsdp", "trainer.strategy.checkpoint_every_n_layer=2"])
    # the 6B's profile is of the very step the fsdp part measured (experiments/scale/run.py adds the micro-batch)
    steps = run_all.project_steps(Path("out"), ["profile_6b_recompute_half"], [], [])
    ((_, name, command, _),) = steps
    profiled = compose_config("train", command[command.index("--") + 1 :])
    assert name == "profile_6b_recompute_half" and "profile_6b_recompute_half" in run_all.PARTS
    assert (profiled.data.batch_tokens, profiled.model.loss_chunk_tokens) == (16384, 8192)
    assert profiled.trainer.strategy.checkpoint_every_n_layers == 2 and profiled.trainer.devices == 1


def test_a_step_past_its_limit_is_killed_with_what_it_started(tmp_path):
    """A timed-out ``torchrun`` step left its workers alive on the GPU of 2026-12-05 (holding the rendezvous port,
    so the next step failed with EADDRINUSE): a step's whole process group is killed at its limit."""
    grandchild = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
                  "'import time; time.sleep(60)']); print(child.pid, flush=True); time.sleep(60)")  # fmt: skip
    steps = load_run_all().Steps(tmp_path, time.monotonic() + 600)
    started = time.monotonic()
    steps("sleeper", [sys.executable, "-c", grandchild], limit=3, gpus="")
    assert time.monotonic() - started < 30 and steps.records[-1]["returncode"] == "timeout"
    pid = int((tmp_path / "sleeper.log").read_text().split()[0])
    stat = Path(f"/proc/{pid}/stat")
    for _ in range(100):  # the kill is asynchronous: gone, or a zombie that init has yet to reap
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        raise AssertionError(f"process {pid}, started by the timed-out step, is still running")


def test_the_scale_runner_skips_a_card_too_small_for_the_6b_states():
    """The 6B's full fine-tuning on one 80 GB H100 (2026-12-05) went out of memory at AdamW's first step, at every
    micro-batch the runner halved down to: its 16 bytes a parameter of fp32 state do not fit. ChatGLM2-6B's
    parameters, counted by hand: 2 x 65,024 x 4,096 (embedding, output layer) + 4,096 (final norm) + 28 layers x
    (4,096 x 4,608 + 4,608 (qkv, bias) + 4,096^2 (dense) + 4,096 x 27,392 (gate_up) + 13,696 x 4,096 (down)
    + 2 x 4,096 (norms)) = 6,243,584,000."""
    scale_run = load_script("scale_run", "scale/run.py")
    assert scale_run.states_gib(1) == 6_243_584_000 * 16 / 2**30  # 93.04
    assert scale_run.why_it_cannot_fit(1, 79.18) == (
        "93.0 GiB of weights, gradients and AdamW states per GPU; this card has 79.2 GiB"
    )
    assert scale_run.why_it_cannot_fit(1, 139.8) is None and scale_run.why_it_cannot_fit(2, 79.18) is None


def test_the_scale_runner_takes_the_micro_batch_only_as_its_own_argument(monkeypatch, capsys):
    """An override ``data.batch_tokens=4096`` would win over ``--batch-tokens`` in the run yet not in the runner's
    record or its halving after an out-of-memory run: refused, naming the argument to use."""
    scale_run = load_script("scale_run", "scale/run.py")
    monkeypatch.setattr("sys.argv", ["run.py", "--out", "unused.json", "data.batch_tokens=4096"])
    with pytest.raises(SystemExit) as exit_:
        scale_run.main()
    assert exit_.value.code == 2
    assert "give the micro-batch as --batch-tokens N" in capsys.readouterr().err
    run_all = load_run_all()
    assert all(not o.startswith("data.batch_tokens=") for v in run_all.FSDP_VARIANTS.values() for o in v)


def test_the_gpu_benchmark_refuses_a_work_folder_with_an_earlier_calls_runs(tmp_path, monkeypatch, capsys):
    """On 2026-12-06 a warm H200 kept ``/tmp/glm_session_bench`` between calls, and ``summarise`` gathered the call
    before's 6B run into the next call's ``scale.json``, its ratio taken against another call's ``fsdp_step.py``.
    A call now starts in a new folder, and a ``--work`` folder that holds anything is refused."""
    (tmp_path / "scale_fast_project.json").write_text("{}")
    monkeypatch.setattr("sys.argv", ["run_all.py", "--out", str(tmp_path / "out"), "--baselines", "unused",
                                     "--work", str(tmp_path)])  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        load_run_all().main()
    assert exit_.value.code == 2
    assert f"--work {tmp_path} is not empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
