"""Hydra glue: the config folder, composition for the command-line tools, and building objects from configs."""

from __future__ import annotations

import functools
import importlib.resources
import inspect
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from glm_session.errors import ConfigError, UserError


def _config_dir() -> Path:
    """``conf/``: the installed package ``glm_session.conf`` (a wheel carries it), or the repository's folder."""
    try:
        return Path(str(importlib.resources.files("glm_session.conf")))
    except ModuleNotFoundError:  # a source checkout that is not installed
        return Path(__file__).resolve().parent.parent / "conf"


CONFIG_DIR = _config_dir()
RESOURCES_DIR = Path(__file__).resolve().parent / "resources"


def _precision() -> str:
    """bf16 mixed precision where the hardware has it, else fp32."""
    import torch

    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


@functools.cache
def run_stamp() -> str:
    """The name of this process's run (or sweep) folder: its start time, made unique among concurrent starts by the
    process id; the processes of a multi-process launch share it (torchrun: the same second; SLURM: the job id)."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    if "SLURM_JOB_ID" in os.environ:
        return f"{stamp}_slurm{os.environ['SLURM_JOB_ID']}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return stamp
    return f"{stamp}_{os.getpid()}"


def run_folder(checkpoint: str) -> Path:
    """The run folder of a checkpoint (``<run>/checkpoints/last.ckpt`` -> ``<run>``), else the checkpoint's folder."""
    path = Path(checkpoint)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def device_of(choice: str) -> str:
    """``device=auto`` of the commands that run a model outside Lightning: the GPU if there is one, else the CPU;
    any other choice as it is (``cuda:1``, ``cpu``)."""
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_label(output_dir: str) -> str:
    """A run's name for experiment trackers: the last two parts of its folder (``session/<stamp>``,
    ``<sweep stamp>/<job>``)."""
    return "/".join(Path(output_dir).parts[-2:])


def wandb_offline() -> bool:
    """Weights & Biases logs offline unless the user set a key (``WANDB_API_KEY``) or asked for online mode."""
    return not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "online"


if not OmegaConf.has_resolver("glm_session.resources"):
    OmegaConf.register_new_resolver("glm_session.resources", lambda: str(RESOURCES_DIR))
    OmegaConf.register_new_resolver("glm_session.precision", _precision)
    OmegaConf.register_new_resolver("glm_session.run_name", lambda experiment, strategy: experiment or strategy)
    OmegaConf.register_new_resolver("glm_session.run_folder", lambda checkpoint: str(run_folder(checkpoint)))
    OmegaConf.register_new_resolver("glm_session.run_stamp", run_stamp)
    OmegaConf.register_new_resolver("glm_session.run_label", run_label)
    OmegaConf.register_new_resolver("glm_session.wandb_offline", wandb_offline)


def compose_config(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/<config_name>.yaml`` with command-line style ``overrides`` (for tools and tests)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def build(node: Any, **kwargs: Any) -> Any:
    """The object a config node describes (its ``_target_`` called with its keys), ``kwargs`` passed on as they are.

    Unlike ``hydra.utils.instantiate(node, **kwargs)``, objects in ``kwargs`` are not merged into the config first
    (which would turn a dataclass, a template or a strategy, into config keys). A key the target does not take is a
    ``ConfigError`` naming it; a ``UserError`` of the target is raised as it is.
    """
    try:
        factory = instantiate(node, _partial_=True)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise
    parameters = inspect.signature(factory.func).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        group = node._key() if hasattr(node, "_key") else None
        for key, value in {**factory.keywords, **kwargs}.items():
            if key not in parameters:
                raise ConfigError(
                    f"{group}.{key}" if group else key,
                    value,
                    f"left out: the {group or 'config'} group has no key {key!r}",
                )
    return factory(**kwargs)
