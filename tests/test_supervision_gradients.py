"""The gradient of a supervision policy, in absolute terms (issue 19).

The gradient that reaches the optimizer through Lightning (two accumulation micro-batches, the module's own
rescaling before the optimizer step, SGD with lr 1 so that the parameters' change is the gradient) is compared with
autograd of the DESIGN §2 loss written out here, sample by sample, from the policy's own weights: nothing of the
project's loss code, collator or stored weights is used for the reference. Then what a wrong implementation would
change: weights swapped between two turns, all weights doubled, a zero-weight turn still supervised, a weight in a
denominator; and the toy batch's measured weights under policies.
"""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from test_analysis import TOY_TOKENS, toy_batch
from test_analysis import model as model  # noqa: F401  (the chatglm2-tiny fixture)
from test_invariant_gradients import VALIDATION, one_step_gradient
from test_invariant_logits import answer_logits

from glm_session.analysis.measured import measured_weights, turn_directions
from glm_session.analysis.toy import toy_turns
from glm_session.analysis.weights import exact_coefficients
from glm_session.constants import IGNORE_INDEX
from glm_session.data import DialogueDataModule
from glm_session.model import ChatGLM2Module
from glm_session.supervision import ALL_ANSWERS, FromTurn, RisingWeights, Supervision, TurnWeights

SESSIONS = 3  # turns of different sessions merged by mistake would show


def declared_loss_gradient(tokenizer, cache_dir, strategy: str, reduction: str, supervision: Supervision):
    """Autograd of the step loss of DESIGN §2 over every sample of the first 3 validation sessions, each sample
    alone through the same initial model as ``one_step_gradient``'s, the weights w_k taken from the policy."""
    data = DialogueDataModule(tokenizer, "chatglm2", strategy, supervision, train_path=VALIDATION, limit=SESSIONS,
                              cache_dir=cache_dir)  # fmt: skip
    sessions = data.read("train").sessions
    module = ChatGLM2Module.from_preset("chatglm2-tiny", len(tokenizer), optimizer=torch.optim.SGD)
    torch.manual_seed(0)
    module.configure_model()
    turns = []  # (sample, w_k, the token losses of turn k in that sample)
    for i, sample in enumerate(data.pipeline.prepared("train").samples):
        logits = module.model(input_ids=torch.tensor([sample["input_ids"]]), use_cache=False).logits[0]  # (T, V)
        targets = torch.tensor(sample["labels"][1:])  # the label at t + 1 is predicted at t
        losses = F.cross_entropy(logits[:-1], targets, ignore_index=IGNORE_INDEX, reduction="none")
        weights = supervision.session_weights(len(sessions[sample["session_index"]].turns))
        turn_of = torch.tensor(sample["turn_ids"][1:])
        for k in sorted(set(turn_of[targets != IGNORE_INDEX].tolist())):
            if weights[k - 1] > 0:  # weight 0: context only, in no numerator and no count
                turns.append((i, float(weights[k - 1]), losses[(targets != IGNORE_INDEX) & (turn_of == k)]))
    if reduction == "token":  # sum of w_k * loss over supervised tokens / supervised tokens
        loss = sum(w * x.sum() for _, w, x in turns) / sum(len(x) for _, _, x in turns)
    elif reduction == "sum":
        loss = sum(w * x.sum() for _, w, x in turns)
    elif reduction == "turn":  # mean over supervised turns of w_k * the turn's token mean
        loss = sum(w * x.mean() for _, w, x in turns) / len(turns)
    else:  # sample: mean over samples of (weighted loss sum / supervised tokens)
        samples = sorted({i for i, _, _ in turns})
        loss = sum(
            sum(w * x.sum() for j, w, x in turns if j == i) / sum(len(x) for j, _, x in turns if j == i)
            for i in samples
        ) / len(samples)
    grads = torch.autograd.grad(loss, list(module.parameters()))
    return torch.cat([g.flatten() for g in grads])


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


WEIGHTED = TurnWeights((0.5, 2.0, 0.0), rest=1.5)


@pytest.mark.parametrize("supervision", [ALL_ANSWERS, WEIGHTED], ids=lambda p: p.describe())
@pytest.mark.parametrize(
    "strategy,reduction",
    [("session", "token"), ("session", "turn"), ("session", "sample"), ("split", "sample"), ("split", "sum")],
)
def test_the_step_gradient_is_the_declared_loss_gradient(tokenizer, cache_dir, strategy, reduction, supervision):
    """A uniform factor anywhere between the loss and the optimizer (x0.5 at the step, a per-micro-batch mean,
    the accumulation count) fails here: the comparison is absolute."""
    trained = one_step_gradient(
        tokenizer, cache_dir, strategy, reduction, supervision=supervision, sessions=SESSIONS
    )
    declared = declared_loss_gradient(tokenizer, cache_dir, strategy, reduction, supervision)
    assert declared.abs().max().item() > 1e-3
    assert relative_difference(trained, declared) < 1e-5


def lightning(tokenizer, cache_dir, strategy, reduction, supervision):
    return one_step_gradient(tokenizer, cache_dir, strategy, reduction, supervision=supervision, sessions=SESSIONS)


def test_swapping_two_turns_weights_changes_the_gradient(tokenizer, cache_dir):
    """Turns 1 and 2 weighing 1 and 3, or 3 and 1: different gradients, each the declared one."""
    for weights in ((1.0, 3.0), (3.0, 1.0)):
        policy = TurnWeights(weights, rest=1)
        assert relative_difference(
            lightning(tokenizer, cache_dir, "session", "token", policy),
            declared_loss_gradient(tokenizer, cache_dir, "session", "token", policy),
        ) < 1e-5  # fmt: skip
    swapped = [
        lightning(tokenizer, cache_dir, "session", "token", TurnWeights(w, rest=1)) for w in ((1, 3), (3, 1))
    ]
    assert relative_difference(*swapped) > 1e-3


@pytest.mark.parametrize("strategy,reduction", [("session", "token"), ("session", "sample"), ("session", "turn"),
                                                ("split", "sample"), ("session", "sum")])  # fmt: skip
def test_doubling_every_weight_doubles_the_gradient(tokenizer, cache_dir, strategy, reduction):
    """Weights act in the numerator only and every denominator counts supervised units (tokens, samples, turns,
    or none for sum), which doubling changes not: under EVERY reduction the gradient must double. A weight that
    also entered a denominator (a weighted mean) would leave it unchanged."""
    plain = lightning(tokenizer, cache_dir, strategy, reduction, ALL_ANSWERS)
    doubled = lightning(tokenizer, cache_dir, strategy, reduction, TurnWeights((2.0,), rest=2.0))
    assert relative_difference(doubled, 2 * plain) < 1e-5


def test_a_zero_weight_turn_is_context_only(tokenizer, cache_dir):
    """Weight 0 for the opening turn is from_turn m=2, and the declared loss counts neither its tokens nor its turn
    (a turn still labelled but weighted 0 would enter the token and turn denominators); it is not the plain
    gradient."""
    for reduction in ("token", "turn"):
        zero_first = lightning(tokenizer, cache_dir, "session", reduction, TurnWeights((0.0,), rest=1.0))
        from_second = lightning(tokenizer, cache_dir, "split", "sample" if reduction == "turn" else reduction,
                                FromTurn(2))  # fmt: skip
        declared = declared_loss_gradient(tokenizer, cache_dir, "session", reduction, FromTurn(2))
        assert relative_difference(zero_first, declared) < 1e-5
        assert relative_difference(from_second, declared) < 1e-5
        assert (
            relative_difference(lightning(tokenizer, cache_dir, "session", reduction, ALL_ANSWERS), declared)
            > 1e-3
        )


@pytest.mark.parametrize("supervision", [FromTurn(3), RisingWeights()], ids=lambda p: p.describe())
def test_invariant_1_under_a_policy(model, tokenizer, cache_dir, supervision):  # noqa: F811
    """Session logits equal split logits at every supervised answer token, packed or not, when earlier turns are
    context only or weigh otherwise."""
    results = {}
    for strategy in ("split", "session"):
        for packing in (False, True):
            data = DialogueDataModule(tokenizer, "chatglm2", strategy, supervision, train_path=VALIDATION, limit=6,
                                      packing=packing, batch_size=4, cache_dir=cache_dir)  # fmt: skip
            results[strategy, packing] = answer_logits(model, data)
    reference = results["split", False]
    assert len(reference) > 300
    assert min(turn for _, turn, _ in reference) == (3 if isinstance(supervision, FromTurn) else 1)
    for key, logits in results.items():
        assert logits.keys() == reference.keys(), key
        assert max((logits[k] - reference[k]).abs().max().item() for k in reference) < 1e-5, key


@pytest.mark.parametrize(
    "supervision", [TurnWeights((2.0, 0.5), rest=3.0), RisingWeights(), FromTurn(2)], ids=lambda p: p.describe()
)
@pytest.mark.parametrize("strategy,reduction", [("split", "sample"), ("session", "turn"), ("session", "sample"),
                                                ("split", "token"), ("session", "token")])  # fmt: skip
def test_measured_toy_weights_under_a_policy(model, tokenizer, tmp_path, supervision, strategy, reduction):  # noqa: F811
    """The toy batch (a; a b c) with answers of 2, 7 and 12 trained tokens: autograd's coefficients equal the exact
    ones, weights and all (not normalised: the weights' scale shows)."""
    batch, keys = toy_batch(tokenizer, strategy, tmp_path, supervision)
    exact = exact_coefficients(toy_turns(strategy, TOY_TOKENS, supervision), reduction)
    measured, residual = measured_weights(model, batch, reduction, keys, turn_directions(model, batch, keys))
    assert residual < 1e-4
    assert {"abc"[key]: value for key, value in measured.items()} == pytest.approx(
        {name: float(value) for name, value in exact.items()}, abs=1e-4
    )
    if supervision == TurnWeights((2.0, 0.5), rest=3.0) and reduction == "token":
        # a: 2 tokens at weight 2, twice; b: 7 at 1/2; c: 12 at 3; over 23 tokens.
        assert exact == {"a": Fraction(8, 23), "b": Fraction(7, 46), "c": Fraction(36, 23)}
