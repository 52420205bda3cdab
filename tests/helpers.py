"""Test helpers that runs load by import path (``+callbacks.kill._target_=helpers.KillAtStep``)."""

import json
import os
import signal
import signal as signal_module

import lightning as L
import torch


class KillAtStep(L.Callback):
    """SIGKILL this process once the given optimizer step is done (before that step's checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordBatches(L.Callback):
    """Append (step, epoch, first sample index of each row, learning rate, weight checksum) of every training batch
    to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        checksum = sum(float(p.double().sum()) for p in pl_module.parameters())
        with open(self.path, "a") as f:
            f.write(
                json.dumps(
                    [
                        trainer.global_step,
                        trainer.current_epoch,
                        batch["sample_index"][:, 0].tolist(),
                        lr,
                        checksum,
                    ]
                )
                + "\n"
            )


class FailIfSeed(L.Callback):
    """Raise at the start of training when the run's seed is ``failing`` (a failed job in a sweep)."""

    def __init__(self, seed: int, failing: int) -> None:
        self.seed, self.failing = int(seed), int(failing)

    def on_train_start(self, *args) -> None:
        if self.seed == self.failing:
            raise RuntimeError(f"planned failure of the job with seed {self.seed}")


class PoisonAtStep(L.Callback):
    """Fill the first weight matrix with NaN before the batch of the given optimizer step (a corrupt weight)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            next(pl_module.parameters()).data.fill_(float("nan"))


class PoisonGradientAtStep(L.Callback):
    """Make one gradient NaN in the backward pass of the given optimizer step only (a one-off overflow)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step + 1 == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


class SignalAtStep(L.Callback):
    """Send this process ``signal`` (a name: SIGTERM, SIGINT, SIGUSR1) while the batch after optimizer step ``step``
    trains, as a scheduler or a user would in the middle of a step."""

    def __init__(self, step: int, signal: str = "SIGTERM") -> None:
        self.step, self.signum = step, getattr(signal_module, signal)
        self.sent = False

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class SignalAtStepIfSeed(SignalAtStep):
    """``SignalAtStep`` in the job of a sweep whose seed is ``seed`` only."""

    def __init__(self, step: int, seed: int, run_seed: int, signal: str = "SIGTERM") -> None:
        super().__init__(step, signal)
        self.sent = int(seed) != int(run_seed)


class FullDiskAfterStep(L.Callback):
    """From the save after optimizer step ``step`` on, every ``torch.save`` writes part of its file, then fails as a
    full disk does (``OSError`` ENOSPC): a save that runs out of space in the middle."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step < self.step or getattr(torch, "_full_disk", False):
            return
        import errno

        def full_disk(obj, f, *args, **kwargs) -> None:
            f.write(b"PK\x03\x04 part of a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        torch._full_disk = True
        torch.save = full_disk
