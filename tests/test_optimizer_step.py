"""The optimizer step's own scaling: with fused AdamW, the step's 1/D (``on_before_optimizer_step``) and the clip
coefficient (``configure_gradient_clipping``) go into the optimizer's ``grad_scale``, which divides each gradient as
the fused kernel reads it, instead of two multiplications and a second norm over every gradient (issue 23, item 2).
The run trains as the explicit path (AdamW's for-each implementation, which multiplies and clips the gradients)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from glm_session.config import compose_config
from glm_session.train import train

RUN = ["model=chatglm2-tiny", "data.limit=24", "data.max_seq_len=256", "data.batch_tokens=512", "data.packing=true",
       "trainer.max_steps=4", "trainer.accumulate_grad_batches=2", "trainer.limit_val_batches=0",
       "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "trainer.precision=32-true",
       "optimizer.lr=0.5", "optimizer.eps=10.0", "callbacks.last_checkpoint.every_n_train_steps=50"]  # fmt: skip


class ScaledNorms(L.Callback):
    """The norm each step's gradients have after 1/D, before clipping (the fused path's record of it)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if pl_module._scaled_by_optimizer is not None and not trainer.fit_loop._should_accumulate():
            self.norms.append(float(pl_module._scaled_by_optimizer[1]))


def update(tmp_path, cache_dir, name: str, *extra: str, callbacks=()) -> dict[str, torch.Tensor]:
    """What the run's steps changed in each weight (both runs start from the seed's same weights)."""
    cfg = compose_config("train", [*RUN, f"output_dir={tmp_path / name}", f"data.cache_dir={cache_dir}", *extra])
    start = {}

    class Start(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            start.update({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})

    _, objects = train(cfg, extra_callbacks=[Start(), *callbacks])
    return {k: v.detach() - start[k] for k, v in objects["module"].model.state_dict().items()}


@pytest.mark.parametrize("clip", [0.05, None])
def test_fused_adamw_scales_and_clips_as_the_explicit_path(tmp_path, cache_dir, clip):
    """AdamW's eps of 10 makes its update follow the gradient's scale (m / (sqrt(v) + eps), with |g| << eps), so
    a wrong 1/D or clip coefficient shows; with eps 1e-8 Adam would not see either. A rate of 0.5 makes every
    weight's update visible in fp32 (the norms' weights of 1.0 too)."""
    clipping = [f"trainer.gradient_clip_val={clip}" if clip else "trainer.gradient_clip_val=null"]
    norms = ScaledNorms()
    fused = update(tmp_path, cache_dir, "fused", "optimizer.fused=true", *clipping, callbacks=[norms])
    explicit = update(tmp_path, cache_dir, "explicit", "optimizer.fused=false", "+optimizer.foreach=true", *clipping)
    assert len(norms.norms) == 4  # the fused path scaled every step itself
    if clip:
        assert min(norms.norms) > 2 * clip  # clipping changed every step
    assert all(float(delta.abs().max()) > 0 for delta in explicit.values())  # every weight moved
    worst = max(float((fused[k] - explicit[k]).abs().max() / explicit[k].abs().max()) for k in fused)
    assert worst < 1e-4, worst

