"""Stop on a signal without losing work: finish the optimizer step in flight, write an exact checkpoint, say so.

Lightning's own handling of SIGTERM ends ``fit`` at the next batch (in the middle of an accumulated step) and the
process then exits 0 with nothing saved; under SLURM its requeue handler saves in the middle of a batch. This callback
replaces both while training runs (from ``on_train_start``, after Lightning installed its handlers):

- SIGTERM, SIGINT (a second Ctrl-C interrupts at once) and, under SLURM with auto-requeue, the requeue signal
  (SIGUSR1 by default) only set a flag;
- at the next optimizer-step boundary (after the step's last micro-batch; an epoch's last step after its
  validation, as ``LastCheckpoint`` saves it, since Lightning resumes a checkpoint taken before that validation
  wrongly) every rank agrees to stop, ``last.ckpt`` is written where ``LastCheckpoint`` writes it, a preempted
  SLURM job is requeued (``scontrol requeue``), and ``RunStopped`` is raised: ``RunMetrics`` records the status,
  the command prints how to resume and exits with 128 + the signal's number.

``stop_after_step=N`` stops the same way after optimizer step N, as if a signal had come during it (exit 0): a run
cut at a chosen step, e.g. to check that the resumed run ends as an uninterrupted one does.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint

from glm_session.run_status import RunStopped
from glm_session.training.last_checkpoint import LastCheckpoint

log = logging.getLogger(__name__)


def requeue_signal(trainer: L.Trainer) -> int | None:
    """The signal that announces a SLURM preemption (with Lightning's auto-requeue on), else ``None``."""
    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return int(environment.requeue_signal or signal.SIGUSR1)
    return None


def requeue_slurm_job() -> None:
    """Put this SLURM job back in the queue (what Lightning's requeue handler runs)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        log.warning("could not requeue SLURM job %s: scontrol not found", job)
        return
    if result.returncode:
        log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
    else:
        log.info("requeued SLURM job %s", job)


class StopOnSignal(L.Callback):
    """Stop training at the next optimizer-step boundary after SIGTERM, SIGINT or a SLURM preemption."""

    def __init__(self, stop_after_step: int | None = None) -> None:
        self.signum: int | None = None
        self.stop_after_step = stop_after_step
        self._asked = False  # the step stop_after_step names has ended
        self._previous: dict[int, Any] = {}
        self._requeue: int | None = None

    # signals -----------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._requeue = requeue_signal(trainer)
        signals = [signal.SIGTERM, signal.SIGINT] + ([self._requeue] if self._requeue is not None else [])
        for signum in signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: now
        if self.signum is None:
            log.warning("%s: stopping after the optimizer step in flight", signal.Signals(signum).name)
        self.signum = signum

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    # where a step ends -------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        last = batch_idx + 1 >= trainer.num_training_batches  # stopped after its validation (on_validation_end)
        boundary = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if boundary and trainer.global_step == self.stop_after_step:
            self._asked = True  # the same step on every rank
        if boundary and not last and self._requested(trainer):
            self._stop(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._requested(trainer):
            self._stop(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._requested(trainer):  # an epoch that ended without a validation
            self._stop(trainer)

    def _requested(self, trainer: L.Trainer) -> bool:
        """Whether to stop here: any rank's signal stops every rank (one collective a step on several devices)."""
        if self._asked:
            return True
        if trainer.world_size == 1:
            return self.signum is not None
        return trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False)

    def _stop(self, trainer: L.Trainer) -> None:
        signum = self.signum if self.signum is not None else signal.SIGTERM  # another rank's signal
        checkpoint = None
        last = [c for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint) and c.dirpath]
        if last:
            checkpoint = (
                Path(last[0].dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
            )
            trainer.save_checkpoint(checkpoint, weights_only=False)
        preempted = self._requeue is not None and signum == self._requeue
        if preempted and trainer.is_global_zero:
            requeue_slurm_job()
        raise RunStopped(signum, trainer.global_step, trainer.current_epoch, str(checkpoint) if checkpoint else None,
                         preempted, asked=self._asked and self.signum is None)  # fmt: skip
