"""The fast paths of the training step give the reference path's loss and gradients (GPU; skipped without one).

Reference: SDPA with the block-diagonal mask transformers builds from the position ids, the (B, T, V) logits and
fp32 cross-entropy, transformers' RMSNorm and SwiGLU. Each fast path changes one thing or all of them: flex
attention with a document block mask, the chunked loss over the trained positions, liger-kernel's RMSNorm and SwiGLU,
per-layer ``torch.compile``, the whole decoder as one compiled graph (replayed as CUDA graphs too). The batch is two
packed rows of several samples each (and padding), as training sees.

- fp32 (no autocast): the per-token losses and every parameter's gradient agree to 1e-3 (relative; the kernels sum
  in other orders, a wrong mask or weight is off by orders of magnitude more).
- bf16 autocast (the training precision): each path's error against the fp32 reference is at most twice the
  reference path's own bf16 error, plus a small floor ("within bf16 tolerance").
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os

import pytest
import torch

from glm_session.data.collator import Collator
from glm_session.model import ChatGLM2Module
from glm_session.model.loss import reduce
from glm_session.model.presets import chatglm2_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LIGER = importlib.util.find_spec("liger_kernel") is not None
VOCAB = 6144

PATHS = {
    "flex": {"attn_implementation": "flex_attention"},
    "chunked": {"loss_chunk_tokens": 96},
    "liger": {"kernels": "liger"},
    "compiled": {"compile_layers": True},
    "all": {"attn_implementation": "flex_attention", "loss_chunk_tokens": 96, "kernels": "liger"},
    "all+compiled": {
        "attn_implementation": "flex_attention",
        "loss_chunk_tokens": 96,
        "kernels": "liger",
        "compile_layers": True,
    },  # fmt: skip
    # the whole decoder as one graph (model.compile_scope=model), and replayed as CUDA graphs
    "whole_graph": {"attn_implementation": "flex_attention", "loss_chunk_tokens": 96, "compile_layers": True,
                    "compile_scope": "model", "compile_dynamic": False},  # fmt: skip
    "whole_graph+cudagraphs": {"attn_implementation": "flex_attention", "loss_chunk_tokens": 96,
                               "compile_layers": True, "compile_scope": "model", "compile_dynamic": False,
                               "compile_mode": "reduce-overhead"},  # fmt: skip
}


def packed_batch() -> dict:
    """Two rows of 256 tokens: samples of 100, 90 and 66 tokens, then 120 and 100 tokens and 36 of padding; the
    second half of every sample is trained."""
    generator = torch.Generator().manual_seed(0)
    rows, sample = [], 0
    for lengths in ((100, 90, 66), (120, 100)):
        row = {k: [] for k in ("input_ids", "labels", "turn_ids", "session_index", "sample_index", "position_ids",
                               "turn_weights")}  # fmt: skip
        for n in lengths:
            ids = torch.randint(3, VOCAB, (n,), generator=generator).tolist()
            row["input_ids"] += ids
            row["labels"] += [-100] * (n // 2) + ids[n // 2 :]
            row["turn_weights"].append([0.0, 1.0])
            row["turn_ids"] += [1] * n
            row["session_index"] += [sample] * n
            row["sample_index"] += [sample] * n
            row["position_ids"] += list(range(n))
            sample += 1
        row["sample_lengths"] = list(lengths)
        rows.append(row)
    return Collator(pad_id=0, width=256)(rows)


def module_for(state: dict | None, **options) -> ChatGLM2Module:
    config = chatglm2_config("chatglm2-small", vocab_size=VOCAB)
    module = ChatGLM2Module(config, optimizer=functools.partial(torch.optim.AdamW), **options)
    torch.manual_seed(0)
    module.configure_model()
    if state is not None:
        module.model.load_state_dict(state)
    return module.cuda()


def losses_and_grads(module: ChatGLM2Module, batch: dict, bf16: bool) -> tuple[torch.Tensor, dict]:
    """The per-token losses and every gradient of one step; CUDA graphs are recorded at the first steps and replayed
    at the third, which is the one returned."""
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    for _ in range(3 if module.compile_mode == "reduce-overhead" else 1):
        torch.compiler.cudagraph_mark_step_begin()
        module.model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            losses = module.token_losses(batch)
        terms = reduce(losses, batch["labels"], batch["turn_ids"], batch["sample_index"], "token")
        terms.numerator.backward()
    grads = {name: p.grad.float().clone() for name, p in module.model.named_parameters()}
    return losses.detach().float(), grads


def error(losses, grads, ref_losses, ref_grads) -> tuple[float, float]:
    """Relative error of the per-token losses and the largest relative error of a parameter's gradient."""
    loss_error = float((losses - ref_losses).norm() / ref_losses.norm())
    grad_error = max(float((grads[n] - g).norm() / g.norm().clamp(min=1e-12)) for n, g in ref_grads.items())
    return loss_error, grad_error


@pytest.fixture(scope="module")
def reference():
    batch = packed_batch()
    module = module_for(None)
    state = {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}
    fp32 = losses_and_grads(module, batch, bf16=False)
    bf16 = losses_and_grads(module_for(state), batch, bf16=True)
    return batch, state, fp32, bf16


@pytest.mark.parametrize("path", list(PATHS))
def test_fast_path_matches_the_reference(reference, path):
    options = PATHS[path]
    if options.get("kernels") == "liger" and not LIGER:
        pytest.skip("liger-kernel is not installed")
    batch, state, fp32, bf16 = reference
    trained = batch["labels"][:, 1:] != -100
    assert int(trained.sum()) == 50 + 45 + 33 + 60 + 50  # the second halves
    exact = error(*losses_and_grads(module_for(state, **options), batch, bf16=False), *fp32)
    reference_error = error(*bf16, *fp32)
    fast_error = error(*losses_and_grads(module_for(state, **options), batch, bf16=True), *fp32)
    if os.environ.get("GLM_SESSION_KERNEL_REPORT"):  # the measured errors, for experiments/bench's results
        with open(os.environ["GLM_SESSION_KERNEL_REPORT"], "a") as report:
            values = {"fp32": exact, "bf16": fast_error, "bf16_reference_path": reference_error}
            report.write(json.dumps({"path": path, **values}) + "\n")
    assert exact[0] < 1e-3 and exact[1] < 1e-3, (
        f"{path} in fp32: loss error {exact[0]:.2e}, gradient {exact[1]:.2e}"
    )
    for what, fast, ref in zip(("loss", "gradient"), fast_error, reference_error, strict=True):
        assert fast <= 2 * ref + 1e-3, f"{path} in bf16: {what} error {fast:.2e}, the reference path's {ref:.2e}"
