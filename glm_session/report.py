"""Report any multirun or folder of runs: ``python -m glm_session.report <folder> [--out DIR]``
(or ``glm-session-report``).

Every training run below ``<folder>`` (a folder holding the ``config.yaml`` that ``train`` writes) is read: its
overrides (``.hydra/overrides.yaml``), its resolved config and group choices (``config.yaml``,
``.hydra/hydra.yaml``) and its record (``metrics.json``). The table's columns are the override keys whose values
differ between runs (a run that did not override a key shows its resolved value); runs that differ only in ``seed``
form one group, summarised over its completed runs by mean, std and a 95% Student-t interval of the mean. Runs that
failed, stopped or left no record are counted and listed, never averaged.

Writes ``<out>/report.md`` (the table, then the runs that did not complete), ``report.csv`` (one row a group),
``runs.csv`` (one row a run) and ``val_curves.png`` (each group's validation loss over optimizer steps: the mean over
its seeds, with a band of one std). ``<out>`` defaults to ``<folder>/report``.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from glm_session.errors import CommandLineParser, UserError, cli_errors, file_in_the_way
from glm_session.run_status import METRICS_FILE, read_record

SEED_KEY = "seed"
IGNORED_KEYS = ("output_dir",)  # differs between runs by construction
RUN_CONFIG = "config.yaml"  # written by train into every run folder


def _last_val(record: Mapping[str, Any]) -> float | None:
    curve = record.get("val_curve") or []
    return curve[-1]["loss"] if curve else None


def _best_val(record: Mapping[str, Any]) -> float | None:
    curve = record.get("val_curve") or []
    return min(point["loss"] for point in curve) if curve else None


def _path(*keys: str) -> Callable[[Mapping[str, Any]], Any]:
    """The value at ``keys`` in a record (``None`` where a level is missing); ``_checked_record`` checks its type."""

    def get(record: Mapping[str, Any]) -> Any:
        value: Any = record
        for key in keys:
            value = value.get(key) if isinstance(value, Mapping) else None
        return value

    return get


METRICS: dict[str, Callable[[Mapping[str, Any]], float | None]] = {  # column -> how a run's record gives it
    "val_loss": _last_val,
    "best_val_loss": _best_val,
    "train_loss": _path("train_loss"),
    "tokens_per_second": _path("tokens_per_second"),
    "test_loss": _path("evaluation", "teacher_forced", "loss"),
    "rouge-1": _path("evaluation", "chatglm2_official", "rouge-1"),
    "rouge-2": _path("evaluation", "chatglm2_official", "rouge-2"),
    "rouge-l": _path("evaluation", "chatglm2_official", "rouge-l"),
    "bleu-4": _path("evaluation", "chatglm2_official", "bleu-4"),
}


@dataclass
class Run:
    folder: Path
    overrides: dict[str, str]  # key -> value, as the command line gave them
    choices: dict[str, str]  # config group -> option (Hydra's runtime choices)
    config: dict[str, Any]  # the resolved config
    record: dict[str, Any]  # metrics.json

    @property
    def status(self) -> str:
        return self.record.get("status") or "no record"

    def value(self, key: str) -> str:
        """``key``'s value in this run: its override, else its group choice, else its resolved config value."""
        if key in self.overrides:
            return self.overrides[key]
        if key in self.choices:
            return str(self.choices[key])
        value: Any = self.config
        for part in key.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return "-"
            value = value[part]
        return _text(value)


def _text(value: Any) -> str:
    return "null" if value is None else str(value)


def _load_yaml(path: Path, kind: type | None = None) -> Any:
    """The YAML in ``path`` (``None`` where there is no file); a ``UserError`` naming the file when it is not UTF-8
    YAML or (``kind``) not of that kind."""
    try:
        value = yaml.safe_load(path.read_text())
    except OSError:
        return None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not readable YAML ({str(err).splitlines()[0]})") from None
    if kind is not None and value is not None and not isinstance(value, kind):
        raise UserError(f"{path}: holds a YAML {type(value).__name__}, not a {kind.__name__}")
    return value


def _checked_record(folder: Path) -> dict[str, Any]:
    """``metrics.json`` of a run (``{}``: none), checked: JSON of an object, a text ``status``, each metric of the
    table a number (finite in a completed run, whose numbers are averaged), the validation curve a list of points
    with a numeric step and loss."""
    path = folder / METRICS_FILE
    if not path.exists():
        return {}
    record = read_record(folder)
    if not record:
        raise UserError(f"{path}: not a run record (not JSON of an object: damaged, or not written by train)")
    status = record.get("status")
    if status is not None and not isinstance(status, str):
        raise UserError(f"{path}: status holds {status!r}, not a run's status (completed, stopped, failed)")
    for name, get in METRICS.items():
        if name in ("val_loss", "best_val_loss"):
            continue  # read from the curve, checked below
        value = get(record)
        if value is not None and (not _is_number(value) or status == "completed" and not math.isfinite(value)):
            raise UserError(f"{path}: {name} holds {value!r}, not a finite number (the record train writes)")
    curve = record.get("val_curve")
    if curve is not None:
        points = curve if isinstance(curve, list) else [None]
        for point in points:
            if not (isinstance(point, Mapping) and all(_is_number(point.get(key)) for key in ("step", "loss"))):
                raise UserError(f"{folder / METRICS_FILE}: val_curve holds {point!r}, not a point with a numeric "
                                "step and loss (the record train writes)")  # fmt: skip
            if status == "completed" and not math.isfinite(point["loss"]):
                raise UserError(f"{path}: val_curve holds {point!r}: a completed run's losses are finite numbers")
    return record


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _overrides(folder: Path) -> dict[str, str]:
    """The run's command-line overrides as key -> value text, read by Hydra's own parser (``1e-3`` is ``0.001``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    lines = [str(line) for line in _load_yaml(folder / ".hydra" / "overrides.yaml", list) or []]
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except OverrideParseException as err:
        raise UserError(f"{folder / '.hydra' / 'overrides.yaml'}: {err}") from None
    found = {}
    for override in parsed:
        key = override.key_or_group
        if key.startswith(("hydra.", "hydra/")) or key in IGNORED_KEYS:
            continue
        found[key] = "(deleted)" if override.is_delete() else _text(override.value())
    return found


def read_run(folder: Path) -> Run:
    hydra = _load_yaml(folder / ".hydra" / "hydra.yaml", dict) or {}
    choices = _select(hydra, "hydra", "runtime", "choices")
    return Run(
        folder=folder,
        overrides=_overrides(folder),
        choices={k: v for k, v in choices.items() if not str(k).startswith("hydra")},
        config=_load_yaml(folder / RUN_CONFIG, dict) or {},
        record=_checked_record(folder),
    )


def _select(mapping: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    """``mapping[k1][k2]...``, or ``{}`` where a level is missing or not a mapping."""
    for key in keys:
        mapping = mapping.get(key) if isinstance(mapping, Mapping) else None
    return mapping if isinstance(mapping, Mapping) else {}


def _natural(path: Path) -> list:
    """Path order with numbers compared as numbers (multirun job 10 after job 9)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(folder: str | Path) -> list[Run]:
    """Every training run below ``folder`` (``folder`` itself included), in path order."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{root}: not a folder")
    folders = {p.parent for p in root.rglob(RUN_CONFIG) if p.parent.name != ".hydra"}
    # a job that failed a check before it wrote its config.yaml left its record (status failed) and Hydra's overrides
    folders |= {p.parent for p in root.rglob(METRICS_FILE) if (p.parent / ".hydra" / "overrides.yaml").is_file()}
    folders = sorted(folders, key=_natural)
    if not folders:
        raise UserError(f"{root}: no training runs below it (a run folder holds the config.yaml that train writes)")
    return [read_run(f) for f in folders]


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """The override keys whose values are not the same in every run, in first-seen order."""
    keys = list(dict.fromkeys(key for run in runs for key in run.overrides))
    return [key for key in keys if len({run.value(key) for run in runs}) > 1]


def seed_summary(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std and a 95% Student-t interval of the mean of ``values`` (one per seed); no interval for one
    value."""
    from scipy import stats

    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return {"mean": mean, "std": 0.0, "n": 1, "ci95": None}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci95": [mean - half, mean + half]}


@dataclass
class Group:
    values: dict[str, str]  # differing key (seed left out) -> value
    runs: list[Run] = field(default_factory=list)

    @property
    def completed(self) -> list[Run]:
        return [run for run in self.runs if run.status == "completed"]

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values.items()) or "all runs"

    @functools.cached_property
    def summaries(self) -> dict[str, dict[str, Any] | None]:
        """Each metric's ``seed_summary`` over the completed runs (``None`` where none has it); computed once."""
        found = {}
        for name, get in METRICS.items():
            values = [v for v in (get(run.record) for run in self.completed) if v is not None]
            found[name] = seed_summary(values) if values else None
        return found

    def metric(self, name: str) -> dict[str, Any] | None:
        return self.summaries[name]


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> list[Group]:
    """Runs with equal values of ``keys`` other than ``seed``, in order of first appearance."""
    groups: dict[tuple[str, ...], Group] = {}
    by = [key for key in keys if key != SEED_KEY]
    for run in runs:
        values = {key: run.value(key) for key in by}
        groups.setdefault(tuple(values.values()), Group(values)).runs.append(run)
    return list(groups.values())


def _number(value: float, scale: float) -> str:
    return f"{value:,.0f}" if abs(scale) >= 1000 else f"{value:.4f}"


def _cell(summary: Mapping[str, Any] | None) -> str:
    if summary is None:
        return ""
    mean = summary["mean"]
    text = f"{_number(mean, mean)} ± {_number(summary['std'], mean)}"
    if summary["ci95"]:
        low, high = summary["ci95"]
        text += f" [{_number(low, mean)}, {_number(high, mean)}]"
    return text


def _present(groups: Sequence[Group]) -> list[str]:
    return [name for name in METRICS if any(g.metric(name) for g in groups)]


def markdown(groups: Sequence[Group], runs: Sequence[Run], root: Path) -> str:
    keys = list(groups[0].values) if groups else []
    metrics = _present(groups)
    header = [*keys, "seeds", *metrics]
    lines = [
        f"# Report of {root}",
        "",
        f"{len(runs)} runs, {sum(len(g.completed) for g in groups)} completed, in {len(groups)} groups. Each cell: "
        "mean ± std over the group's completed runs [95% Student-t interval of the mean].",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for group in groups:
        row = [*group.values.values(), f"{len(group.completed)}/{len(group.runs)}"]
        lines.append("| " + " | ".join(row + [_cell(group.metric(m)) for m in metrics]) + " |")
    unfinished = [run for run in runs if run.status != "completed"]
    if unfinished:
        lines += ["", f"Not completed ({len(unfinished)}), left out of the table:", ""]
        for run in unfinished:
            error = run.record.get("error")
            lines.append(f"- {run.folder.relative_to(root)}: {run.status}" + (f" ({error})" if error else ""))
    return "\n".join(lines) + "\n"


def _csv(rows: Iterable[Mapping[str, Any]], header: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(header), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def groups_csv(groups: Sequence[Group]) -> str:
    keys = list(groups[0].values) if groups else []
    metrics = _present(groups)
    header = [*keys, "completed", "runs"]
    for m in metrics:
        header += [f"{m}_mean", f"{m}_std", f"{m}_ci95_low", f"{m}_ci95_high"]
    rows = []
    for group in groups:
        row: dict[str, Any] = {**group.values, "completed": len(group.completed), "runs": len(group.runs)}
        for m in metrics:
            s = group.metric(m)
            if s is not None:
                low, high = s["ci95"] or ("", "")
                row.update({f"{m}_mean": s["mean"], f"{m}_std": s["std"], f"{m}_ci95_low": low,
                            f"{m}_ci95_high": high})  # fmt: skip
        rows.append(row)
    return _csv(rows, header)


def runs_csv(runs: Sequence[Run], keys: Sequence[str], root: Path) -> str:
    header = ["run", *keys, "status", *METRICS]
    rows = []
    for run in runs:
        row = {"run": str(run.folder.relative_to(root)), **{k: run.value(k) for k in keys}, "status": run.status}
        row.update({name: get(run.record) for name, get in METRICS.items()})
        rows.append(row)
    return _csv(rows, header)


def mean_curve(curves: Sequence[Sequence[Mapping[str, float]]], x: str = "step") -> tuple[list, list, list]:
    """The mean and std of the curves' losses at the points of ``x`` that every curve has. Curves of one length whose
    points of ``x`` differ (seeds whose steps or FLOPs an epoch differ a little: batches by token count) are averaged
    validation by validation instead, each point at the curves' mean ``x``."""
    if not curves:
        return [], [], []
    common = set.intersection(*({point[x] for point in curve} for curve in curves))
    lengths = {len(curve) for curve in curves}
    if len(lengths) == 1 and len(common) < lengths.pop():
        points = [[curve[i] for curve in curves] for i in range(len(curves[0]))]
    else:
        points = [[next(p for p in curve if p[x] == value) for curve in curves] for value in sorted(common)]
    xs, means, stds = [], [], []
    for at in points:
        summary = seed_summary([p["loss"] for p in at])
        xs.append(sum(p[x] for p in at) / len(at))
        means.append(summary["mean"])
        stds.append(summary["std"])
    return xs, means, stds


def plot_curves(
    curves: Mapping[str, Sequence[Sequence[Mapping[str, float]]]],
    path: str | Path,
    axes: Sequence[tuple[str, str, float]] = (("step", "optimizer steps", 1.0),),
    ylabel: str = "validation answer loss",
) -> None:
    """One panel per ``(x key, x label, x scale)`` of ``axes``: each label's curves (one per seed) as their mean, with a
    band of one std where there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, len(axes), figsize=(6.5 * len(axes), 4.5), squeeze=False)
    palette = plt.get_cmap("tab20").colors  # ten distinct hues, then their light shades: one colour a label
    colors = [*palette[::2], *palette[1::2]]
    for panel, (x, xlabel, scale) in zip(panels[0], axes, strict=True):
        for i, (label, seeds) in enumerate(curves.items()):
            color = colors[i % len(colors)]  # (past 20 labels the colours repeat)
            xs, means, stds = mean_curve(seeds, x)
            xs = [v / scale for v in xs]
            (line,) = panel.plot(xs, means, marker="o", markersize=3, color=color,
                                 label=label if len(seeds) == 1 else f"{label} (n={len(seeds)})")  # fmt: skip
            if len(seeds) > 1:
                panel.fill_between(xs, [m - s for m, s in zip(means, stds, strict=True)],
                                   [m + s for m, s in zip(means, stds, strict=True)], color=line.get_color(),
                                   alpha=0.2)  # fmt: skip
        panel.set_xlabel(xlabel)
        panel.set_ylabel(ylabel)
        panel.grid(alpha=0.3)
    panels[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(folder: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Read the runs below ``folder`` and write the report's files into ``out``; return their paths."""
    root = Path(folder)
    runs = find_runs(root)
    keys = differing_keys(runs)
    groups = group_runs(runs, keys)
    target = Path(out) if out is not None else root / "report"
    target.mkdir(parents=True, exist_ok=True)
    written = {"markdown": target / "report.md", "csv": target / "report.csv", "runs": target / "runs.csv"}
    written["markdown"].write_text(markdown(groups, runs, root))
    written["csv"].write_text(groups_csv(groups))
    written["runs"].write_text(runs_csv(runs, keys, root))
    curves = {g.label: [r.record["val_curve"] for r in g.completed if r.record.get("val_curve")] for g in groups}
    curves = {label: seeds for label, seeds in curves.items() if seeds}
    if curves:
        written["figure"] = target / "val_curves.png"
        plot_curves(curves, written["figure"])
    return written


def main(argv: list[str] | None = None) -> None:
    parser = CommandLineParser(prog="glm_session.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a multirun folder (outputs/multiruns/<stamp>) or any folder of runs")
    parser.add_argument("--out", help="where the report goes (default: <folder>/report)")
    args = parser.parse_args(argv)
    with cli_errors():
        blocking = file_in_the_way(args.out) if args.out else None
        if blocking is not None:  # was "File exists"
            raise UserError(f"--out {args.out}: a folder to write the report into; {blocking} is a file")
        written = write_report(args.folder, args.out)
        print(written["markdown"].read_text(), end="")
        print("wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
