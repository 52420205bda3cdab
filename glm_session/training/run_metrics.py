"""Collect what a run measured and write it to ``metrics.json`` in the run folder, with how the run ended
(``status``: ``completed``, or ``stopped`` by a signal; ``glm_session.run_status``)."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import lightning as L
import torch

from glm_session.atomic_files import write_text
from glm_session.model.flops import H100_BF16_PEAK_FLOPS, training_flops
from glm_session.run_status import RunStopped


def weights(parameter: torch.Tensor) -> int:
    """How many weights ``parameter`` holds: its numel, or for a 4-bit weight of QLoRA (two to a byte) the
    numel of the matrix it stands for."""
    quant_state = getattr(parameter, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else parameter.numel()


class RunMetrics(L.Callback):
    """Losses per epoch (overall and by turn, from the module's ``history``), tokens trained and throughput, and on
    a GPU its peak memory and model FLOPs utilisation (``glm_session.model.flops``, over ``peak_flops`` per GPU).

    Training time counts every training batch from the end of the previous one (or the start of the epoch, or
    the end of a validation): data loading included, validation excluded. The device is waited for only where an
    interval of training ends (before a validation, at the end of training), so timing adds no synchronisation to
    the steps. Token counts are summed over devices.
    The counters are saved in checkpoints, so a resumed run reports the whole run. Throughput and MFU leave out the
    first ``warmup_batches`` training batches of a fit (allocator warm-up, kernel selection): their time, tokens
    and FLOPs are not in the rates, their tokens are in the totals.

    Args:
        path: where to write the JSON (rank 0 only) at the end of ``fit``; ``None``: only ``self.metrics``.
        extra: more keys for the JSON (e.g. strategy, reduction).
        peak_flops: one accelerator's peak (dense bf16 of an H100 by default), for MFU.
        warmup_batches: training batches at the start of each fit left out of throughput and MFU.
    """

    def __init__(
        self,
        path: str | None = None,
        extra: dict[str, Any] | None = None,
        peak_flops: float = H100_BF16_PEAK_FLOPS,
        warmup_batches: int = 0,
    ) -> None:
        self.path = path
        self.extra = dict(extra or {})
        self.peak_flops, self.warmup_batches = peak_flops, warmup_batches
        self.counters = {"input_tokens": 0, "supervised_tokens": 0, "wall_seconds": 0.0,
                         # the timed batches (after the warm-up):
                         "train_seconds": 0.0, "timed_input_tokens": 0, "timed_supervised_tokens": 0, "flops": 0.0}  # fmt: skip
        self._batches_this_fit = 0
        # Validation loss against training time and FLOPs (this device's): one point per validation.
        self.val_curve: list[dict[str, float]] = []
        self.metrics: dict[str, Any] = {}
        self._since: float | None = None
        self._fit_start = 0.0

    def state_dict(self) -> dict[str, Any]:
        counters = dict(self.counters)
        counters["wall_seconds"] += time.perf_counter() - self._fit_start
        return {**counters, "val_curve": list(self.val_curve)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.val_curve = list(state.pop("val_curve", []))
        self.counters.update(state)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._parameter_count = self._parameters(pl_module)
        self._frozen_count = self._frozen(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = time.perf_counter()

    def _clock(self, pl_module: L.LightningModule) -> float:
        """Wait for the device's queued work, then read the clock: only where an interval of training ends."""
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            self._since is not None
            and not trainer.sanity_checking
            and self._batches_this_fit > self.warmup_batches
        ):
            self.counters["train_seconds"] += self._clock(pl_module) - self._since
        self._since = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        history = pl_module.history
        if not trainer.sanity_checking and history and history[-1]["split"] == "val":
            self.val_curve.append({"step": trainer.global_step, "epoch": history[-1]["epoch"],
                                   "train_seconds": self.counters["train_seconds"], "train_flops": self.counters["flops"],
                                   "supervised_tokens": self.counters["supervised_tokens"],
                                   "loss": history[-1]["loss"]})  # fmt: skip
        self._since = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        # The counts are the collator's plain numbers (no synchronisation); the time of a batch is read without
        # waiting for the device, and intervals end where the device is waited for (warm-up end, validation, fit end).
        lengths = batch["sample_lengths"]
        input_tokens, supervised_tokens = sum(lengths), batch["supervised_tokens"]
        self.counters["input_tokens"] += input_tokens
        self.counters["supervised_tokens"] += supervised_tokens
        self._batches_this_fit += 1
        if self._batches_this_fit == self.warmup_batches:  # the timed interval starts after the warm-up
            self._since = self._clock(pl_module)
            return
        if self._batches_this_fit < self.warmup_batches:
            return
        now = time.perf_counter()
        self.counters["train_seconds"] += now - (self._since or now)
        self._since = now
        self.counters["timed_input_tokens"] += input_tokens
        self.counters["timed_supervised_tokens"] += supervised_tokens
        self.counters["flops"] += training_flops(
            pl_module.config, self._parameter_count, lengths, self._frozen_count
        )
        # This device's running throughput, at the logging interval only, as host tensors: Lightning copies a
        # Python number to the device (a copy from pageable memory waits for the device's queued work) and reads
        # a logged device tensor back at every later batch's end.
        if self.counters["train_seconds"] > 0 and trainer.global_step % trainer.log_every_n_steps == 0:
            seconds = self.counters["train_seconds"]
            for name, tokens, prog_bar in (
                ("train/tokens_per_second", "timed_input_tokens", True),
                ("train/supervised_tokens_per_second", "timed_supervised_tokens", False),
            ):
                rate = torch.tensor(self.counters[tokens] / seconds)
                pl_module.log(name, rate, on_step=True, batch_size=1, prog_bar=prog_bar)

    @staticmethod
    def _parameters(pl_module: L.LightningModule) -> int:
        """The model's parameter count (whole, also when sharded: a DTensor's numel is its global size)."""
        return sum(weights(p) for p in pl_module.model.parameters())

    @staticmethod
    def _frozen(pl_module: L.LightningModule) -> int:
        """The parameters that get no gradient (a LoRA run's base): 4 FLOPs a token each, not 6."""
        return sum(weights(p) for p in pl_module.model.parameters() if not p.requires_grad)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._since is not None and self._batches_this_fit > self.warmup_batches:
            self.counters["train_seconds"] += self._clock(pl_module) - self._since
        self._since = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, {"status": "completed"})

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A run stopped by a signal records what it trained and where it stopped (every rank is here: the stop is
        agreed on at a step boundary); other errors are recorded by the command (``failed``)."""
        if isinstance(exception, RunStopped):
            self.on_train_end(trainer, pl_module)
            self._write(trainer, pl_module, exception.record())

    @staticmethod
    def _planned_steps(trainer: L.Trainer) -> int | None:
        """The optimizer steps the whole run makes (Lightning's estimate, the one the rate schedule uses): with
        ``global_steps``, how far a stopped run got. ``None`` where it is unbounded."""
        planned = trainer.estimated_stepping_batches
        return int(planned) if math.isfinite(planned) else None

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, status: dict[str, Any]) -> None:
        """Fill ``self.metrics`` (``status`` first) and write them to ``path`` (rank 0)."""
        strategy = trainer.strategy
        names = ("input_tokens", "supervised_tokens", "timed_input_tokens", "timed_supervised_tokens", "flops")
        local = torch.tensor(
            [self.counters[n] for n in names], dtype=torch.float64, device=trainer.strategy.root_device
        )
        totals = dict(zip(names, strategy.reduce(local, reduce_op="sum").tolist(), strict=True))
        input_tokens, supervised_tokens, flops = (
            int(totals["input_tokens"]),
            int(totals["supervised_tokens"]),
            totals["flops"],
        )
        seconds = torch.tensor(
            self.counters["train_seconds"], dtype=torch.float64, device=trainer.strategy.root_device
        )
        train_seconds = float(strategy.reduce(seconds, reduce_op="max"))
        history = pl_module.history
        val = [h for h in history if h["split"] == "val"]
        train = [h for h in history if h["split"] == "train"]
        self.metrics = {
            **status,
            **self.extra,
            "val_loss_by_epoch": [h["loss"] for h in val],
            "val_loss_by_turn": val[-1]["loss_by_turn"] if val else {},
            "train_loss": train[-1]["loss"] if train else None,
            "train_loss_by_epoch": [h["loss"] for h in train],
            "history": history,
            "val_curve": self.val_curve,
            "global_steps": trainer.global_step,
            "planned_steps": self._planned_steps(trainer),
            "input_tokens": input_tokens,
            "supervised_tokens": supervised_tokens,
            "train_seconds": train_seconds,
            "wall_seconds": self.counters["wall_seconds"] + time.perf_counter() - self._fit_start,
            "warmup_batches": self.warmup_batches,
            "tokens_per_second": totals["timed_input_tokens"] / train_seconds if train_seconds else None,
            "supervised_tokens_per_second": totals["timed_supervised_tokens"] / train_seconds
            if train_seconds
            else None,
            "parameters": self._parameter_count,
            "trainable_parameters": self._parameter_count - self._frozen_count,
            "devices": trainer.world_size,
            "train_flops": flops,
        }
        device = trainer.strategy.root_device  # (the module may be back on the CPU after the fit)
        if device.type == "cuda":  # MFU of the devices' bf16 peak; memory of this (rank 0's) device
            self.metrics["accelerator"] = torch.cuda.get_device_name(device)
            self.metrics["mfu"] = (
                flops / train_seconds / (self.peak_flops * trainer.world_size) if train_seconds else None
            )
            self.metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            self.metrics["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        if self.path and trainer.is_global_zero:
            write_text(self.path, json.dumps(self.metrics, indent=2) + "\n", "run's metrics.json")
