"""How a run ended, as its folder records it: ``metrics.json``'s ``status``.

- ``completed``: training ran to its end (the file then holds every metric);
- ``stopped``: a signal stopped it at an optimizer-step boundary (SIGTERM, SIGINT; ``preempted`` under SLURM), with
  ``stopped_at_step`` and the ``checkpoint`` it resumes from;
- ``failed``: an error ended it (``error`` says which, one line; ``failed.txt`` holds the traceback).

Tools that chain runs (the comparison driver, the benchmark and scale scripts) read ``run_status``, never an exit
code alone. ``RunStopped`` is what a stopped run raises through Lightning and Hydra up to the command, which prints
how to resume and exits with 128 + the signal's number.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
STATUSES = ("completed", "stopped", "failed")


@dataclass
class RunStopped(BaseException):
    """A run stopped by ``signum`` (or, ``asked``, by ``stop_after_step``) after optimizer step ``step``, resumable
    from ``checkpoint`` (``None`` when checkpointing is off). A ``BaseException``: a sweep stops at it instead of
    starting its next job."""

    signum: int
    step: int
    epoch: int
    checkpoint: str | None
    preempted: bool = False
    job: str | None = field(default=None, compare=False)  # a multirun job's number and overrides
    asked: bool = False  # stopped where ``stop_after_step`` asked, not by a signal

    def __post_init__(self) -> None:
        super().__init__(self.summary())

    @property
    def signal_name(self) -> str:
        """What stopped the run: a signal's name, or ``stop_after_step``."""
        return "stop_after_step" if self.asked else signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 0 if self.asked else 128 + self.signum

    def record(self) -> dict[str, Any]:
        """The status fields of ``metrics.json``."""
        record = {"status": "stopped", "signal": self.signal_name, "stopped_at_step": self.step, "epoch": self.epoch,
                  "checkpoint": self.checkpoint, "preempted": self.preempted}  # fmt: skip
        if self.preempted:  # a requeued job finds its run by it
            record["slurm_job"] = os.environ.get("SLURM_JOB_ID")
        return record

    def summary(self) -> str:
        where = f"after optimizer step {self.step} (epoch {self.epoch})"
        if self.preempted:
            where += ", preempted: the requeued job resumes from its checkpoint"
        if self.checkpoint is None:
            return f"stopped by {self.signal_name} {where}; no checkpoint (checkpointing is off)"
        return f"stopped by {self.signal_name} {where}; checkpoint {self.checkpoint}"


def run_status(run_dir: str | Path) -> str | None:
    """The ``status`` of the run in ``run_dir`` (``None``: no readable record, e.g. a run killed outright)."""
    try:
        record = json.loads((Path(run_dir) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    status = record.get("status") if isinstance(record, dict) else None
    return status if status in STATUSES else None


def read_record(run_dir: str | Path) -> dict[str, Any]:
    """``metrics.json`` of ``run_dir`` as a dict; empty when there is none or it is unreadable."""
    try:
        record = json.loads((Path(run_dir) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
