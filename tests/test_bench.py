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
