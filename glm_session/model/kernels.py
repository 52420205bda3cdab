"""Fused kernels for the model's element-wise work, from liger-kernel (``model.kernels=liger``; GPU only).

transformers' ``GlmRMSNorm`` and ``GlmMLP`` run as several element-wise kernels each (the norm's square, mean,
rsqrt and products; SwiGLU's SiLU and product), every one a pass over the activations. liger-kernel's Triton kernels
do each in one pass and recompute instead of keeping intermediates. The swap keeps the parameters (the same
``Parameter`` objects, the same state-dict names) and the arithmetic: RMSNorm in fp32 with the weight applied in the
input's dtype ("llama" casting, as ``GlmRMSNorm``), SiLU(gate) * up in the activations' dtype.
``tests/test_gpu_kernels.py`` checks loss and gradients against the plain path on a GPU.
"""

from __future__ import annotations

import torch
from transformers.models.glm.modeling_glm import GlmMLP, GlmRMSNorm

KERNELS = ("torch", "liger")


class LigerSwiGLUMLP(GlmMLP):
    """``GlmMLP`` with SiLU(gate) * up in one liger kernel (gate and up are the halves of ``gate_up_proj``)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(LigerSiLUMulFunction.apply(gate, up))


def use_liger_kernels(model: torch.nn.Module) -> None:
    """Swap every ``GlmRMSNorm`` for liger's ``LigerRMSNorm`` (sharing its weight) and every ``GlmMLP`` for
    ``LigerSwiGLUMLP``, in place; works on the meta device too (before sharding)."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GlmRMSNorm):
                with torch.device("meta"):  # its own weight is replaced by the original's
                    norm = LigerRMSNorm(child.weight.numel(), eps=child.variance_epsilon, in_place=False)
                norm.weight = child.weight
                setattr(parent, name, norm)
            elif type(child) is GlmMLP:
                child.__class__ = LigerSwiGLUMLP
