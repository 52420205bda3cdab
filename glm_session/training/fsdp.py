"""FSDP2 through Lightning's ModelParallelStrategy: its settings (bf16 compute, activation checkpointing per decoder
layer) and sharded checkpoints written atomically. The model side shards itself (``model/sharding.py``:
``ChatGLM2Module.configure_model`` calls ``shard_model`` with the strategy's mesh and settings)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from glm_session.adapters import is_adapter_key
from glm_session.atomic_files import fsync_folder
from glm_session.checkpoints import SHARDED_METADATA, CheckpointError
from glm_session.errors import ConfigError
from glm_session.training.checkpoint_io import REPLACED, SAVING, remove_stale_saves


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for FSDP2, whose sharded checkpoints are whole or absent.

    Args:
        param_dtype: the dtype layers compute in (``bfloat16``); parameters and optimizer states stay fp32.
        activation_checkpointing: recompute decoder layers in the backward pass.
        checkpoint_every_n_layers: with it, recompute every n-th layer only (1: all; 2: half of them, the other
            half keeping its activations).
        reshard_after_forward: free a layer's gathered parameters after its forward (``False``: keep them until its
            backward, one gather a step instead of two, at the memory of a ``param_dtype`` copy of the model).
        prefetch: gather the next ``prefetch`` layers' parameters ahead (0: FSDP2's implicit prefetch of one).
        **kwargs: ``ModelParallelStrategy``'s (``save_distributed_checkpoint``, ...).

    Each checkpoint folder is written under a temporary name and renamed into place once every rank has written
    its shard: a kill while saving leaves the previous checkpoint folder, never a folder of mixed shards (in the
    instant between the two renames, the new and the previous folder under temporary names, which
    ``remove_stale_saves`` puts right when the run starts again).
    """

    def __init__(
        self,
        param_dtype: str = "bfloat16",
        activation_checkpointing: bool = True,
        checkpoint_every_n_layers: int = 1,
        reshard_after_forward: bool = True,
        prefetch: int = 0,
        **kwargs: Any,
    ) -> None:
        for key, value, least in (("checkpoint_every_n_layers", checkpoint_every_n_layers, 1),
                                  ("prefetch", prefetch, 0)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"trainer.strategy.{key}", value, f"an integer >= {least}")
        if not isinstance(reshard_after_forward, bool):
            raise ConfigError("trainer.strategy.reshard_after_forward", reshard_after_forward, "true or false")
        super().__init__(**kwargs)
        self.param_dtype = getattr(torch, param_dtype)
        self.activation_checkpointing = activation_checkpointing
        self.checkpoint_every_n_layers = checkpoint_every_n_layers
        self.reshard_after_forward = reshard_after_forward
        self.prefetch = prefetch

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

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's sharded load, for a LoRA run (whose checkpoints hold the adapters only) with the adapters as
        the model's state: Lightning asks the checkpoint for every parameter, the frozen base's too."""
        if getattr(self.lightning_module, "lora", None) is None:
            return super().load_checkpoint(checkpoint_path, weights_only)
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            raise CheckpointError(
                f"{path}: a single-file checkpoint; a LoRA run under trainer=fsdp resumes from its own sharded "
                "checkpoint folder: resume this one on one device (without trainer=fsdp)"
            )
        adapters = {k: v for k, v in get_model_state_dict(self.model).items() if is_adapter_key(k)}
        state = {"state_dict": adapters}
        load(state, checkpoint_id=path)
        set_model_state_dict(self.model, state["state_dict"], options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optimizer_state[key],
                                     options=StateDictOptions(cpu_offload=True))  # fmt: skip
        return torch.load(path / SHARDED_METADATA, weights_only=weights_only)
