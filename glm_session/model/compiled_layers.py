"""``torch.compile`` of each decoder layer (``model.compile_layers``), and how its sizes are treated
(``model.compile_dynamic``).

torch's default (``None``) compiles a layer for the first batch shape it meets, with static sizes, and compiles it
again, dynamic in whatever size changed, when a batch of another shape comes; from then on it runs that second
version. A run resumed in a new process starts static again, so until its first batch of another shape it runs other
kernels than the uninterrupted run ran at the same steps, and ends a few bits away from it
(``tests/test_compiled_resume.py``). Two settings make every step run the same kernels whatever came before:

- ``"rows"``: dynamic in the number of rows of a batch from the first call, static in everything else: what torch's
  default runs after its first change of batch size, when only the rows vary (``data.pad_to=max_seq_len``);
- ``True``: every size dynamic from the first call (``torch.compile(dynamic=True)``).

``False`` compiles every shape on its own, statically.

``model.compile_mode`` is ``torch.compile``'s mode for the layers: ``None`` (torch's default), ``"reduce-overhead"``
(each layer's forward and backward replayed as CUDA graphs: a graph per batch shape and layer, for a step bound by
kernel launches, as chatglm2-small's is on an H200: 660 launches in a 40 ms step of which the GPU is busy 13 ms;
with flex attention each layer's graphs take the packed mask from outside, new each step, and ran at 0.28x the
layers compiled without graphs on one H100, 2026-12-06: there, compile the whole decoder instead, ``speed=graphs``),
``"max-autotune-no-cudagraphs"`` / ``"max-autotune"`` (kernels chosen by timing them on the device). On a CPU,
CUDA graphs are skipped (torch says so) and the layers run as with the default mode.

``model.compile_scope`` is what is compiled: ``"layers"`` (each decoder layer on its own, one compilation shared by
all layers of a shape) or ``"model"`` (the whole decoder as one graph, ``fullgraph``: the embedding, the attention
mask transformers builds from the position ids, every layer and the final norm; the output layer and the loss stay
outside, where the chunked loss picks the trained positions). With ``reduce-overhead`` the decoder's forward and its
backward are then each one CUDA graph: the Python of transformers' forward, of its mask functions and of autograd's
per-op bookkeeping runs at capture only (chatglm2-small's step in run 6: 24.6 ms of host Python around 12.8 ms of GPU
work; as one graph replayed, 921,746 tokens/s against 440,487 per layer on one H100: ``speed=graphs``). With flex
attention the packed rows' mask is built inside the graph (``compile_model``), and transformers' host-side check for
packed rows never runs.
Compilation takes longer (all layers, not one), and only one device holds the model (``trainer=fsdp`` gathers each
layer's weights around its forward: layers only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask

from glm_session.errors import ConfigError
from glm_session.model.packed_mask import packed_block_mask


def check_compile_dynamic(value: Any) -> bool | str | None:
    if not (value is None or isinstance(value, bool) or value == "rows"):
        raise ConfigError("model.compile_dynamic", value, "null, true, false or rows")
    return value


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
TIMED_MODES = ("max-autotune-no-cudagraphs", "max-autotune")  # kernels chosen by their timings on the device


def check_compile_mode(value: Any, deterministic: bool = False) -> str | None:
    if not (value is None or value in COMPILE_MODES):
        raise ConfigError("model.compile_mode", value, f"null or one of {', '.join(COMPILE_MODES)}")
    if deterministic and value in TIMED_MODES:
        raise ConfigError(
            "model.compile_mode",
            value,
            "null, default or reduce-overhead with model.compile_deterministic=true: this mode chooses kernels by "
            "timing them, and a timing depends on what else runs on the GPU",
        )
    return value


COMPILE_SCOPES = ("layers", "model")


def check_compile_scope(value: Any) -> str:
    if value not in COMPILE_SCOPES:
        raise ConfigError("model.compile_scope", value, "layers (each decoder layer) or model (the whole forward)")
    return value


def compile_layers(layers: torch.nn.ModuleList, dynamic: bool | str | None, mode: str | None = None) -> None:
    """Compile each decoder layer in place (its parameters and their names stay as they are)."""
    for layer in layers:
        _compile(layer, dynamic, mode)


def compile_model(
    decoder: torch.nn.Module, dynamic: bool | str | None, mode: str | None = None, packed_mask: bool = False
) -> None:
    """Compile the whole decoder's forward in place as one graph (a graph break is an error, not a silent split).

    ``packed_mask``: a call without an attention mask and without a KV cache (a training or validation forward)
    gets flex attention's mask of its packed rows built inside the graph from its position ids (``packed_mask.py``:
    the mask transformers infers from them). Built outside, the mask's tensors are new each step, and CUDA graph
    trees hold the ones flex attention reads at fixed addresses: they recorded the backward graph again at every
    step (chatglm2-small on one H100, 2026-12-06: 27 recordings in 32 steps, "static input data pointer changed")."""
    _compile(decoder, dynamic, mode, fullgraph=True, before=_with_packed_mask if packed_mask else None)


def _compile(
    module: torch.nn.Module,
    dynamic: bool | str | None,
    mode: str | None,
    fullgraph: bool = False,
    before: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """``module.compile(...)``, as ``Module.compile`` does it (``torch.compile`` of ``module._call_impl``), with
    ``before`` applied to the call's keyword arguments inside the compiled function."""
    call = module._call_impl
    if before is not None:
        call = _preceded(call, before)
    if dynamic == "rows":
        # the rows marked dynamic between the module's call and Dynamo, outside the compiled function
        module._compiled_call_impl = _rows_dynamic(torch.compile(call, mode=mode, fullgraph=fullgraph))
    else:
        module._compiled_call_impl = torch.compile(call, dynamic=dynamic, mode=mode, fullgraph=fullgraph)


def _preceded(call: Callable[..., Any], before: Callable[[dict[str, Any]], None]) -> Callable[..., Any]:
    def preceded(*args: Any, **kwargs: Any) -> Any:
        before(kwargs)
        return call(*args, **kwargs)

    return preceded


def _with_packed_mask(kwargs: dict[str, Any]) -> None:
    if kwargs.get("attention_mask") is None and kwargs.get("past_key_values") is None and \
            kwargs.get("use_cache") is False and kwargs.get("position_ids") is not None:  # fmt: skip
        kwargs["attention_mask"] = packed_block_mask(kwargs["position_ids"])


def uncompile(model: torch.nn.Module) -> None:
    """Undo ``compile_layers`` or ``compile_model``: the model runs eagerly again, its parameters untouched. For the
    test evaluation after training: its shapes (prompts of every length, the KV cache's decode steps, the test rows)
    are not training's, and compiling them cost more than running them (experiments/unseen_base, session 10: an
    in-run CPsyCoun evaluation spent 5-35 s on teacher-forced loss, the same evaluation of an uncompiled base
    0.5-0.8 s)."""
    for module in model.modules():
        module._compiled_call_impl = None


def _rows_dynamic(compiled: Any) -> Any:
    """``compiled`` called with the rows dimension of every input marked dynamic (before Dynamo sees them): the rows
    of its first tensor argument (a layer's hidden states, the model's input ids)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        first = next(value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor))
        mark_rows_dynamic((args, kwargs), first.shape[0])
        return compiled(*args, **kwargs)

    return call


def mark_rows_dynamic(value: Any, rows: int) -> None:
    """Mark dimension 0 dynamic on every tensor in ``value`` whose dimension 0 is ``rows``: the hidden states,
    position ids, rotary tables, an sdpa mask, and a flex ``BlockMask``'s block tables and the tensors its mask
    function reads."""
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == rows:
            torch._dynamo.maybe_mark_dynamic(value, 0)
    elif isinstance(value, (tuple, list)):
        for item in value:
            mark_rows_dynamic(item, rows)
    elif isinstance(value, dict):
        for item in value.values():
            mark_rows_dynamic(item, rows)
    elif isinstance(value, BlockMask):
        cells = [cell.cell_contents for cell in value.mask_mod.__closure__ or ()]
        mark_rows_dynamic([*vars(value).values(), *cells], rows)
