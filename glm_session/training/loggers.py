"""A run's loggers, from the ``logger`` config group: CSV always (``<run>/logs/metrics.csv``); TensorBoard, Weights &
Biases and MLflow where their extra is installed. A missing extra is one line naming it. Every logger is given the
run's resolved config as its hyperparameters, so a tracker's run table can be filtered by any override."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from glm_session.errors import UserError

EXTRAS = {  # logger class -> (the modules it can use, the extra that installs one)
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard"),
    "WandbLogger": (("wandb",), "wandb"),
    "MLFlowLogger": (("mlflow",), "mlflow"),
}


def check_installed(key: str, target: str) -> None:
    """Raise a one-line ``UserError`` when the logger ``target`` of ``logger.<key>`` needs a package not installed."""
    modules, extra = EXTRAS.get(target.rsplit(".", 1)[-1], ((), ""))
    if modules and not any(importlib.util.find_spec(module) for module in modules):
        raise UserError(f"logger.{key} ({target}) needs the {modules[0]} package: pip install 'glm_session[{extra}]'")


def check_loggers(loggers: DictConfig | None) -> None:
    """Every configured logger's package is installed: checked before a run spends its time on the data."""
    for key, node in (loggers or {}).items():
        if node is not None:
            check_installed(key, str(node.get("_target_", "")))


def build_loggers(loggers: DictConfig | None) -> list[Logger]:
    check_loggers(loggers)
    built = []
    for node in (loggers or {}).values():
        if node is None:
            continue
        uri = str(node.get("tracking_uri") or "")
        if uri.startswith("sqlite:///"):  # MLflow's local store: SQLite creates the database, not its folder
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        built.append(instantiate(node))
    return built


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without Hydra's own node, as ``{"optimizer.lr": 0.001, ...}``."""
    found: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            found[prefix.rstrip(".")] = node

    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    walk(container, "")
    return found


def log_config(loggers: list[Logger], cfg: DictConfig) -> None:
    params = flat_config(cfg)
    for logger in loggers:
        logger.log_hyperparams(params)
