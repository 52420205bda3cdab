"""Hydra glue: the config folder, composition for the command-line tools, and building objects from configs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

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
    "+trainer.enable_checkpointing=false",
    "trainer.enable_progress_bar=false",
    "~callbacks",
    "~logger",
]


def compose_config(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/<config_name>.yaml`` with command-line style ``overrides`` (for tools and tests)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


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
    parts = {name: instantiate(cfg[name]) for name in ("tokenizer", "template", "strategy")}
    return cls(**parts, **kwargs)
