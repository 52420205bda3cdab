"""Every read of a checkpoint or of initial weights, with one error style: a ``CheckpointError`` that names the file
and what is wrong with it (missing, a folder, empty, truncated, damaged bytes, random bytes, pickled objects, not a
glm_session checkpoint, weights of another model, non-finite weights, or a run made otherwise than the one resuming it).

- ``read_checkpoint``: a run's checkpoint file as a dict (``torch.load(weights_only=True)``);
- ``load_model``: the ``GlmForCausalLM`` of a run's checkpoint and its ``RunInfo`` (evaluate, export, analysis);
- ``read_initial_weights`` / ``load_weights_into``: ``model.init_from`` (a Hugging Face folder, a run's checkpoint,
  or ``hf://<hub id>``);
- ``check_resumable``: before ``ckpt_path=...`` resumes a run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import GlmConfig, GlmForCausalLM

from glm_session.errors import UserError
from glm_session.run_info import SHAPE_KEYS, RunInfo
from glm_session.tokenizer import ChatGLM2Tokenizer

log = logging.getLogger(__name__)
PREFIX = "model."  # ChatGLM2Module keeps the GlmForCausalLM as ``self.model``
# Attention that transformers implements itself; any other name (a Hub repo "org/kernel", flash_attention_2 with the
# `kernels` package as its fallback) makes it download and run code. ``model.attn_implementation`` takes these only.
BUILTIN_ATTENTION = ("sdpa", "eager", "flex_attention")
ATTENTION_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")
# Config keys that name code to fetch or run (remote code, Hub kernels): never taken from a file.
CODE_KEYS = ("auto_map", "use_kernels", "kernel_config", "custom_pipelines", "trust_remote_code")
HUB_PREFIX = "hf://"  # model.init_from=hf://THUDM/... : a Hugging Face Hub id, asked for explicitly
SHARDED_METADATA = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the shards of a folder


class CheckpointError(UserError):
    """A checkpoint or weights file that cannot be used; the message names the file and the reason."""


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The dict in a checkpoint file, loaded with ``weights_only=True`` (``mmap``: tensors stay on disk)."""
    path = Path(path)
    if path.is_dir():
        if (path / SHARDED_METADATA).is_file():
            raise CheckpointError(
                f"{path}: a sharded (trainer=fsdp) checkpoint folder; make it one file with "
                f"`python -m lightning.fabric.utilities.consolidate_checkpoint {path}` and use {path}.consolidated"
            )
        raise CheckpointError(f"{path}: a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: an empty file, not a checkpoint")
    with path.open("rb") as f:
        magic = f.read(2)
    if magic not in (b"PK", b"\x80\x02"):  # torch.save writes a zip archive (or, before torch 1.6, a pickle)
        raise CheckpointError(f"{path}: not a readable checkpoint (not a file that torch.save wrote)")
    damaged = magic == b"PK" and damaged_record(path)
    if damaged:
        raise CheckpointError(
            f"{path}: a damaged checkpoint: the bytes of its record {damaged} do not match the CRC-32 stored with "
            "them (a bad copy or disk); use another copy or an earlier checkpoint"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many kinds for files that are not whole checkpoints
        first_line = (str(err).strip().splitlines() or [""])[0]
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            reason = f"it holds Python objects ({refused[1]}) that a weights-only load refuses: not a checkpoint of ours"
        elif "Weights only load failed" in first_line:
            reason = "not a readable checkpoint (not a file that torch.save wrote)"
        elif (
            "zip archive" in first_line
            or "mmap can only be used" in first_line
            or isinstance(err, EOFError)
            or (isinstance(err, OSError) and err.errno == errno.EINVAL)  # a record past the end of a cut file
        ):
            reason = "not a complete checkpoint (truncated or corrupt)"
        else:
            reason = f"not a readable checkpoint ({type(err).__name__}: {first_line[:200]})"
        raise CheckpointError(f"{path}: {reason}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a training checkpoint")
    return checkpoint


def damaged_record(path: Path) -> str | None:
    """The first record of a ``torch.save`` zip archive whose bytes differ from the CRC-32 its writer stored (about
    3 GB/s; ``torch.load`` checks none, so a flipped bit in a tensor loads as a wrong weight), or ``None``. An
    archive too cut to list its records is left to ``torch.load``, whose error says it is incomplete."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return None


def run_info_of(checkpoint: dict[str, Any], path: str | Path) -> RunInfo:
    """The ``RunInfo`` a glm_session run saved in ``checkpoint``."""
    info = checkpoint.get("glm_session")
    if not isinstance(info, dict) or "model_config" not in info:
        raise CheckpointError(
            f"{path}: not a glm_session training checkpoint (no 'glm_session' entry; a plain state dict or another "
            "program's checkpoint?)"
        )
    try:
        return RunInfo.from_dict(info)
    except TypeError as err:
        raise CheckpointError(f"{path}: an unreadable 'glm_session' entry ({err})") from None


def model_state(checkpoint: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The ``GlmForCausalLM`` weights of a run's checkpoint (``state_dict['model.*']``, prefix removed)."""
    weights = checkpoint.get("state_dict")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: no 'state_dict' of model weights")
    state = {k.removeprefix(PREFIX): v for k, v in weights.items() if isinstance(k, str) and k.startswith(PREFIX)}
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no model weights (expected a glm_session run's state_dict['model.*'])")
    return state


def check_finite(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise ``CheckpointError`` naming the first tensor that holds a NaN or an infinity."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{path}: {name} holds {bad} non-finite values (NaN or infinity): a corrupt file"
            )


def load_weights_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``model.load_state_dict(state)``, every mismatch a ``CheckpointError`` naming the tensors and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (model: {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]  # fmt: skip
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} tensors of other shapes, e.g. {shapes[0]}")
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown, e.g. {unexpected[0]}")
    if problems:
        raise CheckpointError(f"{source}: weights of another model: " + "; ".join(problems))
    model.load_state_dict(state)


def model_config(values: dict[str, Any], source: str | Path) -> GlmConfig:
    """The ``GlmConfig`` of a config read from a file (a checkpoint's run record), without anything that makes
    transformers fetch or run code: ``CODE_KEYS`` and attention other than ``BUILTIN_ATTENTION`` are left out (the
    model uses SDPA), and a warning names what was left out."""
    values, ignored = dict(values), []
    for key in CODE_KEYS:
        if key in values:
            ignored.append(f"{key}={values.pop(key)!r}")
    attention = "sdpa"
    for key in ATTENTION_KEYS:
        value = values.pop(key, None)
        if value in BUILTIN_ATTENTION:
            attention = value
        elif value is not None:
            ignored.append(f"{key}={value!r} (not one of transformers' own attention implementations)")
    if ignored:
        log.warning("%s: ignored %s: a model config from a file never makes transformers fetch or run code",
                    source, "; ".join(ignored))  # fmt: skip
    config = GlmConfig.from_dict(values)
    config._attn_implementation = attention
    return config


def load_model(path: str | Path, merge_adapters: bool = True) -> tuple[GlmForCausalLM, RunInfo]:
    """The model of a run's checkpoint file, built from the config it was trained with (``model_config``: nothing
    in it can make transformers fetch or run code), and its ``RunInfo``. A LoRA run's model is its base with the
    adapters merged in; with ``merge_adapters=False``, with the adapters as peft layers (the only trainable
    parameters: ``analysis measure`` takes its gradients on them)."""
    checkpoint = read_checkpoint(path)
    info = run_info_of(checkpoint, path)
    state = model_state(checkpoint, path)
    try:
        model = GlmForCausalLM(model_config(info.model_config, path))
    except Exception as err:
        raise CheckpointError(f"{path}: an unusable model config ({type(err).__name__}: {err})") from None
    if info.peft:  # the adapters only: the base they were trained on, then the adapters merged into it
        model = _with_base(model, info, state, path, merge_adapters)
    else:
        load_weights_into(model, state, path)
    check_finite(model.state_dict(), path)
    return model, info


def run_tokenizer(path: str | Path, info: RunInfo, tokenizer: ChatGLM2Tokenizer | None = None) -> ChatGLM2Tokenizer:
    """The tokenizer the run of checkpoint ``path`` trained with: ``tokenizer`` if given, else the one its record
    names; a tokenizer whose fingerprint is not the run's is a ``CheckpointError``."""
    tokenizer = tokenizer or ChatGLM2Tokenizer.from_pretrained(info.tokenizer_path)
    if tokenizer.fingerprint != info.tokenizer_fingerprint:
        raise CheckpointError(
            f"{path}: trained with tokenizer {info.tokenizer_fingerprint}, not with "
            f"{tokenizer.vocab_file} ({tokenizer.fingerprint})"
        )
    return tokenizer


def _with_base(
    model: GlmForCausalLM, info: RunInfo, adapters: dict[str, torch.Tensor], path: str | Path, merge: bool = True
):
    """A LoRA run's model: its base (``info.init_from``, checked by fingerprint) with its adapters merged in (or
    kept as peft layers, the base frozen)."""
    from glm_session.adapters import merged, quantize_base, settings_of, with_adapters

    if not info.init_from:
        raise CheckpointError(f"{path}: LoRA adapters without a recorded base (model.init_from)")
    if not info.init_from.startswith(HUB_PREFIX) and not Path(info.init_from).exists():
        raise CheckpointError(
            f"{path}: the base of these LoRA adapters, {info.init_from} (the run's model.init_from), is not there: "
            "put it back at that path, or export the adapters alone (python -m glm_session.export --adapter) and "
            "load them onto the base where it is now (model.init_from=<base> model.init_adapter=<adapters>)"
        )
    check_init_from(info.init_from)
    if weights_fingerprint(info.init_from) != info.base_fingerprint:
        raise CheckpointError(
            f"{path}: its base {info.init_from} has changed since the run (fingerprint "
            f"{(info.base_fingerprint or 'none')[:12]} then, {weights_fingerprint(info.init_from)[:12]} now)"
        )
    load_weights_into(model, initial_state(info.init_from), f"model.init_from={info.init_from}")
    try:
        settings = settings_of(info.peft)
        if merge:
            return merged(model, settings, adapters)
        if settings.quantize:  # the 4-bit base the adapters were trained on (merged: into the full-precision base)
            quantize_base(model, settings, torch.float32)
        with_adapters(model, settings, adapters)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(".lora_" in name)
        return model
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None


def read_initial_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``GlmForCausalLM`` state dict of ``model.init_from``: a folder's ``*.safetensors`` (converted or exported),
    or a run's single-file checkpoint (``<run>/checkpoints/*.ckpt``)."""
    path = Path(path)
    if path.is_dir() and not (path / SHARDED_METADATA).is_file():
        from safetensors.torch import load_file

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{path}: no *.safetensors weights (init_from takes a converted or exported folder)"
            )
        state: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                state.update(load_file(file))
            except Exception as err:
                raise CheckpointError(f"{file}: not readable safetensors ({type(err).__name__}: {err})") from None
        check_finite(state, path)
        return state
    checkpoint = read_checkpoint(path)
    state = model_state(checkpoint, path)
    check_finite(state, path)
    return state


def weights_fingerprint(init_from: str | None) -> str | None:
    """sha256 of the files ``model.init_from`` reads (a folder's ``*.safetensors`` in name order, or the checkpoint
    file; a Hub id as written): equal fingerprints, equal initial weights."""
    if init_from is None:
        return None
    digest = hashlib.sha256()
    path = Path(init_from)
    if init_from.startswith(HUB_PREFIX) or not path.exists():
        digest.update(init_from.encode())
        return digest.hexdigest()
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as f:
            while block := f.read(1 << 23):
                digest.update(block)
    return digest.hexdigest()


def initial_state(init_from: str) -> dict[str, torch.Tensor]:
    """The weights ``model.init_from`` names: ``hf://<id>`` from the Hugging Face Hub, else a local folder or file."""
    if init_from.startswith(HUB_PREFIX):
        hub_id = init_from.removeprefix(HUB_PREFIX)
        # The Hub only when asked for, and then weights only: no remote code, transformers' own attention.
        try:
            model = GlmForCausalLM.from_pretrained(hub_id, dtype=torch.float32, attn_implementation="sdpa")
        except OSError as err:  # offline, unknown id, no access: transformers says which in its first line
            first_line = (str(err).strip().splitlines() or [""])[0]
            raise CheckpointError(
                f"model.init_from={init_from}: not loadable from the Hugging Face Hub ({first_line})"
            ) from None
        return model.state_dict()
    return read_initial_weights(init_from)


def config_numbers(config: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of a model config (``GlmConfig.to_dict`` or a folder's ``config.json``) that decide what its
    weights compute: the shapes, the norm's epsilon, the rotary angles (top level, or in ``rope_parameters``)."""
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), Mapping) else {}
    numbers = {key: config.get(key) for key in (*SHAPE_KEYS, "rms_norm_eps")}
    for key in ("rope_theta", "partial_rotary_factor"):
        numbers[key] = config.get(key) if config.get(key) is not None else rope.get(key)
    return {key: value for key, value in numbers.items() if value is not None}


def check_init_config(init_from: str | None, config: GlmConfig) -> None:
    """Refuse a ``model.init_from`` folder whose ``config.json`` describes another model than the run's: the
    tensors' shapes would say so later, but an epsilon or rotary angles other than the preset's were taken without
    a word (the weights then compute otherwise than they were trained to). A folder without one is left to the
    tensors."""
    if init_from is None or init_from.startswith(HUB_PREFIX) or not (Path(init_from) / "config.json").is_file():
        return
    path = Path(init_from) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"model.init_from={init_from}: {path.name} is not readable JSON ({err})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"model.init_from={init_from}: {path.name} holds a JSON {type(saved).__name__}")
    theirs, ours = config_numbers(saved), config_numbers(config.to_dict())
    differ = [f"{key} {theirs[key]!r} there, {ours[key]!r} here" for key in ours if key in theirs
              and not (isinstance(theirs[key], int | float) and math.isclose(theirs[key], ours[key], rel_tol=1e-9))]  # fmt: skip
    if differ:
        raise CheckpointError(
            f"model.init_from={init_from}: its {path.name} describes another model than this run's "
            f"({'; '.join(differ)}): choose the model preset (and model.config_overrides) that match it"
        )


def check_init_from(init_from: str | None) -> str | None:
    """``model.init_from`` as given, if it names an existing file or folder or an explicit ``hf://`` hub id."""
    if init_from is None or str(init_from).startswith(HUB_PREFIX):
        return init_from
    if not Path(init_from).exists():
        raise CheckpointError(
            f"model.init_from={init_from}: no such folder or checkpoint file (for a Hugging Face Hub model, write "
            f"{HUB_PREFIX}<id>)"
        )
    return str(init_from)


def trainable_set(peft: dict[str, Any]) -> tuple:
    """What decides a run's trainable parameters and their shapes: full fine-tuning (``{}``: every weight) or a
    method's rank and target modules."""
    return (peft.get("method"), peft.get("rank"), sorted(peft.get("target_modules") or ()))


def check_optimizer(path: Path, checkpoint: dict[str, Any], optimizer: Mapping[str, Any]) -> None:
    """Refuse optimizer settings (``optimizer.lr``, ``betas``, ``eps``, ``weight_decay``) other than those of the
    optimizer state in ``checkpoint``: resuming restores that state, hyperparameters included, so new values would
    be dropped without a word. (A sharded checkpoint keeps its state in the shards: not compared.)"""
    groups = [g for state in checkpoint.get("optimizer_states") or [] for g in state.get("param_groups", [])]
    if not groups:
        return
    saved = {
        "lr": groups[0].get("initial_lr", groups[0].get("lr")),  # initial_lr: the rate the schedule scales
        "betas": list(groups[0].get("betas", ())) or None,
        "eps": groups[0].get("eps"),
        "weight_decay": max(g.get("weight_decay", 0.0) for g in groups),  # biases and norms: 0 in their group
    }
    changed = []
    for key, value in saved.items():
        new = optimizer.get(key)
        if value is None or new is None:
            continue
        pairs = zip(value, new, strict=False) if key == "betas" else [(value, new)]
        if (key == "betas" and len(value) != len(new)) or not all(math.isclose(a, b, rel_tol=1e-6) for a, b in pairs):
            changed.append(f"optimizer.{key}: {value!r} -> {new!r}")
    if changed:
        raise CheckpointError(
            f"{path}: its optimizer state holds other settings ({'; '.join(changed)}), and resuming restores them: "
            "the new values would not be used. Resume with the settings it was trained with, or start a new run "
            f"from its weights (model.init_from={path})"
        )


def check_resumable(
    path: str | Path,
    run: RunInfo,
    allow_changes: bool = False,
    sharded_run: bool = False,
    optimizer: Mapping[str, Any] | None = None,
    max_steps: int = -1,
) -> None:
    """Check that ``ckpt_path`` resumes this run: a whole glm_session checkpoint of the same model, with finite
    weights, made with the same data, samples, batches, template, tokenizer and reduction (unless
    ``allow_changes``) and the same ``optimizer`` settings, with steps left before ``max_steps`` (-1: not checked,
    as for a run that evaluates after training: resumed after its last step, it evaluates); a sharded checkpoint
    folder only for a sharded run (``sharded_run``: trainer=fsdp)."""
    path = Path(path)
    sharded = path.is_dir() and (path / SHARDED_METADATA).is_file()
    if sharded and not sharded_run:
        raise CheckpointError(
            f"{path}: a sharded (trainer=fsdp) checkpoint folder: resume it with trainer=fsdp, or make it one file "
            f"(`python -m lightning.fabric.utilities.consolidate_checkpoint {path}`) and resume from "
            f"{path}.consolidated"
        )
    checkpoint = read_checkpoint(path / SHARDED_METADATA if sharded else path, mmap=True)
    saved = run_info_of(checkpoint, path)
    shape = saved.differences(run, ("model_shape",))
    if shape:
        raise CheckpointError(f"{path}: a checkpoint of another model ({'; '.join(shape)})")
    if trainable_set(saved.peft) != trainable_set(run.peft):  # the optimizer's state is of other parameters
        raise CheckpointError(
            f"{path}: it trains other parameters than this run ({'; '.join(saved.differences(run, ('peft',)))}); "
            "resume with the model.peft settings it was trained with (resume_allow_changes does not change which "
            "parameters train)"
        )
    if saved.peft and saved.base_fingerprint and saved.base_fingerprint != run.base_fingerprint:
        raise CheckpointError(
            f"{path}: its adapters were trained on the base {saved.init_from} (fingerprint "
            f"{saved.base_fingerprint[:12]}), not on model.init_from={run.init_from} "
            f"({(run.base_fingerprint or 'none')[:12]}): resume with the same base weights"
        )
    if not sharded:
        check_finite(model_state(checkpoint, path), path)
    if optimizer is not None:
        check_optimizer(path, checkpoint, optimizer)
    moved = saved.moved_data(run)
    if moved:
        log.warning("%s: data: the same content at another path, allowed (%s)", path, "; ".join(moved))
    changes = saved.differences(run)
    if changes and not allow_changes:
        raise CheckpointError(
            f"{path}: this run differs from the checkpoint's ({'; '.join(changes)}); resume it with the settings it "
            "was trained with, or add resume_allow_changes=true"
        )
    done = checkpoint.get("global_step")
    if max_steps > 0 and isinstance(done, int) and done >= max_steps:  # it ended "completed" with the old figures
        raise CheckpointError(
            f"{path}: saved after optimizer step {done}, and trainer.max_steps={max_steps}: nothing left to train; "
            "give a larger trainer.max_steps to train on"
        )
