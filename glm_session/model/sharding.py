"""FSDP2 on the model side: shard a model created on the meta device per decoder layer, and load initial weights
into it. The mesh is Lightning's (``data_parallel``, ``tensor_parallel``) = (nodes, GPUs per node); ``fully_shard``
over it shards the parameters across the GPUs of a node and replicates them across nodes (HSDP; plain FSDP on one
node).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import GlmForCausalLM

from glm_session.adapters import is_adapter_key


def shard_model(
    model: GlmForCausalLM,
    mesh: DeviceMesh,
    device: torch.device,
    param_dtype: torch.dtype = torch.bfloat16,
    activation_checkpointing: bool = True,
    checkpoint_every_n_layers: int = 1,
    reshard_after_forward: bool = True,
    prefetch: int = 0,
) -> GlmForCausalLM:
    """Shard a model created on the meta device, then materialise and initialise it shard by shard.

    Each decoder layer is its own FSDP unit; the embedding, final norm and output layer form the root unit.
    Parameters are kept in fp32 and computed in ``param_dtype``; gradients are reduced in fp32.

    Args:
        activation_checkpointing: recompute decoder layers in the backward pass: every ``checkpoint_every_n_layers``-th
            one (1: all of them; 2: layers 0, 2, 4, ...; the others keep their activations).
        reshard_after_forward: free a layer's gathered parameters after its forward (gathered again for its
            backward); ``False`` keeps them from forward to backward, one gather a step, at the memory of the whole
            model's ``param_dtype`` copy.
        prefetch: gather the parameters of the next ``prefetch`` layers ahead of time, in the forward and in the
            backward (0: FSDP2's own implicit prefetch of one layer).
    """
    if activation_checkpointing:
        checkpoint_layers(model, checkpoint_every_n_layers)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = list(model.model.layers)
    for layer in layers:  # a 2-D mesh (replicate, shard) gives HSDP
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if prefetch > 0:
        for index, layer in enumerate(layers):
            layer.set_modules_to_forward_prefetch(layers[index + 1 : index + 1 + prefetch])
            layer.set_modules_to_backward_prefetch(layers[max(0, index - prefetch) : index][::-1])
    model.to_empty(device=device)
    with torch.no_grad():
        model.apply(model._init_weights)  # transformers' own init (normal linears, unit norms, rotary tables)
        reset_adapters(model)
    return model


def checkpoint_layers(model: GlmForCausalLM, every_n_layers: int = 1) -> None:
    """Recompute every ``every_n_layers``-th decoder layer (0, n, 2n, ...) in the backward pass (transformers'
    checkpointing, non-reentrant); the other layers keep their activations."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for index, layer in enumerate(model.model.layers):
        layer.gradient_checkpointing = index % every_n_layers == 0


def load_full_weights(model: GlmForCausalLM, init_from: str) -> None:
    """Load ``model.init_from`` weights (a Hugging Face folder, a run's checkpoint file, ``hf://<id>``) into a
    sharded model: rank 0 reads, every rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from glm_session.checkpoints import initial_state

    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    state = initial_state(init_from) if rank0 else {}
    adapters = [name for name in model.state_dict() if is_adapter_key(name)]
    if adapters:  # LoRA layers hold the base's weight as base_layer.weight; the adapters keep their init
        names = set(model.state_dict())
        state = {_injected(key, names): value for key, value in state.items()}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not adapters)
    set_model_state_dict(model, state, options=options)


def _injected(key: str, names: set[str]) -> str:
    """The name of a base weight once peft wrapped its module (``q_proj.weight`` -> ``q_proj.base_layer.weight``)."""
    if key in names:
        return key
    module, _, leaf = key.rpartition(".")
    return f"{module}.base_layer.{leaf}"


def reset_adapters(model: torch.nn.Module) -> None:
    """Give peft's LoRA layers their own init again (B = 0: the adapted model starts as the base) after
    transformers' ``_init_weights`` drew every linear layer, the adapters' included."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                module.reset_lora_parameters(adapter, init_lora_weights=True)
