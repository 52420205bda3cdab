"""Pretrain bases on zhbase, then fine-tune them on dialogues they never saw (issue 21), on one GPU machine, in
calls that continue one another.

    python experiments/unseen_base/run.py --root DIR --out OUT --data DATA [--phase pretrain evaluate]
        [--arms smile_session+token ...] [--seeds 0 1] [--deadline 480] [--jobs 12] [--extra speed=fast ...]
        [--eval-extra ...]

``DATA`` holds zhbase's three files (``books_pd``, ``laws``, ``medqa_sample``, each ``.jsonl.gz`` or ``.jsonl.xz``),
``smile_20k.jsonl.gz`` and ``cpsycound.jsonl.gz``. The jobs, in order of dependence:

1. ``data/*``: the sample caches every later job reads (built once, before jobs read them side by side);
2. ``pretrain/seed<s>``: ``experiment=unseen/pretrain`` (chatglm2-small on zhbase, 3 epochs);
3. ``base_eval/<corpus>_seed<s>``: each base's step-0 test answer loss and generated answers on SMILE, CPsyCoun
   and KdConv, in the chatglm2 template its fine-tuning uses;
4. ``grid/<arm>+<reduction>_lr<r>``: one epoch of each ``--arms`` entry (``experiment=unseen/<arm>``, e.g.
   ``smile_session+token``, ``smile_split_shuffled+sample``) from base 0 over ``GRID_RATES``; session+token on SMILE
   is the gate (it must end 0.3 nats below the base's step-0 test loss). The first calls named these jobs
   ``pilot/...`` (``raw/``); ``aggregate.py`` reads both.

A job whose run status (``metrics.json``) says ``completed`` is done and is not run again; at ``--deadline`` seconds
the running jobs get SIGTERM, finish their step, save ``last.ckpt`` and record ``stopped``: the next call resumes
them (``ckpt_path``). ``OUT/summary.json`` holds every job's status and the numbers the README's tables come from.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from glm_session.run_status import read_record, run_status

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["trainer.enable_progress_bar=false"]
CORPORA = {  # name: evaluation overrides (data config and file)
    "smile": ["data=smile_by_opening", "data.path={data}/smile_20k.jsonl.gz"],
    "cpsycoun": ["data=cpsycoun", "data.path={data}/cpsycound.jsonl.gz"],
    "kdconv": ["data=kdconv"],
}
GRID_RATES = ("1e-4", "2e-4", "5e-4", "1e-3", "2e-3", "5e-3")  # 6 rates, 1.7 decades
ARMS = [  # <corpus>_<arm>+<reduction>: conf/experiment/unseen/<corpus>_<arm>.yaml, model.reduction
    f"{corpus}_{arm}+{reduction}"
    for corpus in ("smile", "cpsycoun")
    for arm, reductions in (("session", ("token", "turn")), ("split_shuffled", ("token", "sample")))
    for reduction in reductions
]


@dataclass
class Job:
    name: str  # also its folder under --root
    command: list[str]
    needs: list[str] = field(default_factory=list)
    base: str | None = None  # the job whose last.ckpt is GLM_SESSION_INIT
    resumable: bool = False  # a stopped run continues from its last.ckpt
    status: str = "pending"
    process: subprocess.Popen | None = None
    started: float | None = None


def zhbase_files(data: Path) -> list[str]:
    files = []
    for name in ("books_pd", "laws", "medqa_sample"):
        found = [data / "zhbase" / f"{name}.jsonl{suffix}" for suffix in (".xz", ".gz")]
        files.append(str(next((f for f in found if f.is_file()), found[-1])))
    return files


def plan(
    root: Path,
    data: Path,
    phases: list[str],
    seeds: list[int],
    arms: list[str],
    extra: list[str],
    eval_extra: list[str],
) -> list[Job]:
    python = [sys.executable, "-m"]
    zhbase = ["experiment=unseen/pretrain", f"data.path=[{','.join(zhbase_files(data))}]"]
    corpora = {name: [o.format(data=data) for o in overrides] for name, overrides in CORPORA.items()}
    jobs: list[Job] = []
    if "pretrain" in phases:
        jobs.append(Job("data/zhbase", [*python, "glm_session.data", "stats", *zhbase, "split=all",
                                        f"out={root}/data/zhbase.json"]))  # fmt: skip
        for seed in seeds:
            name = f"pretrain/seed{seed}"
            jobs.append(Job(name, [*python, "glm_session.train", *zhbase, f"seed={seed}", *QUIET, *extra,
                                   f"hydra.run.dir={root / name}"], needs=["data/zhbase"], resumable=True))  # fmt: skip
    if "evaluate" in phases:
        for corpus, overrides in corpora.items():
            jobs.append(Job(f"data/{corpus}", [*python, "glm_session.data", "stats", *overrides, "tokenizer=zhbase",
                                               "split=all", "data.packing=true", "data.max_seq_len=2048",
                                               f"out={root}/data/{corpus}.json"]))  # fmt: skip
            for seed in seeds:
                name = f"base_eval/{corpus}_seed{seed}"
                checkpoint = root / f"pretrain/seed{seed}" / "checkpoints" / "last.ckpt"
                jobs.append(Job(name, [*python, "glm_session.evaluate", f"ckpt_path={checkpoint}", *overrides,
                                       "data.batch_tokens=65536", "split=test", "limit=150",
                                       "generation.batch_size=256", "generation.max_new_tokens=64",
                                       *eval_extra, f"hydra.run.dir={root / name}"],
                                needs=[f"data/{corpus}", f"pretrain/seed{seed}"]))  # fmt: skip
    for arm in arms:  # a rate grid per arm + reduction, from base 0 (seed 0)
        experiment, reduction = arm.split("+")
        corpus = experiment.split("_")[0]
        for rate in GRID_RATES:
            name = f"grid/{arm}_lr{rate}"
            jobs.append(Job(name, [*python, "glm_session.train", f"experiment=unseen/{experiment}",
                                   corpora[corpus][1], f"model.reduction={reduction}", f"optimizer.lr={rate}",
                                   *QUIET, *extra, f"hydra.run.dir={root / name}"],
                            needs=[f"data/{corpus}", "pretrain/seed0"], base="pretrain/seed0"))  # fmt: skip
    return jobs


def done(root: Path, job: Job) -> bool:
    """Done from the job's own record: a run's status, or a data job's statistics file."""
    if job.name.startswith("data/"):
        return (root / f"{job.name}.json").is_file()
    if job.name.startswith("base_eval/"):
        return any((root / job.name).glob("**/metrics.json"))
    return run_status(root / job.name) == "completed"


def start(job: Job, root: Path) -> None:
    command = list(job.command)
    last = root / job.name / "checkpoints" / "last.ckpt"
    if job.resumable and run_status(root / job.name) == "stopped" and last.is_file():
        command.append(f"ckpt_path={last}")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # fmt: skip
    if job.base is not None:
        env["GLM_SESSION_INIT"] = str(root / job.base / "checkpoints" / "last.ckpt")
    log = root / "logs" / f"{job.name.replace('/', '__')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    job.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)
    job.status, job.started = "running", time.monotonic()


def run(jobs: list[Job], root: Path, deadline: float, grace: float, at_once: int) -> None:
    begin = time.monotonic()
    by_name = {job.name: job for job in jobs}
    for job in jobs:
        if done(root, job):
            job.status = "done"
    stopping = False
    while True:
        now = time.monotonic() - begin
        running = [job for job in jobs if job.status == "running"]
        for job in running:
            code = job.process.poll()
            if code is None:
                if now > deadline + grace:
                    job.process.kill()
                continue
            job.status = "done" if done(root, job) else f"{run_status(root / job.name) or 'failed'} (exit {code})"
            print(f"[{now:6.0f}s] {job.name}: {job.status}", flush=True)
        if now > deadline and not stopping:
            stopping = True
            for job in jobs:
                if job.status == "running":
                    job.process.send_signal(signal.SIGTERM)  # finish the step, save last.ckpt, record "stopped"
        running = [job for job in jobs if job.status == "running"]
        if not stopping:
            for job in jobs:
                if job.status != "pending" or len(running) >= at_once:
                    continue
                needs = [by_name[n].status for n in job.needs if n in by_name]
                if all(s == "done" for s in needs):
                    start(job, root)
                    running.append(job)
                    print(f"[{now:6.0f}s] {job.name}: started", flush=True)
                elif any(s not in ("done", "pending", "running") for s in needs):
                    job.status = "skipped (a job it needs did not finish)"
        if not running and (stopping or not any(job.status == "pending" for job in jobs)):
            return
        time.sleep(1.0)


def summary(jobs: list[Job], root: Path) -> dict:
    """Every job's status and the numbers the tables come from."""
    result: dict = {"jobs": {job.name: job.status for job in jobs}, "data": {}, "runs": {}, "base_eval": {}}
    for path in sorted((root / "data").glob("*.json")):
        result["data"][path.stem] = json.loads(path.read_text())
    for job in jobs:
        folder = root / job.name
        if job.name.startswith("base_eval/"):
            found = sorted(folder.glob("**/metrics.json"))
            if found:
                result["base_eval"][job.name.removeprefix("base_eval/")] = json.loads(found[-1].read_text())
        elif not job.name.startswith("data/") and (folder / "metrics.json").is_file():
            record = read_record(folder)
            keep = ("status", "val_curve", "val_loss_by_epoch", "train_loss", "global_steps", "input_tokens",
                    "supervised_tokens", "train_seconds", "tokens_per_second", "run_info")  # fmt: skip
            entry = {k: record[k] for k in keep if k in record}
            evaluation = read_record(folder / "evaluation")  # the test split, after training
            if evaluation:
                entry["test"] = {k: evaluation[k] for k in ("teacher_forced", "rouge", "chatglm2_official")}
            result["runs"][job.name] = entry
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT / "outputs" / "unseen_base")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--phase", nargs="*", choices=("pretrain", "evaluate"), default=[])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--arms", nargs="*", default=[], choices=ARMS, help="a rate grid for each, from base 0")
    parser.add_argument(
        "--deadline", type=float, default=480.0, help="seconds after which running jobs are stopped"
    )
    parser.add_argument("--grace", type=float, default=60.0, help="then seconds before they are killed")
    parser.add_argument("--jobs", type=int, default=12, help="jobs at a time")
    parser.add_argument("--extra", nargs="*", default=["speed=fast"], help="overrides for every training job")
    parser.add_argument("--eval-extra", nargs="*", default=[], help="overrides for the evaluation jobs")
    args = parser.parse_args()
    begin = time.monotonic()
    jobs = plan(args.root, args.data.resolve(), args.phase, args.seeds, args.arms, args.extra, args.eval_extra)
    run(jobs, args.root, args.deadline, args.grace, args.jobs)
    result = {"seconds": round(time.monotonic() - begin), **summary(jobs, args.root)}
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(result["jobs"], indent=1))


if __name__ == "__main__":
    main()
