"""Parameter-efficient fine-tuning: LoRA adapters on a frozen base, through peft (``model.peft``, ``conf/peft/``).

``peft.inject_adapter_in_model`` puts peft's LoRA layers into the ``GlmForCausalLM`` in place, so the module keeps
one model (``self.model``) whatever the method: the loss, the chunked loss, the kernels, compiled layers, FSDP and
generation see the same modules as in full fine-tuning. The base's weights are frozen (and cast to bf16 under bf16
training: they need no fp32 master copy); the adapters train in fp32. QLoRA (``model.peft.quantize=nf4``,
``conf/peft/qlora.yaml``) holds the frozen linear weights of the decoder layers in 4 bits (bitsandbytes'
``Linear4bit``) under the same adapters. What a run saves is the adapters' state
(``is_adapter_key``); ``peft_config`` gives the ``LoraConfig`` that ``peft.PeftModel`` needs to load
or merge them (``export``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from glm_session.errors import ConfigError, check_choice, check_int, check_number

METHODS = ("none", "lora")
# transformers' GlmForCausalLM module names (peft has no default target list for this model)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
TARGETABLE = (*LORA_TARGETS, "lm_head")
BASE_DTYPES = ("auto", "bf16", "fp32")
QUANTIZE = ("nf4", "fp4")  # bitsandbytes' 4-bit data types (QLoRA's is nf4)
QUANTIZE_ON_ONE_DEVICE = (
    "null with trainer=fsdp: the sharded path does not shard bitsandbytes' 4-bit weights (QLoRA trains on one "
    "device; under trainer=fsdp LoRA trains on a bf16 base)"
)


@dataclass(frozen=True)
class LoraSettings:
    """What ``peft=lora`` trains: rank-``rank`` adapters scaled by ``alpha / rank`` on ``target_modules``."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    base_dtype: str = "auto"
    quantize: str | None = None  # QLoRA: the decoder layers' frozen linear weights in 4 bits (QUANTIZE)
    double_quant: bool = True  # with quantize: the 4-bit blocks' scales quantized too (QLoRA's double quant)

    def describe(self) -> dict[str, Any]:
        """The record of a run (``RunInfo.peft``); a plain LoRA run's has no quantization keys (as before QLoRA, so
        that its older checkpoints still resume)."""
        record = {"method": "lora", **asdict(self), "target_modules": list(self.target_modules)}
        if self.quantize is None:
            del record["quantize"], record["double_quant"]
        return record


def check_peft(peft: Mapping[str, Any] | None) -> LoraSettings | None:
    """The LoRA settings of ``model.peft`` (``None``: full fine-tuning), each value checked."""
    if not peft:
        return None
    method = check_choice("model.peft.method", peft.get("method", "none"), METHODS)
    if method == "none":
        extra = sorted(set(peft) - {"method"})
        if extra:  # e.g. +model.peft.quantize=nf4 on full fine-tuning: it would do nothing
            raise ConfigError(f"model.peft.{extra[0]}", peft[extra[0]], "left out with peft=none (full fine-tuning); "
                                                                        "choose peft=lora or peft=qlora")  # fmt: skip
        return None
    known = {"method", "rank", "alpha", "dropout", "target_modules", "base_dtype", "quantize", "double_quant"}
    unknown = sorted(set(peft) - known)
    if unknown:
        raise ConfigError(f"model.peft.{unknown[0]}", peft[unknown[0]], f"one of the LoRA keys {sorted(known)}")
    rank = check_int("model.peft.rank", peft.get("rank", 16), minimum=1)
    alpha = check_number("model.peft.alpha", peft.get("alpha", 2 * rank), 0, exclusive=True)
    dropout = peft.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError("model.peft.dropout", dropout, "a number in [0, 1)")
    targets = peft.get("target_modules", list(LORA_TARGETS))
    if isinstance(targets, str) or not targets or any(t not in TARGETABLE for t in targets):
        raise ConfigError("model.peft.target_modules", targets, f"a non-empty list of {', '.join(TARGETABLE)}")
    base_dtype = check_choice("model.peft.base_dtype", peft.get("base_dtype", "auto"), BASE_DTYPES)
    quantize = peft.get("quantize")
    if quantize is not None:
        check_choice("model.peft.quantize", quantize, QUANTIZE)
        _check_bitsandbytes(quantize)
    double_quant = peft.get("double_quant", True)
    if not isinstance(double_quant, bool):
        raise ConfigError("model.peft.double_quant", double_quant, "true or false")
    if quantize is None and not double_quant:  # it would change nothing: only 4-bit blocks have scales to quantize
        raise ConfigError("model.peft.double_quant", double_quant, "left at true without model.peft.quantize "
                                                                   "(it applies to QLoRA only: peft=qlora)")  # fmt: skip
    return LoraSettings(
        rank, float(alpha), float(dropout), tuple(dict.fromkeys(targets)), base_dtype, quantize, double_quant
    )


def _check_bitsandbytes(quantize: str) -> None:
    """A ``ConfigError`` unless bitsandbytes (with its 4-bit layers) can be imported."""
    try:
        import bitsandbytes

        bitsandbytes.nn.Linear4bit  # noqa: B018 (a bitsandbytes old enough to lack it is as good as none)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            "model.peft.quantize", quantize, "a quantization that bitsandbytes provides: install it "
            f"(pip install 'glm_session[qlora]'; here: {type(err).__name__}: {err}), or set model.peft.quantize=null"
        ) from None  # fmt: skip


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


def add_lora(
    model: torch.nn.Module, settings: LoraSettings, bf16_base: bool = False, device: torch.device | None = None
) -> torch.nn.Module:
    """Inject LoRA adapters into ``model`` in place: the base frozen (in bf16 if ``bf16_base``; with
    ``settings.quantize``, its decoder layers' linear weights quantized on ``device``), the adapters trainable in
    fp32. Returns ``model``."""
    from peft import inject_adapter_in_model

    if bf16_base:
        model.to(torch.bfloat16)  # before the adapters: they are created, and stay, in fp32
    if settings.quantize:
        quantize_base(model, settings, torch.bfloat16 if bf16_base else torch.float32, device)
    inject_adapter_in_model(peft_config(settings), model)
    for name, parameter in model.named_parameters():
        is_adapter = "lora_" in name
        parameter.requires_grad_(is_adapter)
        if is_adapter and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return model


def quantize_base(
    model: torch.nn.Module, settings: LoraSettings, compute_dtype: torch.dtype, device: torch.device | None = None
) -> None:
    """QLoRA's frozen base: each ``nn.Linear`` of the decoder layers becomes bitsandbytes' ``Linear4bit`` holding
    its weight in 4 bits (``settings.quantize``, blocks of 64 values with one scale each, the scales quantized too
    with ``settings.double_quant``), quantized on ``device`` (default: where the weight is) and multiplied in
    ``compute_dtype``. The embeddings, the norms and the output layer keep their dtype; peft then wraps the 4-bit
    layers in its own LoRA layers for them."""
    _check_bitsandbytes(settings.quantize)  # a QLoRA checkpoint read where bitsandbytes is missing
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for name, linear in list(layer.named_modules()):
            if type(linear) is not torch.nn.Linear:
                continue
            quantized = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
                compress_statistics=settings.double_quant, quant_type=settings.quantize, device="meta",
            )  # fmt: skip
            quantized.weight = bnb.nn.Params4bit(
                linear.weight.data, requires_grad=False, compress_statistics=settings.double_quant,
                quant_type=settings.quantize,
            )  # fmt: skip
            if linear.bias is not None:
                quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            # bitsandbytes repacks a 4-bit weight for AVX-512 in a CPU eval-mode forward and requantizes it after:
            # the base would change with each validation on a CPU (the 8-bit scales move by one step)
            quantized.support_avx512bf16_for_cpu = False
            layer.set_submodule(name, quantized.to(device or linear.weight.device))  # .to quantizes
    model.is_loaded_in_4bit = True  # as transformers marks a 4-bit model: peft then wraps its 4-bit LoRA layers


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key (the module's or peft's) belongs to an adapter."""
    return ".lora_" in key


def settings_of(record: Any) -> LoraSettings:
    """The ``LoraSettings`` of a run record's ``peft`` entry (``LoraSettings.describe``), each value checked as
    ``model.peft`` is (bitsandbytes not required: a merged QLoRA model needs none); ``ValueError`` saying what is
    wrong with an entry that is not one."""
    if not isinstance(record, Mapping) or record.get("method") != "lora":
        raise ValueError(f"its run record's peft entry ({record!r}) is not LoRA settings")
    quantize = record.get("quantize")
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"its run record's peft entry cannot be read (quantize={quantize!r}: not one of {QUANTIZE})")
    try:
        settings = check_peft({**record, "quantize": None})
    except ConfigError as err:
        raise ValueError(f"its run record's peft entry cannot be read ({err})") from None
    return replace(settings, quantize=quantize)


def with_adapters(base: torch.nn.Module, settings: LoraSettings, adapters: Mapping[str, torch.Tensor]):
    """peft's ``LoraModel`` of ``base`` (adapters injected in place) holding ``adapters`` (the module's names, as a
    run's checkpoint keeps them: ``model.layers.0.self_attn.q_proj.lora_A.default.weight``); ``ValueError`` naming
    the first adapter tensor that is missing or unknown."""
    from peft import LoraModel

    lora = LoraModel(base, peft_config(settings), "default")
    result = base.load_state_dict(dict(adapters), strict=False)
    missing = [k for k in result.missing_keys if is_adapter_key(k)]
    if missing or result.unexpected_keys:
        first = (missing or result.unexpected_keys)[0]
        raise ValueError(
            f"the adapters do not fit the base: {len(missing)} missing, {len(result.unexpected_keys)} unknown "
            f"(e.g. {first})"
        )
    return lora


def merged(base: torch.nn.Module, settings: LoraSettings, adapters: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """``base`` with ``adapters`` merged into its weights (W + B A alpha / r): a plain transformers model again."""
    return with_adapters(base, settings, adapters).merge_and_unload()


def peft_names(adapters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module's adapter names as ``PeftModel.save_pretrained`` writes them: ``base_model.model.`` in front, the
    adapter's name left out (``...q_proj.lora_A.default.weight`` -> ``base_model.model....q_proj.lora_A.weight``)."""
    return {f"base_model.model.{k.replace('.default.', '.')}": v for k, v in adapters.items() if is_adapter_key(k)}


def module_names(adapters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``peft_names``: an adapter folder's tensors under the module's names."""
    renamed = {}
    for key, value in adapters.items():
        key = key.removeprefix("base_model.model.")
        module, _, leaf = key.rpartition(".")
        renamed[f"{module}.default.{leaf}"] = value
    return renamed


def load_adapter_folder(
    model: torch.nn.Module, folder: str, settings: LoraSettings, base_fingerprint: str | None = None
) -> None:
    """Load an adapter folder (``export --adapter``, or any peft LoRA folder of this model) into the adapters
    ``add_lora`` injected with ``settings``; a ``ConfigError`` naming the folder when its file is damaged, its
    tensors do not fit or are not finite, its ``lora_alpha`` (``adapter_config.json``) is not ``settings.alpha``
    (the adapters would act at another scale than they were trained at), or its record (``glm_session.json``, an
    export's) names another base than ``base_fingerprint``."""
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise ConfigError(
            "model.init_adapter", folder, "a folder with adapter_model.safetensors (export --adapter)"
        )
    config, record = (_read_json(Path(folder) / name) for name in ("adapter_config.json", "glm_session.json"))
    alpha = config.get("lora_alpha")
    if alpha is not None and alpha != settings.alpha:
        raise ConfigError(
            "model.peft.alpha", settings.alpha, f"{alpha}, the lora_alpha of model.init_adapter={folder} (its "
            "adapters were trained at that scale)"
        )  # fmt: skip
    trained_on = record.get("base_fingerprint")
    if trained_on and not base_fingerprint:  # they were loaded onto random weights, with a general warning only
        raise ConfigError(
            "model.init_from", None, f"the base the adapters of model.init_adapter={folder} were trained on: "
            f"{record.get('init_from')} (fingerprint {trained_on[:12]})"
        )  # fmt: skip
    if trained_on and base_fingerprint and trained_on != base_fingerprint:
        raise ConfigError(
            "model.init_adapter", folder, f"adapters of the base model.init_from names: they were trained on "
            f"{record.get('init_from')} (fingerprint {trained_on[:12]}), this run's base is {base_fingerprint[:12]}"
        )  # fmt: skip
    try:
        state = module_names(load_file(path))
    except Exception as err:  # safetensors raises its own kinds for a damaged file
        raise ConfigError(
            "model.init_adapter", folder, f"a readable adapter folder ({path.name}: {type(err).__name__}: {err})"
        ) from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConfigError("model.init_adapter", folder, f"finite adapters ({len(bad)} tensors hold nan or inf, e.g. "
                                                        f"{bad[0]})")  # fmt: skip
    own = model.state_dict()
    wrong = [k for k in state if k not in own or own[k].shape != state[k].shape]
    missing = [k for k in own if is_adapter_key(k) and k not in state]
    if wrong or missing:
        first = wrong[0] if wrong else missing[0]
        raise ConfigError(
            "model.init_adapter", folder, f"adapters of this model and model.peft ({len(wrong)} unknown or of another "
            f"shape, {len(missing)} missing, e.g. {first})"
        )  # fmt: skip
    model.load_state_dict(state, strict=False)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file of an adapter folder, or ``{}`` where it is missing; ``ConfigError`` where unreadable."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError("model.init_adapter", str(path.parent), f"a folder whose {path.name} is JSON ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError("model.init_adapter", str(path.parent), f"a folder whose {path.name} is a JSON object")
    return value
