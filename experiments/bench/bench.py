"""Benchmark split vs session samples, padded vs packed, on the bundled KdConv, in one run.

    python experiments/bench/bench.py --out DIR [--profile] [--variant NAME ...] -- [train overrides]

For each configuration (split+padding, split+packing, session+padding, session+packing) it trains
``trainer.max_steps`` optimizer steps with ``python -m glm_session.train``'s code (``train(cfg)``; no validation,
no checkpoints) and records, from the data statistics and the run's ``metrics.json``:

- input tokens and padding fraction of one epoch (exact, from the batches of epoch 0);
- input and answer (supervised) tokens trained per second, after ``metrics.warmup_batches`` warm-up batches;
- time per epoch = the epoch's input tokens / the measured input tokens per second (the runs are shorter than an
  epoch: the rate is measured, the epoch time follows from it);
- peak GPU memory and MFU (``glm_session.model.flops``) on a GPU.

It writes ``DIR/results.json``, ``DIR/table.md`` and ``DIR/answer_tokens_per_second.png``. ``--variant`` adds
runs of session+packing with other overrides (``name=override,override``: e.g. larger batches), for tuning;
``--profile`` writes a torch profiler table of a few session+packing steps to ``DIR/profile_*.txt``.
A configuration that fails is recorded with its error; the others still run.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
import traceback
from datetime import date
from pathlib import Path

import torch

from glm_session.config import compose_config
from glm_session.train import train

CONFIGURATIONS = {
    "split+padding": ["strategy=split", "data.packing=false"],
    "split+packing": ["strategy=split", "data.packing=true"],
    "session+padding": ["strategy=session", "data.packing=false"],
    "session+packing": ["strategy=session", "data.packing=true"],
}


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def profiler_overrides(path: Path) -> list[str]:
    """Lightning's PyTorchProfiler over steps 4-6 (3 skipped, 1 warm-up); its op table goes to ``path``."""
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    p = "+trainer.profiler"
    return [f"{p}._target_=lightning.pytorch.profilers.PyTorchProfiler", f"{p}.dirpath={path.parent}",
            f"{p}.filename={path.stem}", f"{p}.sort_by_key={sort}", f"{p}.row_limit=40", f"{p}.export_to_chrome=false",
            f"{p}.schedule._target_=torch.profiler.schedule", f"{p}.schedule.wait=2", f"{p}.schedule.warmup=1",
            f"{p}.schedule.active=3", f"{p}.schedule.repeat=1"]  # fmt: skip


def run_one(name: str, overrides: list[str], runs: Path) -> dict:
    cfg = compose_config("train", ["profile=throughput", *overrides, f"output_dir={runs / name}"])
    started = time.perf_counter()
    metrics, _ = train(cfg)
    data = metrics["data"]
    tokens_per_second = metrics["tokens_per_second"]
    return {
        "name": name,
        "status": metrics["status"],  # train returns only for a completed run (a stop raises)
        "overrides": overrides,
        "model": cfg.model.preset,
        "parameters": metrics["parameters"],
        "max_seq_len": cfg.data.max_seq_len,
        "batch_tokens": cfg.data.batch_tokens,
        "steps": metrics["global_steps"],
        "warmup_batches": metrics["warmup_batches"],
        "epoch_input_tokens": data["input_tokens"],
        "epoch_supervised_tokens": data["supervised_tokens"],
        "epoch_padding_fraction": data["padding_fraction"],
        "tokens_per_second": tokens_per_second,
        "answer_tokens_per_second": metrics["supervised_tokens_per_second"],
        "epoch_seconds": data["input_tokens"] / tokens_per_second,
        "mfu": metrics.get("mfu"),
        "peak_memory_gib": metrics.get("peak_memory_gib"),
        "accelerator": metrics.get("accelerator", machine()),
        "run_seconds": time.perf_counter() - started,
    }


def table(results: list[dict]) -> str:
    head = ("| configuration | epoch input tokens | padding | tokens/s | answer tokens/s | epoch time (s) | "
            "MFU | peak memory (GiB) |\n|---|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    lines = [head]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'].splitlines()[-1][:80]} | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "–"
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "–"
        lines.append(
            f"| {r['name']} | {r['epoch_input_tokens']:,} | {100 * r['epoch_padding_fraction']:.2f}% | "
            f"{r['tokens_per_second']:,.0f} | {r['answer_tokens_per_second']:,.0f} | {r['epoch_seconds']:,.1f} | "
            f"{mfu} | {memory} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r["name"] for r in ok], [r["answer_tokens_per_second"] for r in ok], color="tab:blue")
    ax.set_ylabel("answer tokens / s")
    ax.set_title(f"{ok[0]['model']} on KdConv, {ok[0]['accelerator']}" if ok else "no results")
    ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results.json, table.md, plot, profile")
    parser.add_argument("--runs", type=Path, help="the runs' folders (default: OUT/runs)")
    parser.add_argument("--profile", action="store_true", help="profile a few session+packing steps")
    parser.add_argument("--variant", action="append", default=[], help="name=override,override (session+packing)")
    parser.add_argument("--only", nargs="*", help="run only these configurations (none: the variants only)")
    parser.add_argument("overrides", nargs="*", help="train overrides for every run (after --)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs_dir = args.runs or args.out / "runs"

    runs = {
        name: [*args.overrides, *o] for name, o in CONFIGURATIONS.items() if args.only is None or name in args.only
    }
    for variant in args.variant:
        name, _, extra = variant.partition("=")
        runs[name] = [*args.overrides, *CONFIGURATIONS["session+packing"], *extra.split(",")]
    results = []
    for name, overrides in runs.items():
        print(f"== {name}: {' '.join(overrides)}", flush=True)
        try:
            results.append(run_one(name, overrides, runs_dir))
        except Exception:  # a failed configuration is reported; the others still run
            results.append({"name": name, "overrides": overrides, "error": traceback.format_exc()})
        print(json.dumps(results[-1], indent=1)[:2000], flush=True)
        write(args.out, results)
        gc.collect()  # the finished run's model and optimizer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if args.profile:
        try:
            profile = [*CONFIGURATIONS["session+packing"], "trainer.max_steps=6", "metrics.warmup_batches=0"]
            run_one(
                "profile", [*args.overrides, *profile, *profiler_overrides(args.out / "profile.txt")], runs_dir
            )
        except Exception:
            (args.out / "profile_error.txt").write_text(traceback.format_exc())

    write(args.out, results)


def write(out: Path, results: list[dict]) -> None:
    """results.json, table.md and the plot of the results so far."""
    by_name = {r["name"]: r for r in results if "error" not in r}
    ratios = {}
    if "session+packing" in by_name and "split+padding" in by_name:
        base = by_name["split+padding"]["answer_tokens_per_second"]
        ratios = {name: r["answer_tokens_per_second"] / base for name, r in by_name.items()}
    summary = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "torch": torch.__version__,
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "answer_tokens_per_second_vs_split_padding": ratios,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(table(results))
    plot(results, out / "answer_tokens_per_second.png")
    print(table(results))
    print("ratios vs split+padding:", json.dumps(ratios, indent=1), flush=True)


if __name__ == "__main__":
    main()
