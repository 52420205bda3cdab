"""Each turn position's share of the gradient weight under supervision policies, on KdConv and SMILE.

Every row is one ``python -m glm_session.data stats`` call (strategy, supervision, reduction); its
``gradient_share_by_turn`` is the exact coefficient of every trained turn of the training split, the whole split in
one step, summed by turn position (``glm_session.analysis.weights``), and ``gradient_scale`` the gradient's size
against every weight 1 (the coefficients' sum). Writes ``policies.json`` and ``policies.md`` beside this file.

Usage::

    python experiments/turn_weights/policies.py [data.cache_dir=DIR]
"""

from __future__ import annotations

import contextlib
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from glm_session.data.__main__ import main as data_main

HERE = Path(__file__).parent
DATASETS = ("kdconv", "smile")
ROWS = (  # (strategy, supervision, reduction)
    ("session", "all", "token"),
    ("session", "all", "turn"),
    ("split", "all", "sample"),
    ("session", "all", "sample"),
    ("session", "last", "token"),
    ("session", "last", "turn"),
    ("session", "rising", "token"),
    ("session", "rising", "turn"),
)
MAX_TURN = 12


def stats(dataset: str, strategy: str, supervision: str, reduction: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "stats.json"
        argv = ["stats", f"data={dataset}", f"strategy={strategy}", f"supervision={supervision}",
                f"reduction={reduction}", f"out={out}", *extra]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            assert data_main(argv) == 0
        return json.loads(out.read_text())


def table(rows: dict[str, dict]) -> str:
    header = (
        "| policy | strategy+reduction | "
        + " | ".join(map(str, range(1, MAX_TURN + 1)))
        + f" | >{MAX_TURN} | scale |"
    )
    lines = [header, "|---" * (MAX_TURN + 4) + "|"]
    for name, row in rows.items():
        shares = {int(k): v for k, v in row["gradient_share_by_turn"].items()}
        cells = [f"{100 * shares.get(k, 0.0):.1f}" for k in range(1, MAX_TURN + 1)]
        cells.append(f"{100 * sum(v for k, v in shares.items() if k > MAX_TURN):.1f}")
        cells.append(f"{row['gradient_scale']:.3f}")
        policy, pair = name.split(" ")
        lines.append(f"| {policy} | {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(extra: list[str]) -> None:
    started = time.strftime("%Y-%m-%d")
    results: dict = {
        "date": started,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "data": {},
    }
    sections = [f"# Gradient weight by turn position under supervision policies ({started})", ""]
    for dataset in DATASETS:
        rows = {}
        for strategy, supervision, reduction in ROWS:
            result = stats(dataset, strategy, supervision, reduction, extra)
            rows[f"{supervision} {strategy}+{reduction}"] = {
                key: result[key] for key in ("supervised_answers", "supervised_tokens", "supervised_by_turn",
                                             "gradient_share_by_turn", "gradient_scale", "sessions")
            }  # fmt: skip
            print(
                f"{dataset} {supervision} {strategy}+{reduction}: {result['supervised_answers']:,} answers",
                flush=True,
            )
        results["data"][dataset] = rows
        sessions = next(iter(rows.values()))["sessions"]
        sections += [f"## {dataset} train split ({sessions:,} sessions): % of the gradient by turn position", "",
                     table(rows), ""]  # fmt: skip
    (HERE / "policies.json").write_text(json.dumps(results, indent=1) + "\n")
    (HERE / "policies.md").write_text("\n".join(sections))
    print("\n".join(sections))


if __name__ == "__main__":
    main(sys.argv[1:])
