"""Per-turn gradient weights: the article's numbers from its model, exact token-level weights, and the exact
weights checked against gradients measured with autograd on a real model."""

import json
from fractions import Fraction

import pytest
import torch
from transformers import GlmForCausalLM

from glm_session.analysis.__main__ import main as analysis_main
from glm_session.analysis.article import ARTICLE_TOY, attribution_weights
from glm_session.analysis.measured import measured_weights
from glm_session.analysis.toy import exact_toy
from glm_session.analysis.weights import exact_weights, trained_turns
from glm_session.data import DialogueDataModule
from glm_session.model import chatglm2_config, padded_vocab_size
from glm_session.supervision import ALL_ANSWERS

F = Fraction


def test_article_model_gives_the_article_numbers():
    assert attribution_weights(ARTICLE_TOY, "session") == {"a": F(2, 3), "b": F(1, 6), "c": F(1, 6)}
    assert attribution_weights(ARTICLE_TOY, "split") == {"a": F(17, 24), "b": F(5, 24), "c": F(1, 12)}


def test_article_toy_command(capsys):
    assert analysis_main(["article-toy"]) == 0
    assert capsys.readouterr().out == (
        '{"session": {"a": "2/3", "b": "1/6", "c": "1/6"}, "split": {"a": "17/24", "b": "5/24", "c": "1/12"}}\n'
    )


def test_exact_token_weights_of_the_toy():
    half_quarter = {"a": F(1, 2), "b": F(1, 4), "c": F(1, 4)}
    weights = exact_toy()
    assert weights["session+sample"] == {"a": F(2, 3), "b": F(1, 6), "c": F(1, 6)}
    assert weights["split+sample"] == weights["session+turn"] == half_quarter
    assert weights["split+token"] == weights["session+token"] == half_quarter


def test_exact_weights_follow_lengths():
    """Unequal answers: token weighs by length, turn does not."""
    turns = trained_turns([[-100, 5, 5, 5], [-100, -100, 7, -100]], [[0, 1, 1, 2], [0, 1, 1, 1]], [0, 1], [0, 1])
    assert exact_weights(turns, "token") == {(0, 1): F(1, 2), (0, 2): F(1, 4), (1, 1): F(1, 4)}
    assert exact_weights(turns, "turn") == {(0, 1): F(1, 3), (0, 2): F(1, 3), (1, 1): F(1, 3)}
    assert exact_weights(turns, "sample") == {(0, 1): F(1, 3), (0, 2): F(1, 6), (1, 1): F(1, 2)}


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = chatglm2_config("chatglm2-tiny", vocab_size=padded_vocab_size(len(tokenizer)))
    return GlmForCausalLM(config).eval()


# The toy as real dialogues whose answers differ in length: a = 1 token, b = 6, c = 11 (each + its stop).
TOY = {
    "a": ("你好", "你好"),
    "b": ("你知道", "知道呀，是一部很好看的电影。"),
    "c": ("谢谢", "好的，没问题，我马上就去办。"),
}
TOY_TOKENS = {"a": 2, "b": 7, "c": 12}  # trained tokens of each answer, its stop included


def toy_batch(tokenizer, strategy, tmp_path, supervision=ALL_ANSWERS):
    """The toy batch (session 1 = a, session 2 = a, b, c), and every token's content key (a 0, b 1, c 2)."""
    path = tmp_path / f"toy-{strategy}.jsonl"
    lines = []
    for session in ("a", "abc"):
        messages = [m for name in session
                    for m in ({"role": "user", "content": TOY[name][0]}, {"role": "assistant", "content": TOY[name][1]})]  # fmt: skip
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    path.write_text("\n".join(lines))
    data = DialogueDataModule(tokenizer, "chatglm2", strategy, supervision, train_path=str(path), batch_size=100,
                              shuffle=False, cache_dir=str(tmp_path))  # fmt: skip
    batch = next(iter(data.dataloader("train")))
    content = {(0, 1): 0, (1, 1): 0, (1, 2): 1, (1, 3): 2}  # a, a, b, c
    keys = torch.tensor([[content.get((s, t), -1) for s, t in zip(srow, trow, strict=True)]
                         for srow, trow in zip(batch["session_index"].tolist(), batch["turn_ids"].tolist(), strict=True)])  # fmt: skip
    return batch, keys


def test_toy_shares_with_unequal_answers_by_hand():
    weights = exact_toy(tokens=TOY_TOKENS)
    # token: a 2 + 2, b 7, c 12 of 23 tokens, for both strategies.
    assert weights["session+token"] == weights["split+token"] == {"a": F(4, 23), "b": F(7, 23), "c": F(12, 23)}
    # session+sample: (1 + 2/21) / 2 for a, (7/21) / 2 for b, (12/21) / 2 for c.
    assert weights["session+sample"] == {"a": F(23, 42), "b": F(1, 6), "c": F(2, 7)}
    # A turn's token mean counts once among the 4 trained turns (a twice). Split samples hold one turn each, so
    # split+sample and split+turn are the same reduction.
    assert weights["session+turn"] == weights["split+sample"] == weights["split+turn"]
    assert weights["session+turn"] == {"a": F(1, 2), "b": F(1, 4), "c": F(1, 4)}


@pytest.mark.parametrize("strategy,reduction", [("split", "sample"), ("session", "turn"), ("session", "sample"),
                                                ("split", "token"), ("session", "token")])  # fmt: skip
def test_measured_weights_of_the_toy(model, tokenizer, tmp_path, strategy, reduction):
    batch, keys = toy_batch(tokenizer, strategy, tmp_path)
    trained = batch["labels"][:, 1:] != -100
    assert {name: int((keys[:, 1:][trained] == k).sum()) for k, name in enumerate("abc")} == {
        "a": 4,
        "b": 7,
        "c": 12,
    }
    measured, residual = measured_weights(model, batch, reduction, keys=keys)
    exact = exact_toy(tokens=TOY_TOKENS)
    expected = exact[f"{strategy}+{reduction}"]
    others = {r for r in ("token", "sample", "turn") if r != reduction and {r, reduction} != {"sample", "turn"}}
    if strategy == "session" or reduction == "token":
        assert all(exact[f"{strategy}+{other}"] != expected for other in others)  # the check can tell them apart
    assert residual < 1e-4
    # The coefficients are not normalised: a loss at another scale (x3, say) would fail here.
    for key, name in enumerate("abc"):
        assert measured[key] == pytest.approx(float(expected[name]), abs=1e-4)
    assert sum(measured.values()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("supervision", ["all", "rising", "from_turn"])
def test_measure_command_on_kdconv(tmp_path, cache_dir, supervision):
    """Exact vs measured on three real KdConv dialogues in one batch (turns of different sessions kept apart),
    every strategy and reduction, under a policy."""
    code = analysis_main(["measure", "measure.sessions=3", f"supervision={supervision}", f"data.cache_dir={cache_dir}",
                          f"out_dir={tmp_path}"])  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "measured.json").read_text())
    assert len(results) == 6
    for name, result in results.items():
        assert result["turns"] >= 20 and len({key.split(":")[0] for key in result["exact"]}) == 3, name
        assert result["max_abs_error"] < 1e-4, name


def test_report_command(tmp_path, cache_dir):
    assert analysis_main(["report", "data.limit=30", f"data.cache_dir={cache_dir}", f"out_dir={tmp_path}"]) == 0
    report = json.loads((tmp_path / "weights.json").read_text())
    full = report["full_batch"]
    assert sum(full["split+token"].values()) == pytest.approx(1.0)
    # The exact weights of the whole dataset as one step (no gradient here: the measure command and
    # test_invariant_gradients.py check them against autograd): the reduction, not the strategy, sets them.
    assert full["split+token"] == full["session+token"]
    assert full["split+sample"] == full["session+turn"]
    assert full["split+token"] != full["session+sample"]
    assert (tmp_path / "weights.png").stat().st_size > 10_000 and "| split+token |" in (
        tmp_path / "weights.md"
    ).read_text()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["report", "split=foo"], "error: split='foo': must be one of train, validation, test, all"),
        (["report", "accumulate=0"], "error: accumulate=0: must be an integer >= 1"),  # range() arg 3 must not be zero
        (["report", "accumulate=-1"], "error: accumulate=-1: must be an integer >= 1"),  # empty per_step, exit 0
        (["report", "data.validation_path=null", "split=validation"], "error: no validation data"),  # zeros, exit 0
        (["measure", "measure.model=foo"], "error: measure.model='foo': must be one of chatglm2-6b,"),
        (["measure", "measure.sessions=0"], "error: measure.sessions=0: must be an integer >= 1"),  # said data.limit
        (["reprot"], "error: unknown command 'reprot': one of article-toy, exact-toy, report, measure"),
        # session 18's audit: the docstring alone; exit 0 for the next two
        ([], "error: no command: one of article-toy, exact-toy, report, measure"),
        (["article-toy", "extra=1"], "error: article-toy takes no overrides, got extra=1"),
        (["exact-toy", "supervision=positions", "supervision.weights=[0,0,0]"],
         "error: supervision='positions weights=[0,0,0] rest=1': must be a policy that trains some answer of the toy"),
        (["report", "out_dir={tmp}/a_file"], "error: out_dir='{tmp}/a_file': must be a folder to write into: "
                                             "{tmp}/a_file is a file"),  # "a_file: File exists"
    ],
)  # fmt: skip
def test_bad_analysis_values_end_with_one_line(tmp_path, cache_dir, capsys, argv, message):
    (tmp_path / "a_file").write_text("x")
    argv, message = [a.replace("{tmp}", str(tmp_path)) for a in argv], message.replace("{tmp}", str(tmp_path))
    before_config = argv in (["reprot"], [], ["article-toy", "extra=1"])
    extra = [] if before_config or argv[0] == "exact-toy" else ["data.limit=5", f"data.cache_dir={cache_dir}"]
    extra += [] if before_config or any(a.startswith("out_dir=") for a in argv) else [f"out_dir={tmp_path}"]
    if before_config:  # refused before any config: returned, not raised
        assert analysis_main(argv) == 2
    else:
        assert _exit_code([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "weights.json").exists()


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        analysis_main(argv)
    return exit_.value.code
