"""Hydra apps that end with one line: a failed job, a stopped run or sweep, said once and plainly.

Hydra raises a job's exception only after writing ``Error executing job with overrides: [...]``, and in a multirun it
runs every job first, then raises the first failure without naming the job. ``job`` wraps a task function so that
its exceptions are kept instead, with the job's number and overrides, and ``run_app`` reports them after Hydra
returns: a single run's error as ``cli_errors`` says it (one line and exit code 2 for bad input; a bug keeps its
traceback), a multirun's as one ``error: job N (overrides) failed: ...`` line each. A ``RunStopped`` (a signal at a
step boundary, ``training/stop.py``) passes through Hydra and ends the sweep: the command says how to resume, which
jobs of the sweep ran, stopped, failed or never started, and exits with 128 + the signal's number.
"""

from __future__ import annotations

import functools
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm_session.errors import EXIT_BAD_INPUT, cli_errors, user_message
from glm_session.run_status import RunStopped


@dataclass
class JobOutcome:
    number: int | None  # the job's number in a multirun; None for a single run
    overrides: list[str]
    status: str  # completed | failed | stopped
    error: BaseException | None = None

    @property
    def label(self) -> str:
        return f"job {self.number} ({' '.join(self.overrides) or 'no overrides'})"


class AbortRun(BaseException):
    """Raised by a Hydra callback to end the command before the job starts (Hydra turns a callback's ``Exception``
    into a warning and goes on): ``run_app`` reports ``error`` like any other."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


OUTCOMES: list[JobOutcome] = []  # this process's jobs, in order
SWEEP_PLAN: list[
    list[str] | None
] = []  # the jobs of the sweep a stopped job belonged to (read while Hydra's config is set)


def _this_job() -> tuple[int | None, list[str]]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    config = HydraConfig.get()
    multirun = config.mode == RunMode.MULTIRUN
    return (config.job.num if multirun else None), list(config.overrides.task)


def job(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a Hydra task function: keep its exception for ``run_app`` instead of raising it through Hydra."""

    @functools.wraps(task)
    def wrapper(cfg: Any) -> Any:
        number, overrides = _this_job()
        try:
            result = task(cfg)
        except RunStopped as stop:
            OUTCOMES.append(JobOutcome(number, overrides, "stopped", stop))
            if number is not None:
                stop.job = f"job {number}"
                SWEEP_PLAN.append(sweep_jobs())
            raise
        except Exception as err:
            OUTCOMES.append(JobOutcome(number, overrides, "failed", err))
            return None
        OUTCOMES.append(JobOutcome(number, overrides, "completed"))
        return result

    return wrapper


def run_app(app: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` app whose task is wrapped by ``job``; report failures and stops in one line each."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's own errors (a bad override) reach cli_errors
    OUTCOMES.clear()
    SWEEP_PLAN.clear()
    with cli_errors():
        try:
            app()
        except RunStopped as stop:
            report_stop(stop)
            raise SystemExit(stop.exit_code) from None
        except AbortRun as abort:
            raise abort.error from None
        except KeyboardInterrupt:  # before training started, or during an evaluation
            print(
                "interrupted (Ctrl-C) outside the training steps: nothing was saved by this stop", file=sys.stderr
            )
            raise SystemExit(130) from None
        report_failures()


def report_failures() -> None:
    failed = [outcome for outcome in OUTCOMES if outcome.status == "failed"]
    if not failed:
        return
    if len(OUTCOMES) == 1 and failed[0].number is None:
        raise failed[0].error  # a single run: cli_errors says it (or shows a bug's traceback)
    bug = False
    for outcome in failed:
        message = user_message(outcome.error)
        if message is None:
            bug = True
            message = f"{type(outcome.error).__name__}: {outcome.error} (a bug: its traceback is in the job's failed.txt)"
        print(f"error: {outcome.label} failed: {message}", file=sys.stderr)
    raise SystemExit(1 if bug else EXIT_BAD_INPUT)


def report_stop(stop: RunStopped) -> None:
    """How to resume the stopped run and, in a multirun, what became of every job of the sweep."""
    outcome = OUTCOMES[-1] if OUTCOMES else None
    overrides = [o for o in (outcome.overrides if outcome else []) if not o.startswith("ckpt_path=")]
    if stop.checkpoint is None:
        line = f"{stop.summary()}: it cannot be resumed"
    else:
        command = ["python", "-m", "glm_session.train", *overrides, f"ckpt_path={stop.checkpoint}"]
        line = f"{stop.summary()}; resume with: {shlex.join(command)}"
    print(f"{stop.job + ' ' if stop.job else ''}{line}", file=sys.stderr)
    if outcome is None or outcome.number is None:
        return
    planned = SWEEP_PLAN[-1] if SWEEP_PLAN else None
    seen = {o.number for o in OUTCOMES}
    for status in ("completed", "failed", "stopped"):
        numbers = [str(o.number) for o in OUTCOMES if o.status == status]
        if numbers:
            print(f"sweep: {status}: jobs {', '.join(numbers)}", file=sys.stderr)
    if planned is not None:
        varying = [o for o in {o for job in planned for o in job} if any(o not in job for job in planned)]
        never = [
            f"{n} ({' '.join(o for o in job if o in varying)})" for n, job in enumerate(planned) if n not in seen
        ]
        print(f"sweep: never started: {'; '.join(never) if never else 'none'}", file=sys.stderr)


def sweep_jobs() -> list[list[str]] | None:
    """Every job of the current multirun, as the basic sweeper plans it from the sweep's ``multirun.yaml``; ``None``
    when another sweeper decides its jobs as it goes."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    hydra = HydraConfig.get()
    if not str(hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    saved = OmegaConf.load(Path(hydra.sweep.dir) / "multirun.yaml")
    params = [f"{key}={value}" for key, value in (OmegaConf.select(saved, "hydra.sweeper.params") or {}).items()]
    arguments = params + list(OmegaConf.select(saved, "hydra.overrides.task") or [])
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
