"""Per-turn gradient weights of a dataset, for each strategy x reduction: a JSON file, a table and a bar chart.

Two views, both exact (``weights.py``):

- ``full_batch``: every training sample in one optimizer step;
- ``per_step``: the mean over the optimizer steps of one epoch, batched as the DataModule batches them
  (``accumulate_grad_batches`` micro-batches a step).

Next to them, the article's attribution model (``article.py``) applied to the same dialogues.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

from glm_session.analysis.article import attribution_weights
from glm_session.analysis.weights import TrainedTurn, turns_of, weights_by_turn_index
from glm_session.data.datamodule import DialogueDataModule

STRATEGIES = ("split", "session")
REDUCTIONS = ("token", "sample", "turn")


def dataset_turns(data: DialogueDataModule, split: str = "train") -> list[TrainedTurn]:
    """Every trained turn of ``split`` with its supervision weight (the sample id is the sample's row in the samples
    dataset)."""
    pipeline = data.pipeline
    sessions = pipeline.prepared(split).samples.data.column("session_index").to_pylist()
    return turns_of(pipeline.supervised_turns(split), sessions, range(len(sessions)))


def per_step_weights(
    data: DialogueDataModule,
    turns: Sequence[TrainedTurn],
    reduction: str,
    accumulate: int = 1,
    split: str = "train",
) -> dict[int, float]:
    """Mean over the optimizer steps of epoch 0 of each step's weight by turn index."""
    by_sample: dict[int, list[TrainedTurn]] = defaultdict(list)
    for t in turns:
        by_sample[t.sample].append(t)
    rows = data.pipeline.prepared(split).rows.samples
    batches = data.pipeline.batch_sampler(split).all_batches(epoch=0)
    steps = [batches[i : i + accumulate] for i in range(0, len(batches), accumulate)]
    totals: dict[int, Fraction] = defaultdict(Fraction)
    for step in steps:
        step_turns = [t for batch in step for row in batch for sample in rows[row] for t in by_sample[sample]]
        for turn, share in weights_by_turn_index(step_turns, reduction).items():
            totals[turn] += share
    return {turn: float(total / len(steps)) for turn, total in sorted(totals.items())}


def article_model_by_turn(data: DialogueDataModule, strategy: str, split: str = "train") -> dict[int, float]:
    """The article's attribution model on the dialogues of ``split``, by turn index."""
    sessions = [
        [(index, k) for k in range(1, len(s.turns) + 1)] for index, s in enumerate(data.read(split).sessions)
    ]
    by_turn: dict[int, Fraction] = defaultdict(Fraction)
    for (_, turn), weight in attribution_weights(sessions, strategy).items():
        by_turn[turn] += weight
    return {turn: float(w) for turn, w in sorted(by_turn.items())}


def weight_report(datas: dict[str, DialogueDataModule], accumulate: int = 1, split: str = "train") -> dict:
    """Weights by turn index for each strategy (``datas[strategy]``) and reduction."""
    report: dict = {"full_batch": {}, "per_step": {}, "article_model": {}}
    for strategy, data in datas.items():
        turns = dataset_turns(data, split)
        for reduction in REDUCTIONS:
            name = f"{strategy}+{reduction}"
            report["full_batch"][name] = {k: float(v) for k, v in weights_by_turn_index(turns, reduction).items()}
            report["per_step"][name] = per_step_weights(data, turns, reduction, accumulate, split)
        report["article_model"][strategy] = article_model_by_turn(data, strategy, split)
    return report


def markdown_table(weights: dict[str, dict[int, float]], max_turn: int = 12) -> str:
    """Rows: strategy+reduction; columns: turn index (the last column sums the turns above ``max_turn``)."""
    header = "| | " + " | ".join(str(k) for k in range(1, max_turn + 1)) + f" | >{max_turn} |"
    lines = [header, "|---" * (max_turn + 2) + "|"]
    for name, by_turn in weights.items():
        cells = [f"{100 * by_turn.get(k, 0.0):.1f}" for k in range(1, max_turn + 1)]
        cells.append(f"{100 * sum(v for k, v in by_turn.items() if k > max_turn):.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(weights: dict[str, dict[int, float]], path: str | Path, title: str, max_turn: int = 15) -> None:
    """Grouped bars: weight (%) by turn index, one bar per strategy+reduction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(weights)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for i, name in enumerate(names):
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(1, max_turn + 1)]
        ax.bar(xs, [100 * weights[name].get(k, 0.0) for k in range(1, max_turn + 1)], width, label=name)
    ax.set_xlabel("turn index")
    ax.set_ylabel("share of the gradient (%)")
    ax.set_xticks(range(1, max_turn + 1))
    ax.set_title(title)
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out_dir: str | Path, title: str) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "weights.json").write_text(json.dumps(report, indent=2) + "\n")
    sections = [f"# {title}", ""]
    for view in ("full_batch", "per_step"):
        sections += [f"## {view} (% of the gradient by turn index)", "", markdown_table(report[view]), ""]
    sections += [
        "## the article's attribution model (% by turn index)",
        "",
        markdown_table(report["article_model"]),
        "",
    ]
    (out_dir / "weights.md").write_text("\n".join(sections))
    bar_chart(report["full_batch"], out_dir / "weights.png", f"{title}: exact weights, all samples in one step")
