"""Parameter-efficient fine-tuning: LoRA adapters on a frozen base, through peft (``model.peft``, ``conf/peft/``).

``peft.inject_adapter_in_model`` puts peft's LoRA layers into the ``GlmForCausalLM`` in place, so the module keeps
one model (``self.model``) whatever the method: the loss, the chunked loss, the kernels, compiled layers, FSDP and
generation see the same modules as in full fine-tuning. The base's weights are frozen (and cast to bf16 under bf16
training: they need no fp32 master copy); the adapters train in fp32. What a run saves is the adapters' state
(``adapter_state``, peft's names); ``peft_config`` gives the ``LoraConfig`` that ``peft.PeftModel`` needs to load
or merge them (``export``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from glm_session.errors import ConfigError, check_choice, check_int

METHODS = ("none", "lora")
# transformers' GlmForCausalLM module names (peft has no default target list for this model)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
TARGETABLE = (*LORA_TARGETS, "lm_head")
BASE_DTYPES = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class LoraSettings:
    """What ``peft=lora`` trains: rank-``rank`` adapters scaled by ``alpha / rank`` on ``target_modules``."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    base_dtype: str = "auto"

    def describe(self) -> dict[str, Any]:
        """The record of a run (``RunInfo.peft``)."""
        return {"method": "lora", **asdict(self), "target_modules": list(self.target_modules)}


def check_peft(peft: Mapping[str, Any] | None, loss_chunk_tokens: int | None = None) -> LoraSettings | None:
    """The LoRA settings of ``model.peft`` (``None``: full fine-tuning), each value checked."""
    if not peft:
        return None
    method = check_choice("model.peft.method", peft.get("method", "none"), METHODS)
    if method == "none":
        return None
    known = {"method", "rank", "alpha", "dropout", "target_modules", "base_dtype"}
    unknown = sorted(set(peft) - known)
    if unknown:
        raise ConfigError(f"model.peft.{unknown[0]}", peft[unknown[0]], f"one of the LoRA keys {sorted(known)}")
    rank = check_int("model.peft.rank", peft.get("rank", 16), minimum=1)
    alpha = peft.get("alpha", 2 * rank)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise ConfigError("model.peft.alpha", alpha, "a number > 0")
    dropout = peft.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError("model.peft.dropout", dropout, "a number in [0, 1)")
    targets = peft.get("target_modules", list(LORA_TARGETS))
    if isinstance(targets, str) or not targets or any(t not in TARGETABLE for t in targets):
        raise ConfigError("model.peft.target_modules", targets, f"a non-empty list of {', '.join(TARGETABLE)}")
    if "lm_head" in targets and loss_chunk_tokens is not None:
        raise ConfigError(
            "model.peft.target_modules", list(targets), "without lm_head when model.loss_chunk_tokens is set (the "
            "chunked loss multiplies by lm_head.weight itself and would skip its adapter); drop lm_head or set "
            "model.loss_chunk_tokens=null"
        )  # fmt: skip
    base_dtype = check_choice("model.peft.base_dtype", peft.get("base_dtype", "auto"), BASE_DTYPES)
    return LoraSettings(rank, float(alpha), float(dropout), tuple(dict.fromkeys(targets)), base_dtype)


def peft_config(settings: LoraSettings):
    """peft's ``LoraConfig`` of ``settings``."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )


def add_lora(model: torch.nn.Module, settings: LoraSettings, bf16_base: bool = False) -> torch.nn.Module:
    """Inject LoRA adapters into ``model`` in place: the base frozen (in bf16 if ``bf16_base``), the adapters
    trainable in fp32. Returns ``model``."""
    from peft import inject_adapter_in_model

    if bf16_base:
        model.to(torch.bfloat16)  # before the adapters: they are created, and stay, in fp32
    inject_adapter_in_model(peft_config(settings), model)
    for name, parameter in model.named_parameters():
        is_adapter = "lora_" in name
        parameter.requires_grad_(is_adapter)
        if is_adapter and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return model


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under peft's names (``base_model.model....lora_A.weight``), as ``PeftModel`` saves
    them."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key (the module's or peft's) belongs to an adapter."""
    return ".lora_" in key
