"""Training progress that reads well where it is read: Lightning's rich progress bar on a terminal (elapsed and
remaining time, batches/s, the step's loss, tokens/s, the last validation loss), and one plain log line every few
optimizer steps where output is not a terminal (CI and cluster logs, ``<run>/train.log``), with the same figures and
an ETA. ``progress=auto|rich|plain`` in ``conf/train.yaml`` picks; ``trainer.enable_progress_bar=false`` shows none.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from glm_session.errors import check_choice

log = logging.getLogger(__name__)
T = TypeVar("T")

CHOICES = ("auto", "rich", "plain")
SHOWN = {  # what the bars show, under short names: logged metric -> label
    "train/loss": "loss",
    "train/tokens_per_second": "tok/s",
    "val/loss": "val_loss",
}


def shown_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The progress-bar metrics the bars show, by their short labels."""
    metrics = trainer.progress_bar_metrics
    return {label: float(metrics[key]) for key, label in SHOWN.items() if key in metrics}


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class RichBar(RichProgressBar):
    """Lightning's rich bar with the figures of ``SHOWN`` (tokens/s without decimals)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        shown = shown_metrics(trainer)
        if "tok/s" in shown:
            shown["tok/s"] = f"{shown['tok/s']:,.0f}"
        return shown


class PlainProgress(ProgressBar):
    """A log line every ``every_n_steps`` optimizer steps and after each validation::

        epoch 1/3  step 40/498 (8%)  loss 6.2731  tok/s 5,120  elapsed 0:52  ETA 9:58
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        super().__init__()
        self.every_n_steps = max(1, every_n_steps)
        self._enabled = True
        self._start = 0.0
        self._start_step = 0
        self._last_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step  # a resumed run counts from here

    def line(self, trainer: L.Trainer, metrics: dict[str, float]) -> str:
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        elapsed = time.perf_counter() - self._start
        epochs = trainer.max_epochs
        parts = [f"epoch {trainer.current_epoch + 1}" + (f"/{epochs}" if epochs and epochs > 0 else "")]
        if total and total != float("inf"):
            parts.append(f"step {step}/{int(total)} ({step / total:.0%})")
        else:
            parts.append(f"step {step}")
        parts += [f"{label} {value:,.0f}" if label == "tok/s" else f"{label} {value:.4f}" for label, value in metrics.items()]
        parts.append(f"elapsed {duration(elapsed)}")
        done = step - self._start_step
        if done > 0 and total and total != float("inf"):
            parts.append(f"ETA {duration(elapsed / done * max(0, total - step))}")
        return "  ".join(parts)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._enabled and trainer.is_global_zero and step != self._last_step and step % self.every_n_steps == 0:
            self._last_step = step
            metrics = {k: v for k, v in shown_metrics(trainer).items() if k != "val_loss"}
            log.info("%s", self.line(trainer, metrics))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and trainer.is_global_zero and not trainer.sanity_checking and trainer.state.fn == "fit":
            metrics = shown_metrics(trainer)
            if "val_loss" in metrics:
                log.info("validation after step %d: loss %.4f", trainer.global_step, metrics["val_loss"])


def track(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """``items`` with progress (evaluation's generation and loss passes): a rich bar on a terminal, else a log line
    at every tenth of ``total`` with the elapsed time and an ETA."""
    if sys.stdout.isatty():
        from rich.progress import track as rich_track

        yield from rich_track(items, total=total, description=description)
        return
    start, shown = time.perf_counter(), 0
    for done, item in enumerate(items, 1):
        yield item
        if total and done * 10 // total > shown:
            shown = done * 10 // total
            elapsed = time.perf_counter() - start
            log.info("%s: %d/%d (%d%%)  elapsed %s  ETA %s", description, done, total, 100 * done // total,
                     duration(elapsed), duration(elapsed / done * (total - done)))  # fmt: skip


def progress_bar(choice: str, every_n_steps: int) -> ProgressBar:
    """The progress display of ``progress=choice``: ``auto`` is rich on a terminal, plain elsewhere."""
    check_choice("progress", choice, CHOICES)
    if choice == "auto":
        choice = "rich" if sys.stdout.isatty() else "plain"
    return RichBar() if choice == "rich" else PlainProgress(every_n_steps)
