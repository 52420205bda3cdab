"""FSDP2 through Lightning's ModelParallelStrategy: parameters sharded per decoder layer, bf16 compute, activation
checkpointing per decoder layer, the model created on the meta device, sharded checkpoints written atomically.

``ChatGLM2Module.configure_model`` calls ``shard_model`` when the strategy gives it a device mesh. The mesh is
Lightning's (``data_parallel``, ``tensor_parallel``) = (nodes, GPUs per node); ``fully_shard`` over it shards the
parameters across the GPUs of a node and replicates them across nodes (HSDP; plain FSDP on one node).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import GlmForCausalLM

from glm_session.training.checkpoint_io import REPLACED, SAVING, fsync_folder, remove_stale_saves


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


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for FSDP2, whose sharded checkpoints are whole or absent.

    Args:
        param_dtype: the dtype layers compute in (``bfloat16``); parameters and optimizer states stay fp32.
        activation_checkpointing: recompute each decoder layer in the backward pass.
        **kwargs: ``ModelParallelStrategy``'s (``save_distributed_checkpoint``, ...).

    Each checkpoint folder is written under a temporary name and renamed into place once every rank has written
    its shard: a kill while saving leaves the previous checkpoint folder, never a folder of mixed shards (in the
    instant between the two renames, the new and the previous folder under temporary names, which
    ``remove_stale_saves`` puts right when the run starts again).
    """

    def __init__(
        self, param_dtype: str = "bfloat16", activation_checkpointing: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.param_dtype = getattr(torch, param_dtype)
        self.activation_checkpointing = activation_checkpointing

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(filepath)
        token = [uuid.uuid4().hex if self.is_global_zero else None]
        if torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(token, src=0)
        temporary = path.parent / f"{SAVING}{token[0]}-{path.name}"
        super().save_checkpoint(checkpoint, temporary, storage_options)
        self.barrier("checkpoint written")
        if self.is_global_zero:
            replaced = path.parent / f"{REPLACED}{token[0]}-{path.name}"
            if path.exists():
                path.rename(replaced)
            temporary.rename(path)
            fsync_folder(path.parent)
            remove_stale_saves(path.parent)
        self.barrier("checkpoint renamed")


def load_full_weights(model: GlmForCausalLM, init_from: str) -> None:
    """Load ``model.init_from`` weights (a Hugging Face folder, a run's checkpoint file, ``hf://<id>``) into a
    sharded model: rank 0 reads, every rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from glm_session.checkpoints import initial_state

    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    state = initial_state(init_from) if rank0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state, options=options)
