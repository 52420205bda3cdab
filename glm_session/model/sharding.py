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


def shard_model(
    model: GlmForCausalLM,
    mesh: DeviceMesh,
    device: torch.device,
    param_dtype: torch.dtype = torch.bfloat16,
    activation_checkpointing: bool = True,
) -> GlmForCausalLM:
    """Shard a model created on the meta device, then materialise and initialise it shard by shard.

    Each decoder layer is its own FSDP unit (its parameters are gathered only while it computes); the embedding,
    final norm and output layer form the root unit. Parameters are kept in fp32 and computed in ``param_dtype``;
    gradients are reduced in fp32.
    """
    if activation_checkpointing:  # recompute each decoder layer in the backward pass
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:  # a 2-D mesh (replicate, shard) gives HSDP
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)
    with torch.no_grad():
        model.apply(model._init_weights)  # transformers' own init (normal linears, unit norms, rotary tables)
    return model


def load_full_weights(model: GlmForCausalLM, init_from: str) -> None:
    """Load ``model.init_from`` weights (a Hugging Face folder, a run's checkpoint file, ``hf://<id>``) into a
    sharded model: rank 0 reads, every rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from glm_session.checkpoints import initial_state

    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    state = initial_state(init_from) if rank0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state, options=options)
