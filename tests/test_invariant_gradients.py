"""DESIGN Invariant 2: the same sessions in one optimizer step (2 gradient-accumulation micro-batches, the real
Lightning loop) give the same gradient for split+token and session+token, and for split+sample and session+turn,
under every supervision policy.

The optimizer is SGD with lr 1 and nothing else, so a parameter's change in that one step is minus its gradient.
"""

import dataclasses
import functools

import lightning as L
import pytest
import torch

from glm_session.config import RESOURCES_DIR
from glm_session.data import DialogueDataModule
from glm_session.model import ChatGLM2Module
from glm_session.supervision import ALL_ANSWERS, FromTurn, LastAnswer, RisingWeights, Supervision, TurnWeights

VALIDATION = str(RESOURCES_DIR / "kdconv/validation.jsonl")
SESSIONS = 4


def one_step_gradient(
    tokenizer,
    cache_dir,
    strategy: str,
    reduction: str,
    packing: bool = False,
    loss_chunk_tokens: int | None = None,
    supervision: Supervision = ALL_ANSWERS,
    sessions: int = SESSIONS,
) -> torch.Tensor:
    """The parameters' change in one SGD step (lr 1) of a fresh chatglm2-tiny (seed 0) over every sample of the
    first ``sessions`` validation sessions, in two micro-batches: the gradient that reached the optimizer."""
    datamodule = DialogueDataModule(
        tokenizer, "chatglm2", strategy, supervision, train_path=VALIDATION, limit=sessions, max_seq_len=2048,
        packing=packing, batch_size=1, cache_dir=cache_dir,
    )  # fmt: skip
    rows = len(datamodule.pipeline.prepared("train").rows.samples)
    datamodule.pipeline.batching = dataclasses.replace(datamodule.pipeline.batching, batch_size=-(-rows // 2))
    # two micro-batches hold every sample of the sessions
    module = ChatGLM2Module.from_preset(
        "chatglm2-tiny",
        len(tokenizer),
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
        reduction=reduction,
        loss_chunk_tokens=loss_chunk_tokens,
    )
    torch.manual_seed(0)
    module.configure_model()
    before = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=1, accumulate_grad_batches=2,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2
    after = torch.cat([p.detach().flatten() for p in module.parameters()])
    return before - after  # the gradient


@pytest.fixture(scope="module")
def gradients(tokenizer, cache_dir):
    runs = [
        ("split", "token"),
        ("session", "token"),
        ("split", "sample"),
        ("session", "turn"),
        ("session", "sample"),
    ]
    results = {run: one_step_gradient(tokenizer, cache_dir, *run) for run in runs}
    results["session", "token", "packed"] = one_step_gradient(
        tokenizer, cache_dir, "session", "token", packing=True
    )
    results["split", "sample", "packed"] = one_step_gradient(tokenizer, cache_dir, "split", "sample", packing=True)
    # The chunked loss (logits at the trained positions only, 100 at a time, made again in the backward pass).
    for strategy, reduction in (("session", "token"), ("split", "sample")):
        results[strategy, reduction, "chunked"] = one_step_gradient(
            tokenizer, cache_dir, strategy, reduction, packing=True, loss_chunk_tokens=100
        )
    return results


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_split_token_equals_session_token(gradients):
    reference = gradients["split", "token"]
    assert reference.abs().max().item() > 1e-3  # a real gradient
    assert max_difference(gradients["session", "token"], reference) < 1e-5
    assert max_difference(gradients["session", "token", "packed"], reference) < 1e-5


def test_split_sample_equals_session_turn(gradients):
    reference = gradients["split", "sample"]
    assert max_difference(gradients["session", "turn"], reference) < 1e-5
    assert max_difference(gradients["split", "sample", "packed"], reference) < 1e-5


def test_the_chunked_loss_gives_the_same_gradient(gradients):
    assert max_difference(gradients["session", "token", "chunked"], gradients["split", "token"]) < 1e-5
    assert max_difference(gradients["split", "sample", "chunked"], gradients["split", "sample"]) < 1e-5


def test_reductions_do_differ(gradients):
    """The weighting is a property of the reduction: other pairs give other gradients."""
    assert max_difference(gradients["split", "token"], gradients["split", "sample"]) > 1e-4
    assert max_difference(gradients["session", "sample"], gradients["session", "turn"]) > 1e-4


POLICIES = [LastAnswer(), FromTurn(3), TurnWeights((0.5, 2.0, 0.0), rest=1.5), RisingWeights()]


@pytest.mark.parametrize("supervision", POLICIES, ids=lambda p: p.describe())
def test_invariant_2_holds_under_every_policy(tokenizer, cache_dir, supervision):
    """Matched reductions give one gradient whatever the strategy (packed rows for session), and the policy changes
    it (the gradient is not the plain one)."""
    run = functools.partial(one_step_gradient, tokenizer, cache_dir, supervision=supervision)
    split_token, split_sample = run("split", "token"), run("split", "sample")
    assert split_token.abs().max().item() > 1e-3
    assert max_difference(run("session", "token", packing=True), split_token) < 1e-5
    assert max_difference(run("session", "turn", packing=True), split_sample) < 1e-5
    assert max_difference(run("session", "token"), split_token) < 1e-5
    plain = one_step_gradient(tokenizer, cache_dir, "split", "token")
    assert max_difference(split_token, plain) > 1e-4
