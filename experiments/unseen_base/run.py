"""Pretrain bases on zhbase, then fine-tune them on dialogues they never saw (issue 21), on one GPU machine, in
calls that continue one another.

    python experiments/unseen_base/run.py --root DIR --out OUT --data DATA [--phase pretrain evaluate]
        [--arms smile_session+token ...] [--seeds-of smile_session+token ...] [--bases 0 1] [--deadline 480]
        [--last-start 300] [--jobs 8] [--extra speed=fast ...] [--eval-extra ...]

``DATA`` holds zhbase's three files (``books_pd``, ``laws``, ``medqa_sample``, each ``.jsonl.gz`` or ``.jsonl.xz``),
``smile_20k.jsonl.gz`` and ``cpsycound.jsonl.gz``. The jobs, in order of dependence:

1. ``data/*``: the sample caches every later job reads (built once, before jobs read them side by side);
2. ``pretrain/seed<b>``: ``experiment=unseen/pretrain`` (chatglm2-small on zhbase, 3 epochs), for each ``--bases``;
   with ``--phase probe`` first ``probe/<mode>_<how>``: 60 steps of CPsyCoun split_shuffled+token from random
   weights (14 batch shapes), with ``model.compile_dynamic`` torch's choice (``auto``) or ``rows``, once
   uninterrupted (``whole``, alone on the GPU: its tokens/s after 10 steps is each mode's speed) and once stopped
   after step 30 (``stopped``) and resumed in a new process (``resumed``): whether the resumed weights are the
   uninterrupted ones (session 7's bases were not: ``tests/test_compiled_resume.py`` shows why on a CPU);
3. ``base_eval/<corpus>_seed<b>``: each base's step-0 test answer loss and generated answers on SMILE, CPsyCoun
   and KdConv, in the chatglm2 template its fine-tuning uses;
4. ``grid/<arm>+<reduction>_lr<r>``: one run of each ``--arms`` entry (``experiment=unseen/<arm>``, e.g.
   ``smile_session+token``, ``smile_split_shuffled+sample``) from base 0 over ``GRID_RATES``, less the rates
   ``results.json``'s ``lr_grid`` holds already (from earlier calls) or screened out (``aggregate.py``'s
   ``SCREENED``: rates of a stopped grid left behind for good); session+token on SMILE is the gate (it must end
   0.3 nats below the base's step-0 test loss). The first calls named these jobs ``pilot/...`` (``raw/``);
   ``aggregate.py`` reads both;
5. ``seeds/<arm>+<reduction>_seed<s>``: each ``--seeds-of`` entry at its chosen rate (a complete grid's interior
   choice: ``results.json``'s ``lr_grid``, or this root's own grid), seeds 0-4, seed ``s`` from base ``s % 2``; with
   ``--base`` (other bases) only this root's grids count. A seed whose per-session test losses ``raw/`` keeps from
   the reference bases is not run again, nor seed 0 where it is the grid's run at the chosen rate;
   ``check/<corpus>_split_grouped+token_seed0``: split samples of the session arm's very steps, at session+token's
   rate (Invariant 2: it trains as session+token does).

With ``--phase evaluation-probe``, ``probe/evaluation_uncompiled``: CPsyCoun session+token seed 0 (base 0) trained
again since its test evaluation runs the layers uncompiled (session 11 on); its training repeats the kept seed 0 bit
for bit (session 10 ran it on two machines), so ``aggregate.py`` sets its test numbers beside that seed's, which
were evaluated compiled: what the change of evaluation does to the numbers, and to the time.

A job whose run status (``metrics.json``) says ``completed`` (a fine-tuning run's test evaluation written too, but
for a grid run) is done and is not run again. No job starts after ``--last-start`` seconds, nor, with ``--fit``, a
job that the longest recorded duration of its kind (``raw/``'s ``job_seconds``) says would not end before the
deadline (a run stopped in its training: its steps left at its own pace, ``needed_seconds``). At ``--deadline``
seconds the running jobs get SIGTERM, finish their step, save ``last.ckpt`` and record ``stopped``: the next call
(while the machine is held: ``DIR`` stays) resumes them (``ckpt_path``), a run stopped in its test evaluation too. A
grid run that ends asks for the plan again: a grid it completes starts its ``--seeds-of`` at once. A finished run's
checkpoints are deleted (the disk holds about 100 of them otherwise). ``OUT/summary.json`` holds every job's status,
when it started and ended (``job_seconds``, from the call's start) and the numbers the README's tables come from,
``OUT/runs.tgz`` each finished run's per-session test losses and generated answers (for the bootstrap and the
fixed-answer references).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from glm_session.run_status import read_record, run_status

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
QUIET = ["trainer.enable_progress_bar=false"]
CORPORA = {  # name: evaluation overrides (data config and file)
    "smile": ["data=smile_by_opening", "data.path={data}/smile_20k.jsonl.gz"],
    "cpsycoun": ["data=cpsycoun", "data.path={data}/cpsycound.jsonl.gz"],
    "kdconv": ["data=kdconv"],
}
EVALUATION_PROBE = "probe/evaluation_uncompiled"
PROBE = ["experiment=unseen/cpsycoun_split_shuffled", "model.reduction=token", "optimizer.lr=2e-3", "seed=0",
         "model.init_from=null", "trainer.max_steps=60", "callbacks.last_checkpoint.every_n_train_steps=60",
         "trainer.limit_val_batches=0", "evaluate.enabled=false", "metrics.warmup_batches=10"]  # fmt: skip
PROBE_STOP = 30
PROBE_MODES = {"auto": "null", "rows": "rows"}  # model.compile_dynamic
GRID_RATES = ("1e-4", "2e-4", "5e-4", "1e-3", "2e-3", "5e-3")  # 6 rates, 1.7 decades
ARM_REDUCTIONS = (  # conf/experiment/unseen/<corpus>_<arm>.yaml and the model.reduction of each
    ("session", ("token", "sample", "turn")),
    ("split_shuffled", ("token", "sample")),  # split+turn is split+sample: a split sample trains one turn
    ("split_samples", ("token",)),
    ("split_equal_compute", ("token",)),
    ("last", ("token",)),
    ("rising", ("token",)),
    ("session_3ep", ("token",)),
    ("split_shuffled_3ep", ("token",)),
)
ARMS = [
    f"{corpus}_{arm}+{reduction}"
    for corpus in ("smile", "cpsycoun")
    for arm, reductions in ARM_REDUCTIONS
    for reduction in reductions
]
SEEDS = range(5)


@dataclass
class Job:
    name: str  # also its folder under --root
    command: list[str]
    needs: list[str] = field(default_factory=list)  # jobs that must be done first
    after: list[str] = field(default_factory=list)  # jobs that must have ended first, done or not
    init: Path | None = None  # the base it starts from (GLM_SESSION_INIT: a last.ckpt or a converted folder)
    resumable: bool = False  # a stopped run continues from its last.ckpt
    memory_gib: float = 10.0  # what it holds on the GPU at its peak (reserved included)
    status: str = "pending"
    process: subprocess.Popen | None = None
    seconds: list[float] = field(default_factory=list)  # when it started and ended, from the call's start
    resumed: bool = False  # continued from a last.ckpt in this call: its span is a part of its duration


KEPT_INDEX = "kept_test_losses.txt"  # written by aggregate.py
RESTORED = "restored.json"  # beside a base's run record that bases.py brought from an earlier session


def zhbase_files(data: Path) -> list[str]:
    files = []
    for name in ("books_pd", "laws", "medqa_sample"):
        found = [data / "zhbase" / f"{name}.jsonl{suffix}" for suffix in (".xz", ".gz")]
        files.append(str(next((f for f in found if f.is_file()), found[-1])))
    return files


EVALUATION_GIB = 14.5  # a run's test evaluation: 12.5 measured (session 20) plus margin; see memory_gib


def memory_gib(experiment: str) -> float:
    """Peak GPU memory of a fine-tuning run, its test evaluation included, plus 0.6 GiB for its CUDA context.

    Training: its peak reserved memory, measured (H200, speed=fast, eight runs at once, session 17: 10.7-11.7 GiB a
    SMILE split run, 4.9-5.2 a SMILE session run; other corpora's runs were not measured and keep session 2's 10).
    The test evaluation after it held more: its teacher-forced pass took the whole logits of a 65,536-token batch
    in fp32 (65,536 x 16,128 x 4 bytes = 3.9 GiB) three times over (the logits, their shifted copy, the
    log-softmax), beside the model, its optimizer state and the allocator's cache from training: ``EVALUATION_GIB``.
    Session 20 measured 12.51 GiB reserved in three SMILE session runs' evaluations (H100, three runs at once);
    14.5 keeps the CUDA context and 1.4 GiB of spread beside it. Since the experiment ended the pass is chunked
    (``evaluator.answer_token_losses``: 4,096 positions' logits at a time); 14.5 stays until a run measures that.
    Session 19 planned the training peaks alone (4 x 12.5 + 4 x 6 = 74 of an H100's 77.6): three SMILE
    session runs entered their evaluation while four split runs trained, the card filled (79,819 MiB) and they
    failed there (out of memory, by the memory samples: their error was not kept). The evaluation records its own
    peak (``evaluation/metrics.json``'s ``peak_reserved_gib``).
    The bases (65,536 tokens a step) and the generation of 256 prompts are given 20-25 where they are planned."""
    if experiment.startswith("smile_split"):
        training = 12.5
    else:
        training = 6.0 if experiment.startswith("smile_session") else 10.0
    return max(training, EVALUATION_GIB)


MEMORY_QUERY = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
MEMORY_KEPT_GIB = 2.0  # of the card, never planned for: the driver's own and the allocator's slack
MEMORY_WITHOUT_GPU_GIB = 120.0  # where nvidia-smi cannot say (a CPU machine: the plan is not run there)


def card_memory_gib(query: list[str] = MEMORY_QUERY) -> float:
    """GiB the jobs may hold together by default: the first GPU's memory less ``MEMORY_KEPT_GIB`` (an H200:
    138.4, an H100: 77.6), so that one command fits either card."""
    try:
        output = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
        return round(int(output.splitlines()[0]) / 1024 - MEMORY_KEPT_GIB, 1)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return MEMORY_WITHOUT_GPU_GIB


def recorded_grids(path: Path | None) -> dict[str, dict]:
    """arm + reduction -> its ``lr_grid`` entry in ``results.json`` (none without the file)."""
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text()).get("lr_grid", {})


def grids_file(rates: Path | None, base: list[Path] | None) -> Path | None:
    """Where the grids run so far are recorded: ``--rates``, else this experiment's ``results.json``, whose grids
    belong to the bases it pretrains: other bases (``--base``) run their own grids."""
    return rates or (HERE / "results.json" if base is None else None)


def chosen_rates(path: Path | None) -> dict[str, str]:
    """arm + reduction -> its chosen rate, from ``results.json``'s ``lr_grid``: complete grids (every rate of
    ``GRID_RATES`` run or screened out) with an interior choice only."""
    return {arm: entry["chosen"] for arm, entry in recorded_grids(path).items()
            if entry.get("interior") and set(GRID_RATES) <= set(entry.get("rates", {})) | screened_out(entry)}  # fmt: skip


def screened_out(entry: dict) -> set[str]:
    """The rates of a grid entry that ``aggregate.py``'s screening left behind (``SCREENED``): not run again, and
    losing rates of the grid."""
    return {rate for rate, s in entry.get("screening", {}).get("rates", {}).items() if s["screened_out"]}


def recorded_rates(path: Path | None) -> dict[str, set[str]]:
    """arm + reduction -> the rates its grid has run or screened out (``results.json``): the driver does not run them
    again."""
    return {arm: set(entry.get("rates", {})) | screened_out(entry) for arm, entry in recorded_grids(path).items()}


def recorded_screened(path: Path | None) -> dict[str, set[str]]:
    """arm + reduction -> the rates its grid screened out (``results.json``)."""
    return {arm: screened_out(entry) for arm, entry in recorded_grids(path).items()}


def recorded_losses(path: Path | None) -> dict[str, dict[str, float]]:
    """arm + reduction -> rate -> the last validation loss of its grid run, as ``results.json`` records it."""
    return {arm: {rate: run["val_last"] for rate, run in entry.get("rates", {}).items()}
            for arm, entry in recorded_grids(path).items()}  # fmt: skip


def root_rates(
    root: Path, earlier: dict[str, dict[str, float]] | None = None, screened: dict[str, set[str]] | None = None
) -> dict[str, str]:
    """arm + reduction -> the rate chosen by this root's own grid runs (a grid run from ``--base``, or the rates a
    grid lacked, run on the machine this call holds), beside the ``earlier`` ones (``recorded_losses``) and the
    ``screened`` out (``recorded_screened``, losing rates): every rate of ``GRID_RATES`` completed or screened out,
    the lowest last validation loss, interior only. So the seeds of a grid completed on the held machine get their
    rate there (``run``'s ``replan`` asks again as each grid run ends), not a session later."""
    result = {}
    for arm in ARMS:
        last = dict((earlier or {}).get(arm, {}))
        for rate in GRID_RATES:
            record = read_record(root / f"grid/{arm}_lr{rate}")
            if record.get("status") == "completed" and record.get("val_curve"):
                last[rate] = record["val_curve"][-1]["loss"]
        out = (screened or {}).get(arm, set()) - set(last)
        if last and set(GRID_RATES) <= set(last) | out:
            rates = sorted(set(last) | out, key=float)
            chosen = min(last, key=last.get)
            if chosen not in (rates[0], rates[-1]):
                result[arm] = chosen
    return result


def kept_test_losses(raw: Path, reference: Path = HERE / "bases.json") -> set[str]:
    """The runs from the reference bases whose per-session test losses ``raw/`` keeps: the index ``aggregate.py``
    writes from the archives (the archives hold earlier generations' runs too, and they do not travel to the GPU
    machine: the working tree's size limit), and every run a call's record in ``raw/`` says finished and evaluated
    from the reference bases (``bases.json``), so that a call's files saved into ``raw/`` are enough: a new machine
    does not run again what a lost one finished, even before ``aggregate.py`` has run (session 11)."""
    index = raw / KEPT_INDEX
    kept = set(index.read_text().split()) if index.is_file() else set()
    base0 = json.loads(reference.read_text())["bases"]["pretrain/seed0"] if reference.is_file() else None
    for path in raw.glob("*.json"):
        summary = json.loads(path.read_text())
        if base0 is None or summary.get("bases", {}).get("pretrain/seed0") != base0:
            continue
        kept |= {job for job, run in summary.get("runs", {}).items()
                 if run.get("status") == "completed" and "test" in run}  # fmt: skip
        kept |= {f"base_eval/{name}" for name, found in summary.get("base_eval", {}).items() if "teacher_forced" in found}
    return kept


def plan(
    root: Path,
    data: Path,
    phases: list[str],
    bases: list[int],
    arms: list[str],
    seeds_of: list[str],
    rates: dict[str, str],
    kept: set[str],
    extra: list[str],
    eval_extra: list[str],
    given: list[Path] | None = None,
    recorded: dict[str, set[str]] | None = None,
) -> list[Job]:
    """The jobs, in order; ``given``: bases to start from instead of pretraining (base ``b`` is ``given[b]``);
    ``recorded``: the rates each grid has already run (not run again)."""
    python = [sys.executable, "-m"]
    zhbase = ["experiment=unseen/pretrain", f"data.path=[{','.join(zhbase_files(data))}]"]
    corpora = {name: [o.format(data=data) for o in overrides] for name, overrides in CORPORA.items()}
    jobs: list[Job] = []

    def init(base: int) -> tuple[Path, list[str]]:
        """Base ``base``'s weights and the job that makes them (none for a given base)."""
        if given:
            return given[base % len(given)], []
        return root / f"pretrain/seed{base}" / "checkpoints" / "last.ckpt", [f"pretrain/seed{base}"]

    def data_job(corpus: str) -> Job:
        """The sample caches of ``corpus``, built once before the jobs that read them side by side."""
        return Job(f"data/{corpus}", [*python, "glm_session.data", "stats", *corpora[corpus], "tokenizer=zhbase",
                                      "split=all", "data.packing=true", "data.max_seq_len=2048", *eval_extra,
                                      f"out={root}/data/{corpus}.json"])  # fmt: skip

    def train(name: str, experiment: str, reduction: str, rate: str, seed: int, base: int) -> Job:
        corpus = experiment.split("_")[0]
        command = [*python, "glm_session.train", f"experiment=unseen/{experiment}", corpora[corpus][1],
                   f"model.reduction={reduction}", f"optimizer.lr={rate}", f"seed={seed}", *QUIET, *extra,
                   f"hydra.run.dir={root / name}"]  # fmt: skip
        weights, making = init(base)
        return Job(name, command, needs=[f"data/{corpus}", *making], init=weights, resumable=True,
                   memory_gib=memory_gib(experiment))  # fmt: skip

    if "pretrain" in phases and not given:
        jobs.append(Job("data/zhbase", [*python, "glm_session.data", "stats", *zhbase, "split=all",
                                        f"out={root}/data/zhbase.json"]))  # fmt: skip
    after_probes = []
    if "probe" in phases:
        # Does a compiled run stopped and resumed in a new process end as the uninterrupted one, in torch's
        # compilation mode and with compile_dynamic? The "whole" runs go one after the other before anything else
        # starts (their speed); the stopped runs start with the bases' pretraining.
        jobs.append(data_job("cpsycoun"))

        def probe(mode: str, how: str, needs: str, after: str | None = None, *more: str) -> Job:
            name = f"probe/{mode}_{how}"
            return Job(name, [*python, "glm_session.train", *PROBE, corpora["cpsycoun"][1], *QUIET, *extra,
                              f"model.compile_dynamic={PROBE_MODES[mode]}", *more, f"hydra.run.dir={root / name}"],
                       needs=[needs], after=[after] if after else [], memory_gib=20.0)  # fmt: skip

        stopped = {mode: root / f"probe/{mode}_stopped" / "checkpoints" / "last.ckpt" for mode in PROBE_MODES}
        # One after the other, whatever the one before did (a mode that fails to compile fails alone).
        jobs += [probe("auto", "whole", "data/cpsycoun"),
                 probe("rows", "whole", "data/cpsycoun", "probe/auto_whole")]  # fmt: skip
        for mode in PROBE_MODES:
            jobs += [probe(mode, "stopped", "data/cpsycoun", "probe/rows_whole", f"stop_after_step={PROBE_STOP}"),
                     probe(mode, "resumed", f"probe/{mode}_stopped", None, f"ckpt_path={stopped[mode]}")]  # fmt: skip
        after_probes = ["probe/rows_whole"]
    if "pretrain" in phases and not given:
        for seed in bases:
            name = f"pretrain/seed{seed}"
            jobs.append(Job(name, [*python, "glm_session.train", *zhbase, f"seed={seed}", *QUIET, *extra,
                                   f"hydra.run.dir={root / name}"], needs=["data/zhbase"], after=after_probes,
                            resumable=True, memory_gib=25.0))  # fmt: skip
    if "evaluate" in phases or arms or seeds_of:
        jobs += [data_job(corpus) for corpus in corpora if f"data/{corpus}" not in {job.name for job in jobs}]
    if "evaluate" in phases:
        for corpus, overrides in corpora.items():
            for seed in bases:
                name = f"base_eval/{corpus}_seed{seed}"
                if name in kept:
                    continue  # evaluated in an earlier call, its per-session losses in raw/
                checkpoint, making = init(seed)
                if checkpoint.is_dir():  # evaluate reads a run's checkpoint file, not a converted folder
                    print(f"{name}: left out (glm_session.evaluate reads a run's checkpoint file, not a folder)")
                    continue
                jobs.append(Job(name, [*python, "glm_session.evaluate", f"ckpt_path={checkpoint}", *overrides,
                                       "data.batch_tokens=65536", "split=test", "limit=150",
                                       "generation.batch_size=256", "generation.max_new_tokens=64",
                                       *eval_extra, f"hydra.run.dir={root / name}"],
                                needs=[f"data/{corpus}", *making], memory_gib=25.0))  # fmt: skip
    if "evaluation-probe" in phases and not given and EVALUATION_PROBE not in kept:
        if "cpsycoun_session+token" in rates:
            jobs.append(train(EVALUATION_PROBE, "cpsycoun_session", "token", rates["cpsycoun_session+token"], 0, 0))
        else:
            print(f"{EVALUATION_PROBE}: cpsycoun_session+token has no chosen rate: left out", flush=True)
    for arm in arms:  # a rate grid per arm + reduction, from base 0 (seed 0), first: an arm's seeds wait for its
        # grid, and a grid's runs are the longest (SMILE split_samples: ~6,460 steps), best not started at the end
        experiment, reduction = arm.split("+")
        for rate in GRID_RATES:
            if rate in (recorded or {}).get(arm, ()) or f"grid/{arm}_lr{rate}" in kept:
                print(f"grid/{arm}_lr{rate}: recorded (run or screened out: results.json lr_grid; or kept in raw/), "
                      "not run again", flush=True)  # fmt: skip
                continue
            jobs.append(train(f"grid/{arm}_lr{rate}", experiment, reduction, rate, 0, 0))
    for arm in seeds_of:  # then the final runs, what the tables report
        experiment, reduction = arm.split("+")
        if arm not in rates:
            print(f"{arm}: no interior rate chosen yet (results.json lr_grid): its seeds wait", flush=True)
            continue
        for seed in SEEDS:
            if f"seeds/{arm}_seed{seed}" in kept or (seed == 0 and f"grid/{arm}_lr{rates[arm]}" in kept):
                continue  # run in an earlier call (or the grid's run at the chosen rate), per-session losses in raw/
            jobs.append(train(f"seeds/{arm}_seed{seed}", experiment, reduction, rates[arm], seed, seed % 2))
        corpus = experiment.split("_")[0]
        check = f"check/{corpus}_split_grouped+token_seed0"
        if experiment == f"{corpus}_session" and reduction == "token" and check not in kept:
            jobs.append(train(check, f"{corpus}_split_grouped", "token", rates[arm], 0, 0))
    return jobs


def done(root: Path, job: Job) -> bool:
    """Done from the job's own record: a run's status, or a data job's statistics file."""
    if job.name.startswith("data/"):
        return (root / f"{job.name}.json").is_file()
    if job.name.startswith("base_eval/"):
        return any((root / job.name).glob("**/metrics.json"))
    if job.name.startswith("probe/") and job.name.endswith("_stopped"):
        return run_status(root / job.name) == "stopped"  # where stop_after_step stopped it
    if job.name.startswith(("pretrain/", "probe/", "grid/")) and job.name != EVALUATION_PROBE:
        # A grid run is read for its validation curve: stopped in its test evaluation, it is not trained again
        # (seed 0 then runs as its own job: it reuses the grid's run only where raw/ kept its test losses).
        return run_status(root / job.name) == "completed"
    # A fine-tuning run evaluates the test split after training: a run stopped in that evaluation is not done.
    return (
        run_status(root / job.name) == "completed" and (root / job.name / "evaluation" / "metrics.json").is_file()
    )


def resumes_from_last(record: dict) -> bool:
    """Whether a run continues from its ``last.ckpt``: one stopped (in its training or its test evaluation), one
    whose training completed, and one that failed after its training had completed (in its test evaluation:
    session 19's three SMILE session runs that failed there were trained again from the start)."""
    status, after_training = record.get("status"), record.get("failed_after_training") is True
    return status in ("stopped", "completed") or (status == "failed" and after_training)


def start(job: Job, root: Path, now: float) -> None:
    command = list(job.command)
    last = root / job.name / "checkpoints" / "last.ckpt"
    # A run stopped in its training continues from last.ckpt; one stopped or failed in its test evaluation too: it
    # trains nothing more and evaluates as the uninterrupted run does (tests/test_resume.py).
    if job.resumable and resumes_from_last(read_record(root / job.name)) and last.is_file():
        command.append(f"ckpt_path={last}")
        job.resumed = True
    elif not job.name.startswith("data/"):
        shutil.rmtree(root / job.name, ignore_errors=True)  # a fresh start
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # fmt: skip
    if job.init is not None:
        env["GLM_SESSION_INIT"] = str(job.init)
    log = root / "logs" / f"{job.name.replace('/', '__')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    job.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)
    job.status, job.seconds = "running", [round(now)]


def job_kind(name: str) -> str | None:
    """What a job's duration depends on: a fine-tuning run's corpus and arm (``seeds/smile_session+turn_seed3``,
    ``grid/smile_session+token_lr2e-3`` -> ``smile_session``), a base evaluation's corpus; None for the rest."""
    if name == EVALUATION_PROBE:  # a CPsyCoun session+token run
        return "cpsycoun_session"
    group, _, rest = name.partition("/")
    if group in ("seeds", "grid", "check"):
        return rest.split("+", 1)[0]
    if group == "base_eval":
        return "base_eval/" + rest.rsplit("_seed", 1)[0]
    return None


def seconds_beyond_training(summaries: list[Path]) -> dict[str, float]:
    """corpus -> the most that a run of it, finished in one call, spent beyond training (its start, its test
    evaluation), from the calls whose ``summary.json`` these are."""
    beyond: dict[str, float] = {}
    for path in summaries:
        record = json.loads(path.read_text())
        resumed = set(record.get("resumed", []))  # their spans are a part of a run's duration: no measure of it
        spans = {name: span for name, span in record.get("job_seconds", {}).items() if name not in resumed}
        for name, run in record.get("runs", {}).items():
            kind, span = job_kind(name), spans.get(name, [])
            if kind is None or not run.get("train_seconds") or run.get("status") != "completed":
                continue
            if record.get("jobs", {}).get(name) == "done" and len(span) == 2:
                corpus = kind.split("_", 1)[0]
                beyond[corpus] = max(beyond.get(corpus, 0.0), span[1] - span[0] - float(run["train_seconds"]))
    return beyond


def expected_seconds(summaries: list[Path]) -> dict[str, float]:
    """kind -> how long a job of that kind takes, from the calls whose ``summary.json`` these are: the longest it took
    from start to end, for a kind of which at least one job finished. A job the deadline stopped needed at least its
    span, so it may raise the estimate, but alone it is no estimate (session 10's stopped SMILE split_samples runs
    had run 202 s of about 650); a job resumed in its call is left out, its span a part of its run. For a kind whose
    runs recorded their training time but not their start and end (calls before ``job_seconds``): its longest
    training time of a completed run plus the longest that a run of its corpus spent beyond training (start,
    evaluation)."""
    longest: dict[str, float] = {}
    finished: set[str] = set()  # kinds with a job that finished
    trained: dict[str, float] = {}  # kind -> the longest training seconds of a completed run
    for path in summaries:
        record = json.loads(path.read_text())
        resumed = set(record.get("resumed", []))
        spans = {name: span for name, span in record.get("job_seconds", {}).items() if name not in resumed}
        status = record.get("jobs", {})
        for name, run in record.get("runs", {}).items():
            kind = job_kind(name)
            if kind is not None and run.get("train_seconds") and run.get("status") == "completed":
                trained[kind] = max(trained.get(kind, 0.0), float(run["train_seconds"]))
        for name, span in spans.items():
            kind = job_kind(name)
            if kind and len(span) == 2:
                longest[kind] = max(longest.get(kind, 0.0), float(span[1] - span[0]))
                if status.get(name) == "done":
                    finished.add(kind)
    beyond = seconds_beyond_training(summaries)
    for kind, seconds in trained.items():
        corpus = kind.split("_", 1)[0]
        if kind not in finished and corpus in beyond:
            longest[kind] = max(longest.get(kind, 0.0), seconds + beyond[corpus])
            finished.add(kind)
    return {kind: seconds for kind, seconds in longest.items() if kind in finished}


@dataclass
class Durations:
    """What ``--fit`` knows of how long jobs take, from ``raw/``'s call records."""

    by_kind: dict[str, float]  # kind -> the longest a job took from start to end (expected_seconds)
    beyond: dict[str, float] = field(default_factory=dict)  # corpus -> seconds_beyond_training

    @classmethod
    def recorded(cls, summaries: list[Path]) -> Durations:
        return cls(expected_seconds(summaries), seconds_beyond_training(summaries))


FIT_MARGIN = 1.25  # a job's expected seconds times this must end before the deadline (--fit)


def needed_seconds(job: Job, root: Path, durations: Durations) -> float | None:
    """How long ``job`` would take from now. A run the deadline stopped in its training resumes from its
    ``last.ckpt``: the steps it has left at its own pace (its record's ``train_seconds`` over ``global_steps``)
    plus what a finished run of its corpus spent beyond training (session 12's last call let five SMILE
    split_samples grid runs wait that had 784-3,233 of their 6,449 steps left: the whole run's duration was never
    measured, and the rest fitted). Otherwise its kind's recorded duration; ``None`` where none was measured."""
    kind = job_kind(job.name)
    record = read_record(root / job.name) if job.resumable else {}
    steps, planned, trained = (record.get(key) for key in ("global_steps", "planned_steps", "train_seconds"))
    corpus = kind.split("_", 1)[0] if kind else None
    resumes = record.get("status") == "stopped" and (root / job.name / "checkpoints" / "last.ckpt").is_file()
    if resumes and steps and planned and trained and corpus in durations.beyond:
        return trained / steps * max(planned - steps, 0) + durations.beyond[corpus]
    return durations.by_kind.get(kind) if kind else None


def fits(job: Job, root: Path, now: float, deadline: float, durations: Durations | None) -> bool:
    """Whether ``job`` may start now: always without ``durations`` (no --fit) and for a job without a kind (data,
    pretraining: they resume); otherwise only if the time it needs (``needed_seconds``) times ``FIT_MARGIN`` ends
    before the deadline. A kind never measured does not start: nothing says it would end (session 10's last call
    started five unmeasured SMILE split_samples grid runs 190 s before its deadline and lost them all)."""
    if durations is None or job_kind(job.name) is None:
        return True
    needed = needed_seconds(job, root, durations)
    return needed is not None and now + FIT_MARGIN * needed <= deadline


def finish(job: Job, root: Path) -> None:
    """A finished fine-tuning run needs its checkpoints no more (the bases keep theirs: later jobs start there)."""
    if job.status == "done" and job.name.startswith(("grid/", "seeds/", "check/")):
        shutil.rmtree(root / job.name / "checkpoints", ignore_errors=True)


GPU_QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
SAMPLE_EVERY = 30.0  # seconds between two samples of the machine's load


def machine_load(seconds: float, running: int, query: list[str] = GPU_QUERY) -> dict:
    """What the machine is doing now: the first GPU's utilisation (%) and memory in use (MiB) from ``nvidia-smi``
    (``None`` where it cannot say), the 1-minute load average of the CPUs, and how many jobs run."""
    sample = {
        "seconds": round(seconds),
        "jobs": running,
        "cpu_load": round(os.getloadavg()[0], 1),
        "cpus": os.cpu_count(),
    }
    try:
        output = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
        utilisation, memory = (int(x) for x in output.splitlines()[0].split(","))
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        utilisation = memory = None
    return {**sample, "gpu_utilisation": utilisation, "gpu_memory_mib": memory}


def run(jobs: list[Job], root: Path, deadline: float, last_start: float, grace: float, at_once: int,
        memory: float, durations: Durations | None = None,
        replan: Callable[[], list[Job]] | None = None) -> list[dict]:  # fmt: skip
    """Run the jobs; return samples of the machine's load every ``SAMPLE_EVERY`` seconds (to choose ``--jobs``).
    With ``durations`` (--fit), a job starts only if it should end before the deadline (``fits``), and a
    later job that fits may start before it. With ``replan``, each grid run that ends done asks for the plan
    again, and the jobs it adds (the seeds of a grid that has just completed) join the list: they start in this
    call, not the next."""
    begin = time.monotonic()
    load: list[dict] = []
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
            job.seconds.append(round(now))
            finish(job, root)
            print(f"[{now:6.0f}s] {job.name}: {job.status}", flush=True)
            if replan is not None and job.status == "done" and job.name.startswith("grid/"):
                for added in (j for j in replan() if j.name not in by_name):
                    added.status = "done" if done(root, added) else "pending"
                    jobs.append(added)
                    by_name[added.name] = added
                    print(f"[{now:6.0f}s] {added.name}: planned (its grid is complete)", flush=True)
        if now > deadline and not stopping:
            stopping = True
            for job in jobs:
                if job.status == "running":
                    job.process.send_signal(signal.SIGTERM)  # finish the step, save last.ckpt, record "stopped"
        running = [job for job in jobs if job.status == "running"]
        if not stopping and now <= last_start:
            for job in jobs:
                held = sum(j.memory_gib for j in running)
                if job.status != "pending" or len(running) >= at_once or held + job.memory_gib > memory:
                    continue
                if not fits(job, root, now, deadline, durations):
                    continue
                needs = [by_name[n].status for n in job.needs if n in by_name]
                ended = all(by_name[n].status not in ("pending", "running") for n in job.after if n in by_name)
                if all(s == "done" for s in needs) and ended:
                    start(job, root, now)
                    running.append(job)
                    print(f"[{now:6.0f}s] {job.name}: started", flush=True)
                elif any(s not in ("done", "pending", "running") for s in needs):
                    job.status = "skipped (a job it needs did not finish)"
        # (a job that does not fit now never will: nothing to wait for once the others ended)
        waiting = (
            not stopping
            and now <= last_start
            and any(job.status == "pending" and fits(job, root, now, deadline, durations) for job in jobs)
        )
        if not running and not waiting:
            return load
        if now >= SAMPLE_EVERY * len(load):
            load.append(machine_load(now, len(running)))
        time.sleep(1.0)


SOFTWARE = ("torch", "triton", "transformers", "lightning", "liger-kernel", "datasets")


def software() -> dict:
    """The versions a run's numerics depend on, and the GPU: two sessions whose bases differ compare these first."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    found: dict = {}
    for name in SOFTWARE:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return found


def base_fingerprint(checkpoint: Path) -> str | None:
    """sha256 of a base's weights (names, shapes and bytes, in order): equal across calls iff the base is."""
    if not checkpoint.is_file():
        return None
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def summary(jobs: list[Job], root: Path) -> dict:
    """Every job's status and the numbers the tables come from; each run names the sha256 of the base it started
    from (``base_sha256``); ``bases`` the sha256 of each base on the machine, ``restored`` those that ``bases.py``
    brought from an earlier session (their pretraining is that session's record, not this one's)."""
    result: dict = {"jobs": {job.name: job.status for job in jobs}, "data": {}, "runs": {}, "base_eval": {},
                    "bases": {}, "restored": {}, "probes": {},
                    "job_seconds": {job.name: job.seconds for job in jobs if job.seconds},
                    "resumed": sorted(job.name for job in jobs if job.resumed)}  # fmt: skip
    fingerprints: dict[Path, str | None] = {}

    def fingerprint(checkpoint: Path) -> str | None:
        if checkpoint not in fingerprints:
            fingerprints[checkpoint] = base_fingerprint(checkpoint)
        return fingerprints[checkpoint]

    for path in sorted((root / "data").glob("*.json")):
        result["data"][path.stem] = json.loads(path.read_text())
    for folder in sorted(root.glob("pretrain/seed*")):  # the bases on this machine, whether this call made them
        name = f"pretrain/{folder.name}"
        result["bases"][name] = fingerprint(folder / "checkpoints" / "last.ckpt")
        if (folder / RESTORED).is_file():  # bases.py brought it from an earlier session: not pretrained here
            result["restored"][name] = json.loads((folder / RESTORED).read_text())
    for job in jobs:
        folder = root / job.name
        if job.name in result["restored"]:
            continue
        if job.name.startswith("probe/"):
            result["probes"][job.name] = fingerprint(folder / "checkpoints" / "last.ckpt")
        if job.name.startswith("base_eval/"):
            found = sorted(folder.glob("**/metrics.json"))
            if found:
                result["base_eval"][job.name.removeprefix("base_eval/")] = json.loads(found[-1].read_text())
        elif not job.name.startswith("data/") and (folder / "metrics.json").is_file():
            record = read_record(folder)
            keep = ("status", "error", "failed_after_training", "val_curve", "val_loss_by_epoch", "train_loss",
                    "global_steps", "input_tokens", "supervised_tokens", "train_seconds", "wall_seconds",
                    "tokens_per_second", "peak_reserved_gib", "run_info")  # fmt: skip
            entry = {k: record[k] for k in keep if k in record}
            if job.init is not None:
                entry["base_sha256"] = fingerprint(job.init)
            evaluation = read_record(folder / "evaluation")  # the test split, after training
            if evaluation:
                entry["test"] = {k: evaluation[k] for k in ("teacher_forced", "rouge", "chatglm2_official", "seconds",
                                                            "peak_reserved_gib") if k in evaluation}  # fmt: skip
            result["runs"][job.name] = entry
    return result


def pack(jobs: list[Job], root: Path, archive: Path) -> None:
    """Each finished run's (and base evaluation's) per-session test losses and generated answers, prompts left out
    (the sessions rebuild them)."""
    with tarfile.open(archive, "w:gz") as tar:
        for job in jobs:
            if job.status != "done" or job.name.startswith(("data/", "pretrain/", "probe/")):
                continue
            folder = root / job.name
            evaluation = folder if job.name.startswith("base_eval/") else folder / "evaluation"
            for path in (evaluation / "test_losses.json", evaluation / "predictions.jsonl"):
                if not path.is_file():
                    continue
                if path.name == "predictions.jsonl":
                    records = [json.loads(line) for line in path.read_text().splitlines()]
                    slim = path.with_name("predictions.slim.jsonl")
                    slim.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "prompt"},
                                                       ensure_ascii=False) + "\n" for r in records))  # fmt: skip
                    path = slim
                arcname = f"{job.name}/evaluation/{path.name.replace('.slim', '')}"
                tar.add(path, arcname=arcname)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT / "outputs" / "unseen_base")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--phase", nargs="*", choices=("pretrain", "evaluate", "probe", "evaluation-probe"), default=[])
    parser.add_argument("--bases", "--seeds", nargs="+", type=int, default=[0, 1], help="the bases' seeds")
    parser.add_argument("--base", nargs="+", type=Path, default=None,
                        help="start from these bases instead of pretraining (a run's last.ckpt or a converted "
                             "folder, e.g. ChatGLM2-6B from glm_session.convert): seed s starts from the (s %% n)-th")  # fmt: skip
    parser.add_argument("--arms", nargs="*", default=[], choices=ARMS, help="a rate grid for each, from base 0")
    parser.add_argument("--seeds-of", nargs="*", default=[], choices=ARMS, help="5 seeds at the chosen rate")
    parser.add_argument("--rates", type=Path, default=None,
                        help="the grids run so far and their chosen rates (an lr_grid in a results.json; default: "
                             "this experiment's, unless --base gives other bases); this root's complete grids too")  # fmt: skip
    parser.add_argument(
        "--deadline", type=float, default=480.0, help="seconds after which running jobs are stopped"
    )
    parser.add_argument("--last-start", type=float, default=None, help="no job starts after (default: deadline)")
    parser.add_argument("--grace", type=float, default=60.0, help="then seconds before they are killed")
    parser.add_argument("--jobs", type=int, default=8, help="jobs at a time")
    parser.add_argument("--fit", action="store_true",
                        help="start a job only if it should end before the deadline (the longest a job of its kind "
                             "took in raw/'s calls, times 1.25): for a session's last call")  # fmt: skip
    parser.add_argument("--memory", type=float, default=None,
                        help="GiB of the GPU the jobs may hold together (default: the card's less 2)")  # fmt: skip
    parser.add_argument("--extra", nargs="*", default=["speed=fast"], help="overrides for every training job")
    parser.add_argument("--eval-extra", nargs="*", default=[], help="overrides for the data and evaluation jobs")
    args = parser.parse_args()
    begin = time.monotonic()
    grids = grids_file(args.rates, args.base)
    kept = kept_test_losses(HERE / "raw") if args.base is None else set()

    def rates() -> dict[str, str]:
        return {**chosen_rates(grids), **root_rates(args.root, recorded_losses(grids), recorded_screened(grids))}

    def jobs_now() -> list[Job]:
        return plan(args.root, args.data.resolve(), args.phase, args.bases, args.arms, args.seeds_of, rates(),
                    kept, args.extra, args.eval_extra, args.base, recorded_rates(grids))  # fmt: skip

    def replan() -> list[Job]:
        with contextlib.redirect_stdout(io.StringIO()):  # the first plan said what waits, and why
            return jobs_now()

    jobs = jobs_now()
    last_start = args.deadline if args.last_start is None else args.last_start
    durations = Durations.recorded(sorted((HERE / "raw").glob("*.json"))) if args.fit else None
    memory = card_memory_gib() if args.memory is None else args.memory
    print(f"the jobs may hold {memory} GiB of the GPU together", flush=True)
    load = run(jobs, args.root, args.deadline, last_start, args.grace, args.jobs, memory, durations, replan)
    result = {"seconds": round(time.monotonic() - begin), "rates": rates(), "memory_gib": memory, "machine_load": load,
              "software": software(), **summary(jobs, args.root)}  # fmt: skip
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    pack(jobs, args.root, out / "runs.tgz")
    print(json.dumps(result["jobs"], indent=1))


if __name__ == "__main__":
    main()
