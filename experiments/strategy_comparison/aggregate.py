"""Aggregate a strategy x reduction sweep into results.json, README tables and plots.

    python experiments/strategy_comparison/aggregate.py SWEEP_DIR [--out DIR] [--weights WEIGHTS_JSON]
        [--context context.md] [--discussion discussion.md]

SWEEP_DIR holds one folder per job (``python -m glm_session.train -m +sweep=strategy_x_reduction``), each with
``.hydra/overrides.yaml``, and ``metrics.json`` and ``evaluation/metrics.json`` once it has finished. A job with a
``failed.txt``, or without its metrics, is reported as failed with the reason; the others are aggregated.

Per arm (strategy + reduction), mean ± std over seeds of: time per epoch, input tokens per epoch, answer tokens/s,
final validation loss overall and by turn, ROUGE-1/2/L overall and by turn; validation loss at equal epochs (the
last) and at equal training time and equal FLOPs (interpolated between validations, at the soonest last
validation of any job). Plots: validation
loss against training time, ROUGE-L by turn, gradient weight by turn (WEIGHTS_JSON, from
``python -m glm_session.analysis report``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

MAX_TURN = 8  # turns above this are few in KdConv's test split (columns 1..MAX_TURN)
COLORS = {"split": "tab:orange", "session": "tab:blue"}
STYLES = {"token": "-", "sample": "--", "turn": ":"}


def read_job(folder: Path) -> dict:
    overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
    choice = dict(o.split("=", 1) for o in overrides if "=" in o)
    job = {
        "folder": folder.name,
        "strategy": choice.get("experiment", "?").removeprefix("finetune_"),
        "reduction": choice.get("loss", "token"),
        "seed": int(choice.get("seed", 0)),
        "overrides": overrides,
    }
    failed = folder / "failed.txt"
    metrics, evaluation = folder / "metrics.json", folder / "evaluation" / "metrics.json"
    if failed.exists():
        job["error"] = failed.read_text().strip().splitlines()[-1]
    elif not metrics.exists():
        job["error"] = "no metrics.json: the job did not finish training"
    elif not evaluation.exists():
        job["error"] = "no evaluation/metrics.json: the job did not finish its evaluation"
    if "error" in job:
        return job
    m, e = json.loads(metrics.read_text()), json.loads(evaluation.read_text())
    curve = m.get("val_curve", [])
    job.update(
        epochs=m["history"][-1]["epoch"] + 1 if m["history"] else 1,
        train_seconds=m["train_seconds"],
        train_flops=m.get("train_flops"),
        input_tokens_per_epoch=m["data"]["input_tokens"],
        supervised_tokens_per_epoch=m["data"]["supervised_tokens"],
        answer_tokens_per_second=m["supervised_tokens_per_second"],
        val_loss=m["val_loss_by_epoch"][-1],
        val_loss_by_turn={int(k): v for k, v in m["val_loss_by_turn"].items()},
        val_curve=curve,
        rouge=e["rouge"],
        rouge_by_turn={int(k): v for k, v in e["rouge_by_turn"].items()},
        teacher_forced=e.get("teacher_forced"),
    )
    job["seconds_per_epoch"] = job["train_seconds"] / job["epochs"]
    return job


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def interpolate(curve: list[dict], key: str, at: float) -> float | None:
    """The validation loss at ``key`` = ``at`` (linear between validations; None beyond the last)."""
    points = [(p[key], p["loss"]) for p in curve if p.get(key) is not None]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= at <= x1:
            return y0 + (y1 - y0) * (at - x0) / (x1 - x0) if x1 > x0 else y1
    return None  # before the first validation or after the last


def aggregate(jobs: list[dict]) -> dict:
    ok = [j for j in jobs if "error" not in j]
    arms: dict[str, list[dict]] = defaultdict(list)
    for job in ok:
        arms[f"{job['strategy']}+{job['reduction']}"].append(job)
    # equal time / FLOPs: the last validation of the job that got there soonest (every job has a curve up to it)
    ended = [j["val_curve"][-1] for j in ok if j["val_curve"]]
    equal_seconds = min((p["train_seconds"] for p in ended), default=None)
    equal_flops = min((p["train_flops"] for p in ended), default=None)
    summary = {}
    for arm, js in sorted(arms.items()):
        turns = sorted({t for j in js for t in j["rouge_by_turn"]})
        summary[arm] = {
            "seeds": sorted(j["seed"] for j in js),
            "seconds_per_epoch": mean_std([j["seconds_per_epoch"] for j in js]),
            "input_tokens_per_epoch": mean_std([j["input_tokens_per_epoch"] for j in js]),
            "answer_tokens_per_second": mean_std([j["answer_tokens_per_second"] for j in js]),
            "train_seconds": mean_std([j["train_seconds"] for j in js]),
            "val_loss": mean_std([j["val_loss"] for j in js]),
            "val_loss_at_equal_seconds": mean_std(
                [interpolate(j["val_curve"], "train_seconds", equal_seconds) for j in js]
            ),
            "val_loss_at_equal_flops": mean_std(
                [interpolate(j["val_curve"], "train_flops", equal_flops) for j in js]
            ),
            "val_loss_by_turn": {t: mean_std([j["val_loss_by_turn"].get(t) for j in js]) for t in turns},
            "rouge": {k: mean_std([j["rouge"][k] for j in js]) for k in ("rouge1", "rouge2", "rougeL")},
            "rouge_by_turn": {
                t: {k: mean_std([j["rouge_by_turn"].get(t, {}).get(k) for j in js]) for k in ("rouge1", "rougeL")}
                for t in turns
            },
        }
    return {"equal_seconds": equal_seconds, "equal_flops": equal_flops, "arms": summary}


def fmt(pair: tuple[float, float], digits: int = 3, scale: float = 1.0) -> str:
    mean, std = pair
    if mean != mean:  # nan
        return "–"
    return f"{mean * scale:,.{digits}f} ± {std * scale:,.{digits}f}"


def tables(result: dict, jobs: list[dict]) -> str:
    arms = result["arms"]
    out = ["| arm | seeds | time / epoch (s) | input tokens / epoch | answer tokens/s | final val loss | "
           f"val loss at {result['equal_seconds'] or 0:.0f} s | val loss at equal FLOPs | ROUGE-1 | ROUGE-2 | ROUGE-L |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for arm, a in arms.items():
        out.append(
            f"| {arm} | {len(a['seeds'])} | {fmt(a['seconds_per_epoch'], 1)} | {fmt(a['input_tokens_per_epoch'], 0)} | "
            f"{fmt(a['answer_tokens_per_second'], 0)} | {fmt(a['val_loss'])} | {fmt(a['val_loss_at_equal_seconds'])} | "
            f"{fmt(a['val_loss_at_equal_flops'])} | {fmt(a['rouge']['rouge1'], 2)} | {fmt(a['rouge']['rouge2'], 2)} | "
            f"{fmt(a['rouge']['rougeL'], 2)} |"
        )
    turns = range(1, MAX_TURN + 1)
    out += ["", "Final validation loss by turn index (mean ± std over seeds):", "",
            "| arm | " + " | ".join(str(t) for t in turns) + " |", "|---" * (MAX_TURN + 1) + "|"]  # fmt: skip
    for arm, a in arms.items():
        out.append(
            f"| {arm} | "
            + " | ".join(fmt(a["val_loss_by_turn"].get(t, (float("nan"),) * 2), 3) for t in turns)
            + " |"
        )
    out += ["", "ROUGE-L by turn index (test split, mean ± std over seeds):", "",
            "| arm | " + " | ".join(str(t) for t in turns) + " |", "|---" * (MAX_TURN + 1) + "|"]  # fmt: skip
    for arm, a in arms.items():
        cells = [fmt(a["rouge_by_turn"][t]["rougeL"], 2) if t in a["rouge_by_turn"] else "–" for t in turns]
        out.append(f"| {arm} | " + " | ".join(cells) + " |")
    failed = [j for j in jobs if "error" in j]
    out += ["", f"Jobs: {len(jobs)}, finished {len(jobs) - len(failed)}, failed {len(failed)}."]
    for j in failed:
        out.append(f"- failed: `{j['folder']}`: {j['error']}")
    return "\n".join(out) + "\n"


def by_turn_plot(series: dict[str, dict[int, float]], ylabel: str, path: Path) -> str:
    """One line per arm (``strategy+reduction``) of a value by turn index, turns 1..MAX_TURN; returns the file name."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, by_turn in series.items():
        strategy, reduction = arm.split("+")
        turns = [t for t in sorted(by_turn) if t <= MAX_TURN]
        ax.plot(turns, [by_turn[t] for t in turns], STYLES[reduction], color=COLORS.get(strategy), marker="o",
                label=arm)  # fmt: skip
    ax.set_xlabel("turn index")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def plots(result: dict, jobs: list[dict], weights: dict | None, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for job in (j for j in jobs if "error" not in j):
        xs = [p["train_seconds"] for p in job["val_curve"]]
        ys = [p["loss"] for p in job["val_curve"]]
        label = f"{job['strategy']}+{job['reduction']}" if job["seed"] == 0 else None
        ax.plot(
            xs, ys, STYLES[job["reduction"]], color=COLORS.get(job["strategy"]), alpha=0.8, label=label, marker="."
        )
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation loss (answer tokens)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "val_loss_vs_time.png", dpi=120)
    names.append("val_loss_vs_time.png")
    plt.close(fig)

    rouge = {arm: {t: v["rougeL"][0] for t, v in a["rouge_by_turn"].items()} for arm, a in result["arms"].items()}
    names.append(by_turn_plot(rouge, "ROUGE-L (test)", out / "rouge_by_turn.png"))
    if weights:
        shares = {arm: {int(t): w for t, w in by_turn.items()} for arm, by_turn in weights["per_step"].items()}
        names.append(by_turn_plot(shares, "share of the gradient weight", out / "gradient_weight_by_turn.png"))
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--weights", type=Path, help="weights.json of python -m glm_session.analysis report")
    parser.add_argument("--context", type=Path, help="markdown put before the tables (commands, machine, date)")
    parser.add_argument("--discussion", type=Path, help="markdown put after the tables")
    args = parser.parse_args()
    folders = sorted(p.parent.parent for p in args.sweep.glob("*/.hydra/overrides.yaml"))
    jobs = [read_job(folder) for folder in folders]
    result = aggregate(jobs)
    weights = json.loads(args.weights.read_text()) if args.weights else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"summary": result, "jobs": jobs, "gradient_weights": weights}, indent=2) + "\n"
    )
    figures = plots(result, jobs, weights, args.out)
    parts = ["# Strategy comparison: split vs session samples x loss reduction", ""]
    if args.context and args.context.exists():
        parts += [args.context.read_text().strip(), ""]
    parts += ["## Results", "", tables(result, jobs)]
    parts += [f"![{name}]({name})" for name in figures] + [""]
    if args.discussion and args.discussion.exists():
        parts += [args.discussion.read_text().strip(), ""]
    (args.out / "README.md").write_text("\n".join(parts))
    print(tables(result, jobs))


if __name__ == "__main__":
    main()
