"""The values of a run's seed, trainer, optimizer and schedule, checked before its data or model is built.

Lightning, AdamW and the schedule take some of these as they come: a negative ``gradient_clip_val`` flips every
gradient's sign, ``optimizer.lr=0`` trains nothing, ``trainer.max_steps=0`` ends a run of no step as completed, a
``warmup_ratio`` above 1 never reaches the peak rate; others fail deep inside ``fit`` with a traceback
(``accumulate_grad_batches=0``, ``optimizer.lr=abc``, FlexAttention on a CPU). Each is a one-line ``ConfigError``
here instead. Keys a group does not have (another optimizer's) are not checked.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from glm_session.data.source import SPLITS
from glm_session.errors import ConfigError, check_bool, check_choice, check_fraction, check_int, check_number
from glm_session.model.module import check_config_overrides

MONITORED = r"val/loss|train/loss|train/loss_epoch|(val|train)/loss_turn_\d+"  # what ChatGLM2Module logs
SEED_MAX = 2**32 - 1  # numpy's seeds (Lightning's seed_everything): a larger or negative one was a traceback
SWITCHES = ("resume_allow_changes", "evaluate.enabled", "model.activation_checkpointing", "model.compile_layers")


def check_training(cfg: DictConfig) -> None:
    seed = check_int("seed", cfg.get("seed"), minimum=0)
    if seed > SEED_MAX:
        raise ConfigError("seed", seed, f"an integer from 0 to {SEED_MAX:,}")
    for key in SWITCHES:  # a string such as maybe was taken as true
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            check_bool(key, value)
    for key in ("model.init_from", "model.init_adapter"):  # '' is the current folder: it passed the folder check
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not str(value).strip():
            raise ConfigError(key, value, "a folder or checkpoint file, or null")
    check_int("metrics.warmup_batches", OmegaConf.select(cfg, "metrics.warmup_batches", default=0), minimum=0)
    if OmegaConf.select(cfg, "evaluate.enabled", default=False):  # checked before training, not after it
        check_choice("evaluate.split", cfg.evaluate.get("split"), SPLITS)
        check_int("evaluate.limit", cfg.evaluate.get("limit"), minimum=1, optional=True)
    overrides = cfg.model.get("config_overrides")
    check_config_overrides(OmegaConf.to_container(overrides) if overrides is not None else None)
    monitor = OmegaConf.select(cfg, "callbacks.best_checkpoint.monitor", default=None)
    if monitor is not None and not re.fullmatch(MONITORED, str(monitor)):  # a typo failed after a whole epoch
        raise ConfigError("callbacks.best_checkpoint.monitor", monitor, "a logged metric: val/loss, train/loss, "
                          "train/loss_epoch or val/loss_turn_K")  # fmt: skip
    stop, steps = cfg.get("stop_after_step"), cfg.trainer.get("max_steps", -1)
    if isinstance(stop, int) and isinstance(steps, int) and 0 < steps < stop:  # never reached, without a word
        raise ConfigError("stop_after_step", stop, f"at most trainer.max_steps={steps}, or null")
    _check_trainer(cfg.trainer)
    _check_attention_device(cfg)
    _check_optimizer(cfg.optimizer)
    if cfg.get("scheduler"):
        _check_schedule(cfg.scheduler)


def _check_trainer(trainer: DictConfig) -> None:
    check_int("trainer.accumulate_grad_batches", trainer.get("accumulate_grad_batches", 1), minimum=1)
    _check_limit("trainer.max_steps", trainer.get("max_steps", -1))
    _check_limit("trainer.max_epochs", trainer.get("max_epochs"), optional=True)
    if trainer.get("gradient_clip_val") is not None:  # 0 clips nothing, as Lightning reads it
        check_number("trainer.gradient_clip_val", trainer.gradient_clip_val, 0)
    check_int("trainer.log_every_n_steps", trainer.get("log_every_n_steps", 50), minimum=1)  # 0: a modulo by zero
    check_int("trainer.check_val_every_n_epoch", trainer.get("check_val_every_n_epoch"), minimum=1, optional=True)
    limit = trainer.get("limit_train_batches")  # "abc": a TypeError inside Lightning; 0: no training, as it says
    if limit is not None and not (
        (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0)
        or (isinstance(limit, float) and 0 <= limit <= 1)
    ):
        raise ConfigError(
            "trainer.limit_train_batches", limit, "a fraction of an epoch in [0, 1] or a number of batches >= 0 "
            "(0: no training, Lightning's way to only build, validate or test)"
        )  # fmt: skip
    precision, accelerator = str(trainer.get("precision")), str(trainer.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and precision in ("16-mixed", "16"):  # Lightning trained in bf16-mixed instead, with a warning
        raise ConfigError("trainer.precision", precision, "32-true or bf16-mixed on a CPU (float16 autocast is GPU only)")
    interval = trainer.get("val_check_interval")
    if interval is not None and not (
        (isinstance(interval, int) and not isinstance(interval, bool) and interval >= 1)
        or (isinstance(interval, float) and 0 < interval <= 1)
    ):
        raise ConfigError(
            "trainer.val_check_interval", interval, "a fraction of an epoch in (0, 1] or a number of batches >= 1"
        )


def _check_attention_device(cfg: DictConfig) -> None:
    """A GPU asked for where there is none (Lightning: "No supported gpu backend found!"); FlexAttention, which has
    no backward on a CPU (torch raises at the first step)."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.accelerator", accelerator, "cpu here: this machine has no CUDA GPU (trainer=fsdp asks for GPUs; "
            "on CPUs it runs with trainer.accelerator=cpu, over gloo)"
        )  # fmt: skip
    if cfg.model.get("attn_implementation") != "flex_attention":
        return
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        raise ConfigError(
            "model.attn_implementation", "flex_attention", "sdpa or eager when training on a CPU: FlexAttention "
            "trains on a CUDA GPU only (torch has no backward for it on a CPU)"
        )  # fmt: skip


def _check_limit(key: str, value: Any, optional: bool = False) -> None:
    """A number of steps or epochs: -1 (no limit), at least 1, or null where Lightning takes it."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value >= 1):
        raise ConfigError(key, value, "an integer >= 1, or -1 for no limit" + (" (or null)" if optional else ""))


def _check_optimizer(optimizer: DictConfig) -> None:
    if "lr" in optimizer:
        check_number("optimizer.lr", optimizer.lr, 0, exclusive=True)
    if "weight_decay" in optimizer:
        check_number("optimizer.weight_decay", optimizer.weight_decay, 0)
    if "eps" in optimizer:  # 0: a division by zero where a second moment is 0 (NaN, blamed on the rate)
        check_number("optimizer.eps", optimizer.eps, 0, exclusive=True)
    if optimizer.get("fused") is not None:
        check_bool("optimizer.fused", optimizer.fused)
    if "betas" in optimizer:
        betas = optimizer.betas
        if not isinstance(betas, (list, tuple, ListConfig)) or len(betas) != 2:
            raise ConfigError("optimizer.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.95]")
        for index, beta in enumerate(betas):
            check_fraction(f"optimizer.betas.{index}", beta)


def _check_schedule(scheduler: DictConfig) -> None:
    if "warmup_ratio" in scheduler:
        check_fraction("scheduler.warmup_ratio", scheduler.warmup_ratio)
    if "min_lr_ratio" in scheduler:
        value = scheduler.min_lr_ratio
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError("scheduler.min_lr_ratio", value, "a number in [0, 1] (the floor, a fraction of the peak)")


def check_accumulation(trainer: DictConfig, batches: int) -> None:
    """``trainer.accumulate_grad_batches`` no larger than the batches a process trains an epoch (``batches`` of
    the train split, after ``limit_train_batches``, over ``devices``): Lightning ends a step at the epoch's end, so
    a larger value made each step the epoch's batches, not the number asked for."""
    accumulate, limit, devices = (trainer.get(k) for k in ("accumulate_grad_batches", "limit_train_batches", "devices"))
    if isinstance(limit, float):
        batches = int(batches * limit)
    elif isinstance(limit, int):
        batches = min(batches, limit)
    per_process = -(-batches // devices) if isinstance(devices, int) and devices > 0 else batches
    if isinstance(accumulate, int) and per_process > 0 and accumulate > per_process:
        raise ConfigError(
            "trainer.accumulate_grad_batches", accumulate, f"at most the {per_process} batches a process trains "
            f"an epoch (a step ends with its epoch: each would hold {per_process})"
        )  # fmt: skip
