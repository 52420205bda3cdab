"""Run the whole strategy comparison on the GPUs of one machine, side by side, and pack what it produced.

    python experiments/strategy_comparison/run.py --root DIR --out OUT [--gpus 2] [--jobs-per-gpu 12]
        [--deadline 540] [--only smile|kdconv] [--extra OVERRIDE ...]

The jobs are the grids of the ``conf/sweep/comparison_*.yaml`` sweeps (one Hydra multirun each, when run one job
after the other); chatglm2-small leaves most of a GPU idle, so here each job is its own
``python -m glm_session.train`` process, many on every GPU. In order of dependence:

1. the samples' caches (lm, session and split samples of SMILE and KdConv);
2. the bases: ``comparison/smile_pretrain`` with seeds 0 and 1, ``comparison/kdconv_pretrain`` (seed 0);
3. the learning-rate sweeps (``comparison_lr``, ``comparison_equal_compute``, ``comparison_kdconv``; seed 0, base 0);
4. for every arm + reduction, the rate of lowest final validation loss; then seeds 1-4 at it (seed 0 is the sweep's
   job at that rate: the same run), the matched check (``comparison_matched``: split_grouped and session with unpacked
   rows, each at the rate of the session run it must equal) and the bases' own evaluation. Seeds 0, 2, 4 start from
   base 0, seeds 1, 3 from base 1.

Jobs not started by ``--deadline`` seconds are left out (and listed), and the ones still running then are stopped
``--grace`` seconds later; ``OUT/comparison.tgz`` holds every job's metrics, evaluation, predictions, per-session
test losses, failure note and log, with ``manifest.json`` (jobs, timings, chosen rates). Aggregate on any machine:
``python experiments/strategy_comparison/aggregate.py OUT/comparison.tgz``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from glm_session.run_status import run_status

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = ROOT / "conf" / "sweep"
QUIET = ["trainer.enable_progress_bar=false"]
SMILE_DATA = ["data=smile", "data.holdout={validation: 0.02, test: 0.05}"]


def memory_gib(name: str) -> float:
    """What a job holds on its GPU at its peak, reserved memory included (measured on an H200, 2026-11-29: a split
    step of ~47,000 tokens 19.4 GiB allocated; a session step 6.3; the bases 21.4; evaluation's batches of 65,536
    tokens and generation of 256 prompts)."""
    if name.startswith("data/"):
        return 0.0
    if any(arm in name for arm in ("smile_split", "base/smile", "base_eval/smile")):
        return 27.0
    return 10.0


@dataclass
class Job:
    name: str  # also its folder under --root
    command: list[str]
    priority: int  # lower starts first
    needs: list[str] = field(default_factory=list)
    base: str | None = None  # the job whose last.ckpt is GLM_SESSION_INIT
    lr_of: str | None = None  # an arm + reduction whose chosen rate this job takes
    status: str = "pending"
    attempts: int = 0
    gpu: int | None = None
    started: float | None = None
    ended: float | None = None
    process: subprocess.Popen | None = None


def grid(sweep: str) -> list[dict[str, str]]:
    """The jobs of ``conf/sweep/<sweep>.yaml``: every combination of its sweeper params."""
    params = OmegaConf.load(SWEEPS / f"{sweep}.yaml").hydra.sweeper.params
    keys = list(params)
    values = [str(params[k]).split(",") for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def arm_of(params: dict[str, str]) -> str:
    """``smile_session+token``: the experiment's name and the reduction."""
    return f"{params['experiment'].removeprefix('comparison/')}+{params.get('model.reduction', 'token')}"


def train_command(params: dict[str, str], directory: Path, extra: list[str]) -> list[str]:
    overrides = [f"{k}={v}" for k, v in params.items()]
    return [sys.executable, "-m", "glm_session.train", *overrides, *QUIET, *extra, f"hydra.run.dir={directory}"]


def plan(root: Path, only: str | None, extra: list[str], data_extra: list[str]) -> list[Job]:
    jobs: list[Job] = []
    # Every cache the jobs read, built once before they start side by side: the training samples of every strategy;
    # the validation and test samples as session samples (validation_strategy), and as lm samples for the bases.
    builds = [("lm", "train"), ("lm", "validation"), ("session", "train"), ("session", "validation"),
              ("session", "test"), ("split", "train")]  # fmt: skip
    for corpus, corpus_data in (("smile", SMILE_DATA), ("kdconv", [])):
        if only not in (None, corpus):
            continue
        for strategy, split in builds:
            name = f"data/{corpus}_{strategy}_{split}"
            command = [sys.executable, "-m", "glm_session.data", "stats", *corpus_data, f"strategy={strategy}",
                       "data.packing=true", "data.max_seq_len=2048", f"split={split}", *data_extra,
                       f"out={root / name}.json"]  # fmt: skip
            jobs.append(Job(name, command, priority=0))
    smile_data = [j.name for j in jobs if j.name.startswith("data/smile")]
    kdconv_data = [j.name for j in jobs if j.name.startswith("data/kdconv")]
    if only in (None, "smile"):
        for seed in (0, 1):
            params = {"experiment": "comparison/smile_pretrain", "seed": str(seed)}
            name = f"base/smile_seed{seed}"
            jobs.append(Job(name, train_command(params, root / name, extra), priority=1, needs=smile_data))
            evaluate = [sys.executable, "-m", "glm_session.evaluate", f"ckpt_path={root / name}/checkpoints/last.ckpt",
                        *SMILE_DATA, "data.batch_tokens=65536", "split=test", "limit=150", "generation.batch_size=256",
                        "generation.max_new_tokens=64", *data_extra,
                        f"hydra.run.dir={root / 'base_eval' / f'smile_seed{seed}'}"]  # fmt: skip
            jobs.append(Job(f"base_eval/smile_seed{seed}", evaluate, priority=18, needs=[name]))
        for sweep in ("comparison_lr", "comparison_equal_compute"):
            for params in grid(sweep):
                name = f"lr/{arm_of(params)}_lr{params['optimizer.lr']}"
                jobs.append(Job(name, train_command(params, root / name, extra), priority=10 if "token" in name else 12,
                                needs=["base/smile_seed0"], base="base/smile_seed0"))  # fmt: skip
        seeds = grid("comparison_seeds") + [
            {**grid("comparison_equal_compute")[0], "seed": str(s)} for s in range(5)
        ]
        for params in seeds:
            params = {k: v for k, v in params.items() if k != "optimizer.lr"}
            arm, seed = arm_of(params), int(params["seed"])
            if seed == 0:
                continue  # the sweep's job at the chosen rate
            name = f"seeds/{arm}_seed{seed}"
            priority = 20 if arm.endswith("+token") and "equal" not in arm else 25
            sweep_jobs = [j.name for j in jobs if j.name.startswith(f"lr/{arm}_lr")]
            jobs.append(Job(name, train_command(params, root / name, extra), priority, needs=sweep_jobs,
                            base=f"base/smile_seed{seed % 2}", lr_of=arm))  # fmt: skip
        for params in grid("comparison_matched"):
            arm = arm_of(params)
            if arm.startswith("smile_session+"):
                continue  # the sweep's seed-0 job at the chosen rate
            if arm in ("smile_split_grouped+turn", "smile_session_unpacked+sample"):
                continue  # split+turn is split+sample (one turn a sample); the pairs need the token and turn floors
            # The pairs that Invariant 2 makes equal: split+token = session+token, split+sample = session+turn
            # (and split+turn = split+sample: a split sample trains one turn): each at that session run's rate.
            reduction = params["model.reduction"]
            session = "smile_session+" + {"token": "token", "sample": "turn", "turn": "turn"}[reduction]
            if arm.startswith("smile_session_unpacked+"):
                session = "smile_session+" + reduction
            name = f"matched/{arm}_seed0"
            sweep_jobs = [j.name for j in jobs if j.name.startswith(f"lr/{session}_lr")]
            jobs.append(Job(name, train_command(params, root / name, extra), priority=15 if "token" in arm else 22,
                            needs=sweep_jobs, base="base/smile_seed0", lr_of=session))  # fmt: skip
    if only in (None, "kdconv"):
        params = {"experiment": "comparison/kdconv_pretrain", "seed": "0"}
        jobs.append(Job("base/kdconv_seed0", train_command(params, root / "base/kdconv_seed0", extra), priority=1,
                        needs=kdconv_data))  # fmt: skip
        evaluate = [sys.executable, "-m", "glm_session.evaluate", f"ckpt_path={root}/base/kdconv_seed0/checkpoints/last.ckpt",
                    "data.batch_tokens=65536", "split=test", "generation.batch_size=256", "generation.max_new_tokens=64",
                    *data_extra, f"hydra.run.dir={root / 'base_eval' / 'kdconv_seed0'}"]  # fmt: skip
        jobs.append(Job("base_eval/kdconv_seed0", evaluate, priority=30, needs=["base/kdconv_seed0"]))
        for params in grid("comparison_kdconv"):
            name = f"lr/{arm_of(params)}_lr{params['optimizer.lr']}"
            jobs.append(Job(name, train_command(params, root / name, extra), priority=11, needs=["base/kdconv_seed0"],
                            base="base/kdconv_seed0"))  # fmt: skip
        for params in grid("comparison_kdconv"):
            if params["optimizer.lr"] != grid("comparison_kdconv")[0]["optimizer.lr"]:
                continue
            for seed in range(1, 5):
                arm = arm_of(params)
                clean = {k: v for k, v in params.items() if k != "optimizer.lr"}
                name = f"seeds/{arm}_seed{seed}"
                sweep_jobs = [j.name for j in jobs if j.name.startswith(f"lr/{arm}_lr")]
                jobs.append(Job(name, train_command({**clean, "seed": str(seed)}, root / name, extra), priority=21,
                                needs=sweep_jobs, base="base/kdconv_seed0", lr_of=arm))  # fmt: skip
    return jobs


def final_val_loss(job_dir: Path) -> float | None:
    metrics = job_dir / "metrics.json"
    if not metrics.exists():
        return None
    curve = json.loads(metrics.read_text()).get("val_curve") or []
    return curve[-1]["loss"] if curve else None


def chosen_rates(jobs: list[Job], root: Path) -> dict[str, dict]:
    """For every arm + reduction of the sweeps: each rate's final validation loss and the lowest one's rate."""
    rates: dict[str, dict] = {}
    for job in jobs:
        if job.name.startswith("lr/") and job.status == "done":
            arm, rate = job.name.removeprefix("lr/").rsplit("_lr", 1)
            loss = final_val_loss(root / job.name)
            if loss is not None:
                rates.setdefault(arm, {"losses": {}})["losses"][rate] = loss
    for entry in rates.values():
        entry["lr"] = min(entry["losses"], key=entry["losses"].get)
    return rates


def run(
    jobs: list[Job], root: Path, gpus: int, per_gpu: int, memory: float, deadline: float, grace: float
) -> dict[str, dict]:
    start = time.monotonic()
    running: dict[int, list[Job]] = {g: [] for g in range(gpus)}
    rates: dict[str, dict] = {}
    by_name = {job.name: job for job in jobs}
    while True:
        now = time.monotonic() - start
        for gpu_jobs in running.values():
            for job in list(gpu_jobs):
                code = job.process.poll()
                if code is not None or now > deadline + grace:
                    if code is None:
                        job.process.kill()
                        job.process.wait()
                        code = "killed"
                    status = run_status(root / job.name)  # "done" only from the run's own record
                    job.status = "done" if code == 0 and status == "completed" else f"failed ({code}, {status})"
                    job.ended = now
                    gpu_jobs.remove(job)
                    if code not in (0, "killed") and job.attempts < 2 and now < deadline:
                        job.status = "pending"  # once more (a GPU short of memory at its start, say)
                    print(f"[{now:6.0f}s] {job.name}: {job.status}", flush=True)
        rates = chosen_rates(jobs, root)
        ready = []
        for job in jobs:
            if job.status != "pending":
                continue
            states = [by_name[n].status for n in job.needs if n in by_name]
            finished = [s for s in states if s == "done" or s.startswith(("failed", "skipped"))]
            if len(finished) == len(states) and states and "done" not in states:
                job.status = "skipped (every job it needs failed or was skipped)"
            elif len(finished) == len(states):
                if job.lr_of is not None and job.lr_of not in rates:
                    job.status = "skipped (no rate chosen)"
                else:
                    ready.append(job)
        if now > deadline:
            for job in ready:
                job.status = "skipped (deadline)"
            ready = []
        for job in sorted(ready, key=lambda j: j.priority):
            free = {g: memory - sum(memory_gib(j.name) for j in running[g]) for g in running}
            gpu = max(free, key=free.get)
            if len(running[gpu]) >= per_gpu or free[gpu] < memory_gib(job.name):
                continue  # a smaller job further down may fit
            command = list(job.command)
            if job.lr_of is not None:
                command.insert(3, f"optimizer.lr={rates[job.lr_of]['lr']}")
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu), "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1",
                   "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # fmt: skip
            if job.base is not None:
                env["GLM_SESSION_INIT"] = str(root / job.base / "checkpoints" / "last.ckpt")
            log = root / "logs" / f"{job.name.replace('/', '__')}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            job.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
            )
            job.status, job.gpu, job.started = "running", gpu, now
            job.attempts += 1
            running[gpu].append(job)
        if not any(running.values()) and not any(j.status == "pending" for j in jobs):
            return rates
        time.sleep(1.0)


def pack(jobs: list[Job], rates: dict, root: Path, out: Path, seconds: float) -> Path:
    manifest = {
        "seconds": seconds,
        "rates": rates,
        "jobs": [
            {
                "name": j.name,
                "status": j.status,
                "gpu": j.gpu,
                "started": j.started,
                "ended": j.ended,
                "lr_of": j.lr_of,
                "base": j.base,
                "command": j.command[2:],
            }
            for j in jobs
        ],  # fmt: skip
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    keep = (
        "metrics.json",
        "data_stats.json",
        "failed.txt",
        "overrides.yaml",
        "predictions.jsonl",
        "test_losses.json",
    )
    out.mkdir(parents=True, exist_ok=True)
    archive = out / "comparison.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "manifest.json", arcname="manifest.json")
        for path in sorted(root.rglob("*")):
            if not path.is_file() or not (path.name in keep or path.parent.name in ("logs", "data")):
                continue
            if (
                path.name == "predictions.jsonl"
            ):  # without the prompts (the sessions rebuild them): a tenth the size
                records = [json.loads(line) for line in path.read_text().splitlines()]
                slim = path.with_name("predictions.slim.jsonl")
                slim.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "prompt"}, ensure_ascii=False)
                                        + "\n" for r in records))  # fmt: skip
                tar.add(slim, arcname=str(path.relative_to(root)))
            else:
                tar.add(path, arcname=str(path.relative_to(root)))
    return archive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT / "outputs" / "strategy_comparison")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--jobs-per-gpu", type=int, default=10)
    parser.add_argument("--memory", type=float, default=125.0, help="GiB of each GPU the jobs may hold together")
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds after which no job starts")
    parser.add_argument("--grace", type=float, default=25.0, help="then seconds before running jobs are stopped")
    parser.add_argument("--only", choices=("smile", "kdconv"))
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every training job")
    parser.add_argument("--data-extra", nargs="*", default=[], help="overrides for the data and evaluation jobs")
    args = parser.parse_args()
    start = time.monotonic()
    jobs = plan(args.root, args.only, args.extra, args.data_extra)
    print(f"{len(jobs)} jobs on {args.gpus} GPUs, {args.jobs_per_gpu} at a time on each", flush=True)
    rates = run(jobs, args.root, args.gpus, args.jobs_per_gpu, args.memory, args.deadline, args.grace)
    archive = pack(jobs, rates, args.root, args.out or args.root, time.monotonic() - start)
    counts = {}
    for job in jobs:
        counts[job.status.split(" ")[0]] = counts.get(job.status.split(" ")[0], 0) + 1
    print(json.dumps({"seconds": round(time.monotonic() - start), "jobs": counts, "rates": rates}, indent=1))
    print(f"wrote {archive} ({archive.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
