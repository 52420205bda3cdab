"""Train: ``python -m glm_session.train [overrides]`` (or ``glm-session-train``); Hydra config ``conf/train.yaml``.

``train(cfg)`` does the work and returns ``(metrics, objects)``; ``main`` only hands it Hydra's config. Everything
a run produces lands in its folder (``output_dir``): the resolved config (``.hydra/``, ``config.yaml``), the data
statistics (``data_stats.json``), ``metrics.json``, CSV (and TensorBoard) logs, and ``checkpoints/``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig, OmegaConf

from glm_session.adapters import QUANTIZE_ON_ONE_DEVICE, check_peft
from glm_session.atomic_files import write_text
from glm_session.checkpoints import HUB_PREFIX, check_resumable, weights_fingerprint
from glm_session.config import CONFIG_DIR, build
from glm_session.data.source import SPLITS
from glm_session.errors import ConfigError, check_int, user_message
from glm_session.hydra_jobs import job, run_app
from glm_session.model.compiled_layers import uncompile
from glm_session.run_info import RunInfo
from glm_session.run_status import METRICS_FILE, read_record
from glm_session.training.checkpoint_io import AtomicCheckpointIO, remove_stale_saves
from glm_session.training.checks import check_accumulation, check_training
from glm_session.training.loggers import build_loggers, check_loggers, log_config
from glm_session.training.progress import progress_bar
from glm_session.training.run_lock import RunFolderBusy, RunFolderLock, launch_rank
from glm_session.training.run_metrics import RunMetrics
from glm_session.training.stop import StopOnSignal

log = logging.getLogger(__name__)


def _experiment_name() -> str | None:
    """The ``experiment=`` choice of a Hydra run (``None`` when called outside Hydra, e.g. from a test)."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("experiment")


def run_info_of(cfg: DictConfig, datamodule: Any) -> RunInfo:
    """The ``RunInfo`` of a run of ``cfg`` on ``datamodule`` (the model config is added by the module)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for key in ("_target_", "tokenizer", "template", "strategy", "supervision"):  # recorded on their own
        data.pop(key, None)
    tokenizer_path = cfg.tokenizer.get("path")
    return RunInfo(
        template=datamodule.template.name,
        strategy=datamodule.strategy.name,
        reduction=cfg.model.reduction,
        tokenizer_fingerprint=datamodule.tokenizer.fingerprint,
        tokenizer_path=str(Path(tokenizer_path).resolve()) if tokenizer_path else None,
        max_seq_len=datamodule.max_seq_len,
        packing=datamodule.packing,
        data=data,
        data_source=datamodule.pipeline.source.key(),
        data_summary={
            split: {key: datamodule.pipeline.prepared(split).summary[key] for key in ("sessions", "turns")}
            for split in SPLITS
        },  # fmt: skip
        model_preset=cfg.model.get("preset"),
        seed=cfg.seed,
        experiment=_experiment_name(),
        supervision=datamodule.supervision.describe(),
        **base_record(cfg.model),
    )


HALF_MODELS = ("bf16-true", "16-true")  # Lightning's precisions that cast the module itself


def base_record(model: DictConfig) -> dict[str, Any]:
    """``peft``, ``init_from`` and, for a parameter-efficient run, ``base_fingerprint`` of a run's record."""
    peft = OmegaConf.to_container(model.get("peft"), resolve=True) if model.get("peft") else None
    lora = check_peft(peft)
    init_from = model.get("init_from")
    if init_from and not str(init_from).startswith(HUB_PREFIX):  # a record read from elsewhere finds it
        init_from = str(Path(init_from).resolve())
    return {
        "peft": lora.describe() if lora else {},
        "init_from": init_from or None,
        "base_fingerprint": weights_fingerprint(init_from) if lora else None,
    }


def preempted_checkpoint(output_dir: Path) -> str | None:
    """Under SLURM, the checkpoint of this job's newest run that a preemption stopped (a requeued job relaunches
    with a new run folder beside it), else ``None``."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None:
        return None
    found = []
    for folder in output_dir.parent.iterdir() if output_dir.parent.is_dir() else []:
        record = read_record(folder)
        checkpoint = record.get("checkpoint")
        if (
            record.get("preempted")
            and record.get("slurm_job") == job_id
            and checkpoint
            and Path(checkpoint).exists()
        ):
            found.append((record.get("stopped_at_step", 0), checkpoint))
    return max(found)[1] if found else None


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit the model of ``cfg`` on its data; return the run's metrics and the objects that produced them.
    ``extra_callbacks`` join the config's (e.g. a benchmark's profiler). The run owns its folder while it runs
    (``RunFolderLock``); SIGTERM, SIGINT and a SLURM preemption stop it at a step boundary with a checkpoint and
    raise ``RunStopped``; a requeued SLURM job resumes its preempted run."""
    output_dir = Path(cfg.output_dir)
    with RunFolderLock(output_dir):
        return _train(cfg, output_dir, extra_callbacks)


def _train(
    cfg: DictConfig, output_dir: Path, extra_callbacks: Sequence[L.Callback]
) -> tuple[dict[str, Any], dict[str, Any]]:
    check_training(cfg)
    strategy_target = OmegaConf.select(cfg, "trainer.strategy._target_", default=None)
    sharded = strategy_target is not None and issubclass(get_class(strategy_target), ModelParallelStrategy)
    evaluation = OmegaConf.select(cfg, "evaluate.enabled", default=False)
    if sharded and evaluation:
        raise ConfigError(
            "evaluate.enabled", True, "false with trainer=fsdp: generation needs the whole model on one device; "
            "evaluate the run's checkpoint afterwards (consolidate it, then python -m glm_session.evaluate ckpt_path=...)"
        )  # fmt: skip
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="32-true"))
    if precision in HALF_MODELS:
        raise ConfigError(
            "trainer.precision", precision, "other than a '-true' half precision (bf16-mixed or 32-true): it casts "
            "the whole module, the fp64 loss sums of the step and the turns included, and leaves AdamW no fp32 weights "
            "(bf16 weights with fp32 master copies: bf16-mixed, or trainer=fsdp's mixed precision)"
        )  # fmt: skip
    if OmegaConf.select(cfg, "model.peft.method", default="none") != "none" and not cfg.model.get("init_from"):
        log.warning(
            "model.peft=%s without model.init_from: the adapters train on randomly initialised weights, and no "
            "tool can rebuild this run's model from its checkpoints (they hold the adapters only)",
            cfg.model.peft.method,
        )
    if sharded and OmegaConf.select(cfg, "model.peft.quantize", default=None):
        raise ConfigError("model.peft.quantize", cfg.model.peft.quantize, QUANTIZE_ON_ONE_DEVICE)
    generation = build(cfg.generation) if evaluation else None
    check_loggers(cfg.get("logger"))  # a missing extra ends the run before its data is built
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = build(cfg.data)
    if generation is not None:
        generation.check_room(datamodule.max_seq_len, datamodule.tokenizer, datamodule.template)
    stats = {split: datamodule.statistics(split) for split in ("train", "validation")}
    (output_dir / "data_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    datamodule.pipeline.require_batches("train")
    check_accumulation(cfg.trainer, stats["train"]["batches"])
    if cfg.trainer.get("limit_val_batches") != 0:
        datamodule.pipeline.require_batches("validation")
    for warning in (datamodule.pipeline.length_warning("train"), datamodule.pipeline.window_warning("train")):
        if warning:
            log.warning("%s", warning)

    module = build(
        cfg.model,
        tokenizer_size=len(datamodule.tokenizer),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        run_info=run_info_of(cfg, datamodule),
    )
    ckpt_path = cfg.get("ckpt_path") or preempted_checkpoint(output_dir)
    if ckpt_path and not cfg.get("ckpt_path"):
        log.warning("resuming SLURM job %s's preempted run from %s", os.environ["SLURM_JOB_ID"], ckpt_path)
    if ckpt_path:
        check_resumable(ckpt_path, module.run_info, allow_changes=cfg.resume_allow_changes, sharded_run=sharded,
                        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
                        max_steps=-1 if generation is not None else cfg.trainer.get("max_steps", -1))  # fmt: skip
    run_metrics = RunMetrics(
        path=str(output_dir / METRICS_FILE),
        warmup_batches=cfg.metrics.warmup_batches,
        extra={"run_info": module.run_info.to_dict(), "data": stats["train"]},
    )
    stop_after_step = check_int("stop_after_step", cfg.get("stop_after_step"), minimum=1, optional=True)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None] + [
        run_metrics,
        StopOnSignal(stop_after_step),  # after RunMetrics: a stop's checkpoint counts the step's tokens
        *extra_callbacks,
    ]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(progress_bar(cfg.get("progress", "auto"), cfg.trainer.get("log_every_n_steps", 50)))
    loggers = build_loggers(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()]
    )
    log_config(loggers, cfg)
    for callback in trainer.checkpoint_callbacks:  # what a kill during an earlier save of this run left
        for name in remove_stale_saves(callback.dirpath) if callback.dirpath else []:
            log.info("removed %s/%s, left by an interrupted save", callback.dirpath, name)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = dict(run_metrics.metrics)
    if generation is not None and trainer.is_global_zero:
        from glm_session.evaluation.evaluator import evaluate_model

        # Lightning's teardown has moved the model back to the CPU: generate on the training device.
        module.model.to(trainer.strategy.root_device)
        if module.compile_layers:  # evaluated as glm_session.evaluate evaluates a checkpoint: uncompiled
            uncompile(module.model)
        metrics["evaluation"] = evaluate_model(
            module.model, datamodule, cfg.evaluate.split, output_dir / "evaluation", generation, cfg.evaluate.limit
        )
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule, "cfg": cfg}


def record_failure(output_dir: str | Path, err: Exception) -> None:
    """The run folder says the run failed and why: ``metrics.json`` (status ``failed``, the error in one line) and
    ``failed.txt`` (the traceback). Best effort: a full disk must not hide the error itself."""
    message = user_message(err) or f"{type(err).__name__}: {err}"
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "failed.txt").write_text(traceback.format_exc())
        before = read_record(output_dir)
        record = {**before, "status": "failed", "error": message.splitlines()[0] if message else ""}
        # Whether its training had ended, so that what failed came after it (the evaluation): only from this record
        record.pop("failed_after_training", None)
        if before.get("status") == "completed":
            record["failed_after_training"] = True
        write_text(Path(output_dir) / METRICS_FILE, json.dumps(record, indent=2) + "\n")
    except OSError:
        pass


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
@job
def hydra_app(cfg: DictConfig) -> float | None:
    try:
        metrics, _ = train(cfg)
    except RunFolderBusy:  # the folder is another run's: write nothing into it
        raise
    except Exception as err:  # a single run then ends with the message; a multirun names the job at the end
        record_failure(cfg.output_dir, err)
        raise
    if launch_rank() == 0:  # the processes a multi-device launch starts end the same run
        print(summary_lines(cfg.output_dir, metrics), flush=True)
    losses = metrics.get("val_loss_by_epoch") or [None]
    return losses[-1]  # for sweepers that optimise


def summary_lines(output_dir: str, metrics: dict[str, Any]) -> str:
    """What a run ends with: its folder and headline figures."""
    losses = ", ".join(f"{loss:.3f}" for loss in metrics.get("val_loss_by_epoch", []))
    lines = [f"run folder: {output_dir}", f"validation loss by epoch: {losses or 'none'}"]
    if metrics.get("tokens_per_second"):
        lines.append(f"tokens/s: {metrics['tokens_per_second']:,.0f} ({metrics['supervised_tokens_per_second']:,.0f} "
                     f"answer tokens/s), {metrics['global_steps']} optimizer steps")  # fmt: skip
    if "evaluation" in metrics:
        lines.append(
            "evaluation ROUGE-1/2/L: " + " / ".join(f"{v:.2f}" for v in metrics["evaluation"]["rouge"].values())
        )
    return "\n".join(lines)


def main() -> None:
    """``python -m glm_session.train`` / ``glm-session-train``: bad input ends with one line and exit code 2.

    A distributed run leaves its process group, and a finished one then ends without the interpreter's
    finalization: there gloo's threads can still release tensors and abort a rank whose run completed
    ("terminate called without an active exception": 1 in 21 two-process CPU runs on 2026-12-03 with the process
    group destroyed and the interpreter left to finalize, 0 in 40 with this exit; pytorch/pytorch#179291 describes
    the cause)."""
    try:
        run_app(hydra_app)
    finally:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            torch.distributed.destroy_process_group()
    if distributed:  # the run finished (an error or a stop left through the finally clause, with its exit code)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
