"""Hydra glue: the config folder, composition for the command-line tools, and building objects from configs."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from glm_session.errors import ConfigError, UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
RESOURCES_DIR = Path(__file__).resolve().parent / "resources"


def _precision() -> str:
    """bf16 mixed precision where the hardware has it, else fp32."""
    import torch

    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


if not OmegaConf.has_resolver("glm_session.resources"):
    OmegaConf.register_new_resolver("glm_session.resources", lambda: str(RESOURCES_DIR))
    OmegaConf.register_new_resolver("glm_session.precision", _precision)


# Overrides of a throughput measurement (experiments/bench, experiments/scale): training steps only, no validation,
# checkpoints, loggers or progress bar; the run stops at trainer.max_steps.
TRAINING_ONLY = [
    "trainer.limit_val_batches=0",
    "trainer.max_epochs=-1",
    "trainer.limit_train_batches=1.0",
    "trainer.enable_checkpointing=false",
    "trainer.enable_progress_bar=false",
    "~callbacks",
    "~logger",
]


def compose_config(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/<config_name>.yaml`` with command-line style ``overrides`` (for tools and tests)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)``, raising a config group's own ``UserError`` (Hydra wraps it)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


def build_datamodule(cfg: DictConfig, lightning: bool = True):
    """The DataModule of ``cfg``: its ``data`` group, with the ``tokenizer``, ``template`` and ``strategy`` groups.

    ``lightning=False``: the same pipeline without Lightning (``DialogueData``), for the command-line tools.
    """
    kwargs = OmegaConf.to_container(cfg.data, resolve=True)
    target = kwargs.pop("_target_")
    if lightning:
        cls = get_class(target)
    else:
        from glm_session.data.pipeline import DialogueData as cls
    parts = {name: build(cfg[name]) for name in ("tokenizer", "template", "strategy")}
    known = inspect.signature(cls.__init__).parameters
    for key, value in kwargs.items():
        if key not in known:
            raise ConfigError(f"data.{key}", value, f"left out: the data group has no key {key!r}")
    return cls(**parts, **kwargs)
