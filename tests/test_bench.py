"""The benchmark script on a tiny scale: all four configurations in one run, exact epoch token counts, a ratio."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


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
    import importlib.util

    from omegaconf import OmegaConf

    from glm_session.config import compose_config

    spec = importlib.util.spec_from_file_location("run_all", ROOT / "experiments" / "bench" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
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
    half = compose_config("train", ["trainer=fsdp", *run_all.FSDP_VARIANTS["scale_fast_recompute_half"]])
    assert half.trainer.strategy.checkpoint_every_n_layers == 2
    with pytest.raises(Exception, match="trainer.strategy.checkpoint_every_n_layer"):
        compose_config("train", ["trainer=fsdp", "trainer.strategy.checkpoint_every_n_layer=2"])
