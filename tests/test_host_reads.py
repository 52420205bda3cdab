"""The training step reads nothing on the host between logging intervals (issue 23, item 1): no host
synchronisation for the GPU to idle through and for CUDA graphs to be cut at.

On a CPU, ``helpers.HostReads`` counts every call that would read a device tensor's value on the host, from one
batch's start to the next. With a fused optimizer the non-finite guard skips on the device; the one read left on the
SDPA path is transformers' packed-row check, which flex attention's mask from the device replaces
(``test_packed_mask.py``), so here it is swapped for its traced form (the same sample ids, no check). On a GPU,
torch's sync debug mode makes any synchronisation inside the step an error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers.masking_utils

from glm_session.config import compose_config
from glm_session.model.packed_mask import sample_ids
from glm_session.train import train

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from helpers import HostReads  # noqa: E402

STEPS = ["model=chatglm2-tiny", "data.limit=48", "data.max_seq_len=256", "data.batch_tokens=512", "data.packing=true",
         "trainer.max_steps=6", "trainer.log_every_n_steps=3", "trainer.limit_val_batches=0",
         "callbacks.last_checkpoint.every_n_train_steps=50", "optimizer.fused=true"]  # fmt: skip


def test_only_the_logging_steps_read_on_the_host(tmp_path, cache_dir, monkeypatch):
    checks = []

    def without_the_host_check(position_ids: torch.Tensor) -> torch.Tensor:
        checks.append(position_ids.shape)
        return sample_ids(position_ids)  # what transformers returns under tracing: the ids, never None

    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", without_the_host_check)
    reads = HostReads()
    cfg = compose_config("train", [*STEPS, "trainer.accelerator=cpu", "trainer.precision=32-true",
                                   "model.loss_chunk_tokens=64", "trainer.enable_progress_bar=true",
                                   "data.num_workers=0", f"output_dir={tmp_path}", f"data.cache_dir={cache_dir}"])  # fmt: skip
    train(cfg, extra_callbacks=[reads])

    assert len(checks) == 6  # each forward went through transformers' mask code
    assert sorted(reads.reads) == [1, 2, 3, 4, 5, 6]  # one epoch holds them all: no epoch end between
    assert {step: dict(r) for step, r in reads.reads.items() if step % 3} == {1: {}, 2: {}, 4: {}, 5: {}}
    # The logging step reads, once: the logged values and the non-finite flag (the counter sees reads where they are).
    logged = {(kind, where.split(":")[0], where.split(" ")[-1]): n for (kind, where), n in reads.reads[3].items()}
    assert logged == {
        ("cpu", "glm_session/model/module.py", "on_before_optimizer_step"): 1,
        ("tolist", "glm_session/model/module.py", "check_finite_steps"): 1,
    }


class SyncsAreErrors(L.Callback):
    """torch's sync debug mode at ``error`` from a batch's start to its end, at the steps after ``warmup`` that are
    not logging steps (compilation and the first shapes may wait for the device)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.checked = warmup, []

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        step = trainer.global_step + 1
        if step > self.warmup and step % trainer.log_every_n_steps:
            self.checked.append(step)
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, *args) -> None:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_fast_path_step_does_not_synchronise_on_a_gpu(tmp_path, cache_dir):
    check = SyncsAreErrors(warmup=3)
    cfg = compose_config("train", [*STEPS, "speed=fast", "model.kernels=torch", "trainer.accelerator=gpu",
                                   "trainer.precision=bf16-mixed", "trainer.max_steps=12", "trainer.log_every_n_steps=4",
                                   f"output_dir={tmp_path}", f"data.cache_dir={cache_dir}"])  # fmt: skip
    try:
        train(cfg, extra_callbacks=[check])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert check.checked == [5, 6, 7, 9, 10, 11]
