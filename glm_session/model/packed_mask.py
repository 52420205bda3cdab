"""The attention mask of packed rows for flex attention, built on the device from the rows' position ids.

A packed row holds several samples, each with its own position ids from 0; a token attends to the earlier tokens of
its own sample only. transformers infers the same mask from the position ids, but first asks on the host whether
any row is packed at all (``find_packed_sequence_indices``: a device-to-host synchronisation every forward). Given
the ``BlockMask`` built here, it uses the mask as it is, and the forward pass waits for nothing.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def sample_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) the index of the sample each token belongs to within its row: a new sample wherever the position ids
    do not go up by one."""
    before_first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=before_first, dim=-1) != 1).cumsum(-1)


def packed_block_mask(position_ids: torch.Tensor) -> BlockMask:
    """Causal attention within each sample of the rows of ``position_ids`` (B, T), as a flex-attention ``BlockMask``
    (built by a compiled kernel on a GPU, as transformers builds its own; eagerly elsewhere; inside the caller's graph
    when the caller is being compiled: ``compiled_layers.compile_model``)."""
    samples = sample_ids(position_ids)

    def causal_within_sample(
        batch: torch.Tensor, head: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        return (q >= kv) & (samples[batch, q] == samples[batch, kv])

    rows, length = position_ids.shape
    return create_block_mask(causal_within_sample, rows, None, length, length, device=position_ids.device,
                             _compile=position_ids.is_cuda and not torch.compiler.is_compiling())  # fmt: skip
