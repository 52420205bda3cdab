"""Training FLOPs of a batch and model FLOPs utilisation (MFU).

A training step of a decoder costs ``6 × parameters`` FLOPs per real token (forward 2, backward 4) plus attention:
per layer and per (query, key) pair, ``QKᵀ`` and ``AV`` take ``4 × d`` FLOPs forward and twice that backward, with
``d`` = heads × head_dim; causal attention over a segment of ``n`` tokens has about ``n² / 2`` pairs, so a segment
costs ``6 × layers × d × n²``. Packed samples attend only within themselves: the sum runs over samples, not rows.
Padding, and recomputation for activation checkpointing, are not useful work and are not counted. A frozen weight
(a LoRA run's base) needs no weight gradient: ``4 ×`` its parameters per token (forward 2, input gradient 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GlmConfig

# Dense bf16 peak of one H100 SXM (NVIDIA's datasheet; the H200 has the same compute): the MFU denominator.
H100_BF16_PEAK_FLOPS = 989e12


def segment_lengths(sample_index: torch.Tensor) -> torch.Tensor:
    """Lengths of the samples in a batch (``sample_index`` (B, T): a sample's index per token, -1 for padding)."""
    lengths = []
    for row in sample_index:
        values, counts = torch.unique_consecutive(row, return_counts=True)
        lengths.append(counts[values >= 0])
    return torch.cat(lengths) if lengths else torch.zeros(0, dtype=torch.long)


def training_flops(
    config: GlmConfig, parameters: int, sample_lengths: Sequence[int], frozen_parameters: int = 0
) -> float:
    """FLOPs of one forward and backward pass over a batch whose samples have ``sample_lengths`` tokens (module
    docstring); ``frozen_parameters`` of the ``parameters`` get no weight gradient."""
    width = config.num_attention_heads * config.head_dim
    attention = 6.0 * config.num_hidden_layers * width * float(sum(n * n for n in sample_lengths))
    tokens = float(sum(sample_lengths))
    return (6.0 * (parameters - frozen_parameters) + 4.0 * frozen_parameters) * tokens + attention
