"""Loss reductions against hand-computed values, and global normalisation over micro-batches."""

import math

import pytest
import torch

from glm_session.model.loss import chunked_token_losses, loss_terms, reduce_loss, token_losses

X = -100


def logits_for(targets: list[int], strengths: list[float], vocab: int = 3) -> torch.Tensor:
    """Logits whose position t puts ``strengths[t]`` on the token ``targets[t + 1]`` (0 elsewhere)."""
    logits = torch.zeros(len(targets), vocab)
    for t, (target, a) in enumerate(zip(targets[1:], strengths, strict=False)):
        if target != X:
            logits[t, target] = a
    return logits


def ce(a: float, vocab: int = 3) -> float:
    """-log softmax of a logit a against vocab - 1 zeros."""
    return math.log(math.exp(a) + vocab - 1) - a


# Row 0: sample 7 holds turn 1 (2 supervised tokens, strengths 1 and 2) and turn 2 (1 token, strength 3).
# Row 1: sample 8 holds turn 1 (1 token, strength 4).
LABELS = torch.tensor([[X, 1, 2, X, 0], [X, X, 2, X, X]])
TURNS = torch.tensor([[0, 1, 1, 2, 2], [0, 1, 1, 1, 1]])
SAMPLES = torch.tensor([[7, 7, 7, 7, 7], [8, 8, 8, 8, 8]])
STRENGTHS = [[1.0, 2.0, 0.0, 3.0], [0.0, 4.0, 0.0, 0.0]]
L1, L2, L3, L4 = ce(1.0), ce(2.0), ce(3.0), ce(4.0)


def toy_logits() -> torch.Tensor:
    return torch.stack([logits_for(LABELS[b].tolist(), STRENGTHS[b]) for b in range(2)])  # (2, 5, 3)


@pytest.mark.parametrize(
    "reduction,expected",
    [
        ("token", (L1 + L2 + L3 + L4) / 4),
        ("sample", ((L1 + L2 + L3) / 3 + L4) / 2),
        ("turn", ((L1 + L2) / 2 + L3 + L4) / 3),
        ("sum", L1 + L2 + L3 + L4),
    ],
)
def test_reduction_by_hand(reduction, expected):
    terms = loss_terms(toy_logits(), LABELS, TURNS, SAMPLES, reduction)
    assert terms.counts.tolist() == [4, 2, 3]
    assert reduce_loss([terms], reduction).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("reduction", ["token", "sample", "turn", "sum"])
def test_global_count_over_micro_batches(reduction):
    """Two micro-batches give the loss of their union, not the mean of their means."""
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 11)
    labels = torch.randint(0, 11, (4, 9))
    labels[:, :3] = X
    labels[0, 5:] = X  # rows of different lengths
    turns = torch.tensor([[0, 1, 1, 1, 1, 2, 2, 2, 2]] * 4)
    samples = torch.arange(4).unsqueeze(1).expand(4, 9)
    whole = reduce_loss([loss_terms(logits, labels, turns, samples, reduction)], reduction)
    parts = [
        loss_terms(logits[a:b], labels[a:b], turns[a:b], samples[a:b], reduction) for a, b in ((0, 1), (1, 4))
    ]
    assert reduce_loss(parts, reduction).item() == pytest.approx(whole.item(), rel=1e-6)
    if reduction != "sum":
        mean_of_means = sum(reduce_loss([p], reduction) for p in parts) / 2
        assert mean_of_means.item() != pytest.approx(whole.item(), rel=1e-4)


def test_unknown_reduction():
    with pytest.raises(ValueError, match="unknown loss reduction 'mean'"):
        loss_terms(toy_logits(), LABELS, TURNS, SAMPLES, "mean")


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_losses_equal_the_logits_losses(chunk):
    """Logits only at the trained positions, a few at a time, made again in the backward pass: the same losses and
    the same gradients as the (B, T, V) logits."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 5, requires_grad=True)
    weight = torch.randn(11, 5, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :2] = X
    labels[1, 4:] = X
    reference = token_losses(hidden @ weight.T, labels)
    chunked = chunked_token_losses(hidden, lambda rows: rows @ weight.T, labels, chunk)
    assert torch.allclose(chunked, reference, atol=1e-6) and (chunked[labels[:, 1:] == X] == 0).all()
    probe = torch.randn(3, 6)
    expected = torch.autograd.grad((reference * probe).sum(), (hidden, weight))
    got = torch.autograd.grad((chunked * probe).sum(), (hidden, weight))
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_fused_adamw_with_bf16_and_clipping_trains(tmp_path, cache_dir):
    """Lightning refuses to clip gradients for a fused optimizer under its mixed-precision plugin (a GPU run of the
    benchmark failed on it); the module clips by norm itself when there is no gradient scaler."""
    from glm_session.config import compose_config
    from glm_session.train import train

    cfg = compose_config("train", ["model=chatglm2-tiny", "data.limit=6", "trainer.max_steps=2",
                                   "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=0",
                                   "trainer.accelerator=cpu", "trainer.precision=bf16-mixed", "+optimizer.fused=true",
                                   "trainer.gradient_clip_val=0.5", "trainer.enable_progress_bar=false", "~callbacks",
                                   "trainer.enable_checkpointing=false", f"data.cache_dir={cache_dir}",
                                   f"output_dir={tmp_path}"])  # fmt: skip
    metrics, _ = train(cfg)
    assert metrics["global_steps"] == 2
