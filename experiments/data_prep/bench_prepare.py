"""Time data preparation of SMILE (20,000 sessions): a cold run (empty cache) and a repeated run (cached).

Each run is a fresh ``python -m glm_session.data stats`` process, as a user would run it. Two times per run:
``prepare_seconds`` (reading, building or loading the samples, packing, statistics: measured inside the process)
and ``process_seconds`` (the whole command, Python's imports of torch/lightning/datasets included).

Usage::

    python experiments/data_prep/bench_prepare.py [--smile PATH] [--out experiments/data_prep/results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def run(overrides: list[str], cache_dir: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "glm_session.data", "stats", *overrides, f"data.cache_dir={cache_dir}", f"out={out.name}"],
            check=True, capture_output=True,
        )  # fmt: skip
        process_seconds = time.perf_counter() - start
        stats = json.loads(Path(out.name).read_text())
    return {
        "prepare_seconds": stats.pop("seconds"),
        "process_seconds": round(process_seconds, 3),
        "stats": stats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smile", default=os.environ.get("GLM_SESSION_SMILE", "../shared/data/smile/smile_20k.jsonl.gz")
    )
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
    results = []
    for strategy in ("session", "split"):
        overrides = [
            "data=smile",
            f"data.path={args.smile}",
            f"strategy={strategy}",
            "data.packing=true",
            "split=all",
        ]
        with tempfile.TemporaryDirectory() as cache_dir:
            cold = run(overrides, cache_dir)
            cached = run(overrides, cache_dir)
        results.append({"strategy": strategy, "packing": True, "cold": cold, "cached": cached})
        print(f"{strategy}: cold {cold['prepare_seconds']:.1f} s ({cold['process_seconds']:.1f} s process), "
              f"cached {cached['prepare_seconds']:.1f} s ({cached['process_seconds']:.1f} s process)")  # fmt: skip
    machine = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "command": "python experiments/data_prep/bench_prepare.py",
    }
    args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
