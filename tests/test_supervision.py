"""Supervision policies (DESIGN §2, issue 19): the weights each policy gives, the exact ids, labels and weights of the
samples it makes under both strategies, what the data tools show of it, and bad input (one line, exit 2)."""

import json
from fractions import Fraction

import pytest
from test_config_checks import FAST, assert_one_line, run_tool, write_lines
from test_samples import A1, A2, A3, EOS, NL2, PREFIX, Q1, Q2, Q3, X, ignored, user

from glm_session.analysis.__main__ import main as analysis_main
from glm_session.config import build, compose_config
from glm_session.data import CHATGLM2, DialogueDataModule
from glm_session.data.__main__ import main as data_main
from glm_session.data.build import session_samples
from glm_session.data.pipeline import NothingSupervisedError
from glm_session.data.strategy import SessionStrategy, SplitStrategy
from glm_session.errors import ConfigError
from glm_session.supervision import AllAnswers, FromTurn, LastAnswer, RisingWeights, TurnWeights
from glm_session.train import train

F = Fraction


def test_each_policy_gives_its_weights():
    assert AllAnswers().session_weights(3) == (1, 1, 1)
    assert LastAnswer().session_weights(3) == (0, 0, 1)
    assert LastAnswer().session_weights(1) == (1,)
    assert FromTurn(2).session_weights(3) == (0, 1, 1)
    assert FromTurn(4).session_weights(3) == (0, 0, 0)
    assert TurnWeights((0.5, 2), rest=0).session_weights(4) == (F(1, 2), 2, 0, 0)
    assert TurnWeights((0.1,), rest=0.3).session_weights(2) == (F(1, 10), F(3, 10))  # as the decimals read
    assert RisingWeights().session_weights(3) == (F(1, 2), 1, F(3, 2))  # 2k / (T + 1): they average 1
    assert RisingWeights().session_weights(1) == (1,)
    assert sum(RisingWeights().session_weights(7)) == 7


def test_policies_describe_themselves_and_say_whether_they_weigh():
    assert [p.describe() for p in (AllAnswers(), LastAnswer(), FromTurn(3), RisingWeights())] == [
        "all", "last", "from_turn m=3", "rising",
    ]  # fmt: skip
    assert TurnWeights((0, 0.5), rest=1.5).describe() == "positions weights=[0,0.5] rest=1.5"
    # Weights other than 0 and 1 are not in the labels: export writes them then.
    assert not any(p.weighted for p in (AllAnswers(), LastAnswer(), FromTurn(2), TurnWeights((0, 1), rest=1)))
    assert TurnWeights((1,), rest=2).weighted and RisingWeights().weighted


@pytest.mark.parametrize(
    "make,message",
    [
        (
            lambda: TurnWeights((1, -1)),
            "supervision.weights=[1, -1]: must be a non-empty list of finite numbers >= 0",
        ),
        (lambda: TurnWeights((float("nan"),)), "supervision.weights=[nan]: must be a non-empty list"),
        (lambda: TurnWeights((1, float("inf"))), "supervision.weights=[1, inf]: must be a non-empty list"),
        (lambda: TurnWeights((True,)), "supervision.weights=[True]: must be a non-empty list"),
        (lambda: TurnWeights(()), "supervision.weights=(): must be a non-empty list"),
        (lambda: TurnWeights("12"), "supervision.weights='12': must be a non-empty list"),
        (lambda: TurnWeights((1,), rest=-0.5), "supervision.rest=-0.5: must be a finite number >= 0"),
        (lambda: TurnWeights((1,), rest=float("nan")), "supervision.rest=nan: must be a finite number >= 0"),
        (lambda: FromTurn(0), "supervision.m=0: must be an integer >= 1"),
        (lambda: FromTurn(1.5), "supervision.m=1.5: must be an integer >= 1"),
    ],
)
def test_bad_policy_values_name_the_key(make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value).startswith(message)


# Samples: the hand-written 3-turn session of test_samples.py (answers 2, 1, 1 tokens; 53 tokens in all).


def samples_of(tokenizer, session, strategy, supervision, max_seq_len=2048):
    samples, plan = session_samples(session, tokenizer, CHATGLM2, strategy, max_seq_len, supervision)
    return samples, [(v.start, v.trained_start, v.end) for v in plan.views]


def test_last_trains_the_final_answer_with_the_whole_history(tokenizer, three_turns):
    history = user(1, Q1) + A1 + NL2 + user(2, Q2) + A2 + NL2
    for strategy in (SessionStrategy(), SplitStrategy()):
        (sample,), views = samples_of(tokenizer, three_turns, strategy, LastAnswer())
        assert sample.input_ids == PREFIX + history + user(3, Q3) + A3 + [EOS]
        assert sample.labels == ignored(PREFIX + history + user(3, Q3)) + A3 + [EOS]  # no stop taught before
        assert sample.turn_weights == [0.0, 0.0, 0.0, 1.0]


def test_from_turn_makes_the_opening_context(tokenizer, three_turns):
    (session,), views = samples_of(tokenizer, three_turns, SessionStrategy(), FromTurn(2))
    assert views == [(0, 1, 3)]
    assert session.input_ids == PREFIX + user(1, Q1) + A1 + NL2 + user(2, Q2) + A2 + NL2 + user(3, Q3) + A3 + [EOS]
    assert session.labels == (
        ignored(PREFIX + user(1, Q1) + A1 + NL2 + user(2, Q2)) + A2 + [EOS, X] + ignored(user(3, Q3)) + A3 + [EOS]
    )  # turn 1's "\n\n" teaches no eos
    split, views = samples_of(tokenizer, three_turns, SplitStrategy(), FromTurn(2))
    assert views == [(0, 1, 2), (0, 2, 3)]  # no sample for turn 1
    every, _ = samples_of(tokenizer, three_turns, SplitStrategy(), AllAnswers())
    assert [(s.input_ids, s.labels) for s in split] == [(s.input_ids, s.labels) for s in every[1:]]


def test_a_middle_turn_of_weight_0_is_context_only(tokenizer, three_turns):
    (sample,), views = samples_of(tokenizer, three_turns, SessionStrategy(), TurnWeights((1, 0), rest=1))
    assert views == [(0, 0, 3)]
    assert sample.labels == (
        ignored(PREFIX + user(1, Q1)) + A1 + [EOS, X] + ignored(user(2, Q2) + A2 + NL2 + user(3, Q3)) + A3 + [EOS]
    )  # no label on turn 2, its stop included
    split, views = samples_of(tokenizer, three_turns, SplitStrategy(), TurnWeights((1, 0), rest=1))
    assert views == [(0, 0, 1), (0, 2, 3)]


def test_a_session_sample_ends_with_its_last_trained_turn(tokenizer, three_turns):
    (sample,), views = samples_of(tokenizer, three_turns, SessionStrategy(), TurnWeights((2,), rest=0))
    assert views == [(0, 0, 1)]  # turns 2 and 3 follow the only trained answer: nothing sees them
    assert sample.input_ids == PREFIX + user(1, Q1) + A1 + [EOS]
    assert sample.labels == ignored(PREFIX + user(1, Q1)) + A1 + [EOS]
    assert sample.turn_weights == [0.0, 2.0, 0.0, 0.0]


def test_weights_ride_with_every_sample_and_window(tokenizer, three_turns):
    """A session cut into windows (max_seq_len 40: turns 1-2, then 3 with turn 2 as history) keeps each turn's
    weight; the labels are those of the plain policy."""
    rising, views = samples_of(tokenizer, three_turns, SessionStrategy(), RisingWeights(), 40)
    plain, plain_views = samples_of(tokenizer, three_turns, SessionStrategy(), AllAnswers(), 40)
    assert views == plain_views == [(0, 0, 2), (1, 2, 3)]
    assert [s.labels for s in rising] == [s.labels for s in plain]
    assert [s.turn_weights for s in rising] == [[0.0, 0.5, 1.0, 1.5]] * 2
    # last: only the window holding the final answer, with as much history as fits.
    (last,), views = samples_of(tokenizer, three_turns, SessionStrategy(), LastAnswer(), 40)
    assert views == [(1, 2, 3)]
    assert last.input_ids == PREFIX + user(1, Q2) + A2 + NL2 + user(2, Q3) + A3 + [EOS]
    assert last.labels == ignored(PREFIX + user(1, Q2) + A2 + NL2 + user(2, Q3)) + A3 + [EOS]


def test_a_truncated_turn_keeps_its_weight_and_an_untrained_one_is_no_sample(tokenizer, three_turns):
    """max_seq_len 17: every turn alone is cut at its answer's tail; a turn of weight 0 makes no sample."""
    samples, views = samples_of(tokenizer, three_turns, SplitStrategy(), TurnWeights((3, 0), rest=1), 17)
    assert views == [(0, 0, 1), (2, 2, 3)]
    assert samples[0].labels == ignored(PREFIX + user(1, Q1)) + A1[:1]
    assert [s.turn_weights for s in samples] == [[0.0, 3.0, 0.0, 1.0]] * 2


def three_turn_file(tmp_path, sessions=1):
    messages = [{"role": r, "content": c} for q, a in (("你好", "你好！"), ("你知道", "知道呀"), ("谢谢", "不客气"))
                for r, c in (("user", q), ("assistant", a))]  # fmt: skip
    records = [{"id": f"s{i}", "messages": messages} for i in range(sessions)]
    return write_lines(tmp_path / "three.jsonl", records)


def test_the_data_module_trains_the_policy_and_validates_every_answer(tokenizer, tmp_path):
    path = three_turn_file(tmp_path)
    data = DialogueDataModule(tokenizer, train_path=str(path), validation_path=str(path), test_path=str(path),
                              supervision="last", cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert data.supervision == LastAnswer()
    train_stats, validation = data.statistics("train"), data.statistics("validation")
    assert train_stats["supervision"] == "last" and validation["supervision"] == "all"
    assert train_stats["supervised_by_turn"] == {3: {"answers": 1, "tokens": 2}}
    assert validation["supervised_by_turn"] == {1: {"answers": 1, "tokens": 3}, 2: {"answers": 1, "tokens": 2},
                                                3: {"answers": 1, "tokens": 2}}  # fmt: skip
    batch = next(iter(data.dataloader("validation")))  # what validation and evaluation score: every turn
    assert sorted(set(batch["turn_ids"][:, 1:][batch["labels"][:, 1:] != X].tolist())) == [1, 2, 3]


def test_data_stats_reports_answers_tokens_and_gradient_shares_by_turn(tmp_path, capsys):
    """Turn 1 trains 3 tokens (你好！ and its stop), turns 2 and 3 two each. Under rising (1/2, 1, 3/2) and token
    the masses are 3/2, 2 and 3 of 13/2; under turn, 1/2, 1 and 3/2 of 3."""
    path, out = three_turn_file(tmp_path, sessions=2), tmp_path / "stats.json"
    common = [f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}", f"out={out}", "supervision=rising"]
    assert data_main(["stats", *common]) == 0
    stats = json.loads(out.read_text())
    assert stats["supervision"] == "rising" and stats["reduction"] == "token" and stats["supervised_answers"] == 6
    assert stats["supervised_by_turn"] == {"1": {"answers": 2, "tokens": 6}, "2": {"answers": 2, "tokens": 4},
                                           "3": {"answers": 2, "tokens": 4}}  # fmt: skip
    assert stats["gradient_share_by_turn"] == pytest.approx({"1": 3 / 13, "2": 4 / 13, "3": 6 / 13}, abs=1e-7)
    assert stats["gradient_scale"] == pytest.approx(13 / 14)  # (1/2 * 3 + 2 + 3/2 * 2) / 7 tokens
    assert data_main(["stats", *common, "reduction=turn"]) == 0
    assert json.loads(out.read_text())["gradient_share_by_turn"] == pytest.approx(
        {"1": 1 / 6, "2": 1 / 3, "3": 1 / 2}, abs=1e-7
    )
    printed = capsys.readouterr().out
    assert (
        "turn    answers       tokens  gradient %  (turn)" in printed
        and "   3          2            4       50.00" in printed
    )


def export_rows(tmp_path, *overrides) -> tuple[bytes, list[dict]]:
    out = tmp_path / "rows.jsonl"
    common = [f"data.path={three_turn_file(tmp_path)}", f"data.cache_dir={tmp_path / 'cache'}", f"out={out}"]
    assert data_main(["export", *common, *overrides]) == 0
    return out.read_bytes(), [json.loads(line) for line in out.read_text().splitlines()]


def test_export_writes_the_weights_only_when_the_policy_weighs(tmp_path):
    plain, rows = export_rows(tmp_path)
    assert "loss_weight" not in rows[0]
    # Policies that weigh every trained turn 1 export the same bytes as the default.
    assert export_rows(tmp_path, "supervision=from_turn", "supervision.m=1")[0] == plain
    assert export_rows(tmp_path, "supervision=positions", "supervision.weights=[1,1]")[0] == plain
    _, (row,) = export_rows(tmp_path, "supervision=positions", "supervision.weights=[0,0.5]", "supervision.rest=2")
    trained = [(turn, weight) for turn, label, weight in zip(row["turn_ids"], row["labels"], row["loss_weight"],
                                                             strict=True) if label != X]  # fmt: skip
    assert trained == [(2, 0.5), (2, 0.5), (3, 2.0), (3, 2.0)]
    assert all(w == 0 for label, w in zip(row["labels"], row["loss_weight"], strict=True) if label == X)


def test_exact_toy_takes_the_policy(capsys):
    assert analysis_main(["exact-toy", "supervision=positions", "supervision.weights=[1,2,3]"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == ["supervision: positions weights=[1,2,3] rest=1", "turn weights: (a) 1; (a b c) 1, 2, 3"]
    # token: masses a 1 + 1, b 2, c 3 (equal lengths); session+sample: a 1 + 1/3, b 2/3, c 1 of 3.
    assert printed[3].split() == ["split+token", "2/7", "2/7", "3/7", "7/4"]
    assert printed[7].split() == ["session+sample", "4/9", "2/9", "1/3", "3/2"]
    assert analysis_main(["exact-toy", "supervision=last"]) == 0
    assert capsys.readouterr().out.splitlines()[3].split() == ["split+token", "1/2", "0", "1/2", "1"]


# Bad input: one line and exit code 2, never a run that trains on nothing.


def test_a_policy_that_trains_nothing_stops_the_run(tmp_path, cache_dir):
    cfg = compose_config("train", [*FAST, "data.limit=4", f"data.cache_dir={cache_dir}", "supervision=from_turn",
                                   "supervision.m=40", f"output_dir={tmp_path / 'run'}"])  # fmt: skip
    with pytest.raises(NothingSupervisedError) as err:
        train(cfg)
    assert str(err.value).endswith(
        "train.jsonl: trains on nothing: supervision=from_turn m=40 leaves 0 supervised answers in the train split "
        "(4 sessions of at most 14 turns)"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_weight_list_longer_than_any_session_is_refused(tmp_path):
    path = three_turn_file(tmp_path)
    cfg = compose_config("data_tool", [f"data.path={path}", f"data.cache_dir={tmp_path}", "supervision=positions",
                                       "supervision.weights=[1,1,1,2]"])  # fmt: skip
    with pytest.raises(ConfigError) as err:
        build(cfg.data).pipeline.check_supervision("train")
    assert str(err.value) == (
        "supervision.weights=[1.0, 1.0, 1.0, 2.0]: must be at most 3 weights: no train session has more than 3 "
        "turns, so weights 4..4 would weigh nothing"
    )


@pytest.mark.slow
def test_bad_supervision_ends_with_one_line_and_exit_code_2(tmp_path):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    positions = ("supervision=positions",)
    assert_one_line(run_tool("glm_session.data", "stats", *positions, "supervision.weights=[1,-2]"),
                    "supervision.weights=[1, -2]: must be a non-empty list of finite numbers >= 0")  # fmt: skip
    assert_one_line(run_tool("glm_session.data", "stats", *positions, "supervision.weights=[nan]"),
                    "supervision.weights=[nan]: must be")  # fmt: skip
    assert_one_line(run_tool("glm_session.data", "stats", *positions, "supervision.rest=inf"),
                    "supervision.rest=inf: must be a finite number >= 0")  # fmt: skip
    assert_one_line(run_tool("glm_session.data", "stats", "supervision=first"),
                    "Could not find 'supervision/first'")  # fmt: skip
    assert_one_line(run_tool("glm_session.data", "stats", "supervision=last", "supervision.m=2"),
                    "Could not override 'supervision.m'")  # fmt: skip
    assert_one_line(run_tool("glm_session.data", "stats", *positions, f"supervision.weights=[{','.join(['1'] * 17)}]", cache),
                    "must be at most 16 weights: no train session has more than 16 turns")  # fmt: skip
    assert_one_line(
        run_tool("glm_session.train", "supervision=from_turn", "supervision.m=40", cache, f"hydra.run.dir={tmp_path / 'r'}"),
        "trains on nothing: supervision=from_turn m=40 leaves 0 supervised answers in the train split",
    )  # fmt: skip
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_run_trained_on_the_last_answers_is_scored_on_every_turn(tmp_path, cache_dir):
    """Validation and the evaluation after training score every turn, so a comparison shows what ``last`` loses on
    the early ones; the run's record names the policy."""
    cfg = compose_config("train", [*FAST, "trainer.max_steps=-1", "trainer.max_epochs=1", "data.limit=4",
                                   f"data.cache_dir={cache_dir}", "supervision=last",
                                   "evaluate.enabled=true", "evaluate.limit=1", "generation.max_new_tokens=2",
                                   f"output_dir={tmp_path}"])  # fmt: skip
    metrics, _ = train(cfg)
    assert metrics["run_info"]["supervision"] == "last"
    assert metrics["data"]["supervised_answers"] == 4  # one answer a session trained
    assert len(metrics["val_loss_by_turn"]) >= 10 and min(map(int, metrics["val_loss_by_turn"])) == 1
    evaluation = metrics["evaluation"]
    assert min(map(int, evaluation["teacher_forced"]["loss_by_turn"])) == 1
    assert len(evaluation["rouge_by_turn"]) >= 10


def test_resuming_under_another_policy_is_a_difference():
    from glm_session.run_info import RunInfo

    saved = RunInfo(template="chatglm2", strategy="session", reduction="token", tokenizer_fingerprint="f",
                    supervision="all")  # fmt: skip
    assert saved.differences(RunInfo(**{**saved.to_dict(), "supervision": "from_turn m=2"})) == [
        "supervision: 'all' -> 'from_turn m=2'"
    ]
    # A checkpoint from before the policies trained every answer: resuming it under another policy is a change.
    older = RunInfo.from_dict({k: v for k, v in saved.to_dict().items() if k != "supervision"})
    assert older.differences(saved) == []
    assert older.differences(RunInfo(**{**saved.to_dict(), "supervision": "last"})) == [
        "supervision: 'all' -> 'last'"
    ]
