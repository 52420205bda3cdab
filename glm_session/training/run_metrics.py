"""Collect what a run measured and write it to ``metrics.json`` in the run folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from glm_session.constants import IGNORE_INDEX


class RunMetrics(L.Callback):
    """Losses per epoch (overall and by turn, from the module's ``history``), tokens trained and throughput.

    Training time counts every training batch from the end of the previous one (or the start of the epoch, or
    the end of a validation): data loading included, validation excluded. Token counts are summed over devices.
    The counters are saved in checkpoints, so a resumed run reports the whole run.

    Args:
        path: where to write the JSON (rank 0 only) at the end of ``fit``; ``None``: only ``self.metrics``.
        extra: more keys for the JSON (e.g. strategy, reduction).
    """

    def __init__(self, path: str | None = None, extra: dict[str, Any] | None = None) -> None:
        self.path = path
        self.extra = dict(extra or {})
        self.counters = {"train_seconds": 0.0, "input_tokens": 0, "supervised_tokens": 0, "wall_seconds": 0.0}
        self.metrics: dict[str, Any] = {}
        self._since: float | None = None
        self._fit_start = 0.0

    def state_dict(self) -> dict[str, Any]:
        counters = dict(self.counters)
        counters["wall_seconds"] += time.perf_counter() - self._fit_start
        return counters

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counters.update(state_dict)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        self.counters["train_seconds"] += now - (self._since or now)
        self._since = now
        self.counters["input_tokens"] += int((batch["sample_index"] >= 0).sum())
        self.counters["supervised_tokens"] += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if self.counters["train_seconds"] > 0:  # this device's running throughput
            seconds = self.counters["train_seconds"]
            pl_module.log("train/tokens_per_second", self.counters["input_tokens"] / seconds, on_step=True)
            pl_module.log(
                "train/supervised_tokens_per_second", self.counters["supervised_tokens"] / seconds, on_step=True
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        local = [self.counters["input_tokens"], self.counters["supervised_tokens"]]
        totals = strategy.reduce(
            torch.tensor(local, dtype=torch.float64, device=pl_module.device), reduce_op="sum"
        )
        input_tokens, supervised_tokens = (int(x) for x in totals.tolist())
        seconds = torch.tensor(self.counters["train_seconds"], dtype=torch.float64, device=pl_module.device)
        train_seconds = float(strategy.reduce(seconds, reduce_op="max"))
        history = pl_module.history
        val = [h for h in history if h["split"] == "val"]
        train = [h for h in history if h["split"] == "train"]
        self.metrics = {
            **self.extra,
            "val_loss_by_epoch": [h["loss"] for h in val],
            "val_loss_by_turn": val[-1]["loss_by_turn"] if val else {},
            "train_loss": train[-1]["loss"] if train else None,
            "train_loss_by_epoch": [h["loss"] for h in train],
            "history": history,
            "global_steps": trainer.global_step,
            "input_tokens": input_tokens,
            "supervised_tokens": supervised_tokens,
            "train_seconds": train_seconds,
            "wall_seconds": self.counters["wall_seconds"] + time.perf_counter() - self._fit_start,
            "tokens_per_second": input_tokens / train_seconds if train_seconds else None,
            "supervised_tokens_per_second": supervised_tokens / train_seconds if train_seconds else None,
        }
        if self.path and trainer.is_global_zero:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(json.dumps(self.metrics, indent=2) + "\n")
