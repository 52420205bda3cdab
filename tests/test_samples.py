"""Exact ids and labels of a hand-written 3-turn session: both templates, both strategies, over-length cases.

The expected ids are built from named pieces of the bundled tokenizer, checked in the first test.
"""

from glm_session.data import CHATGLM2, CHATGLM2_ARTICLE
from glm_session.data.build import session_samples
from glm_session.data.strategy import LanguageModelStrategy, SessionStrategy, SplitStrategy

X = -100
GMASK, SOP, EOS = 6001, 6003, 2
PREFIX = [GMASK, SOP]
NL2 = [13, 13]  # "\n\n" = <0x0A> <0x0A>


def round_(n: int) -> list[int]:
    """ "[Round n]" = "[" "Round" "▁" digit "]"."""
    return [4123, 901, 3451, {0: 3401, 1: 3402, 2: 3415, 3: 3439}[n], 4124]


ASK = [3796, 3711]  # 问 ：
ANSWER = [4603, 3711]  # 答 ：
Q1, A1 = [416], [416, 3548]  # 你好 / 你好 ！
Q2, A2 = [263], [390]  # 你知道 / 知道呀
Q3, A3 = [461], [872]  # 谢谢 / 不客气


def user(n: int, q: list[int]) -> list[int]:
    return round_(n) + NL2 + ASK + q + NL2 + ANSWER


def ignored(ids: list[int]) -> list[int]:
    return [X] * len(ids)


def test_pieces_are_what_the_comments_say(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens
    assert tokens(round_(1)) == ["[", "Round", "▁", "1", "]"]
    assert tokens(NL2 + ASK + ANSWER) == ["<0x0A>", "<0x0A>", "问", "：", "答", "："]
    assert tokens(Q1 + A1 + Q2 + A2 + Q3 + A3) == ["你好", "你好", "！", "你知道", "知道呀", "谢谢", "不客气"]


def test_chatglm2_session(tokenizer, three_turns):
    (sample,), plan = session_samples(three_turns, tokenizer, CHATGLM2, SessionStrategy(), 2048)
    # eos is not in the context: it is the label of the first "\n\n" token after an answer, and the last
    # answer is followed by an eos token.
    assert sample.input_ids == (
        PREFIX + user(1, Q1) + A1 + NL2 + user(2, Q2) + A2 + NL2 + user(3, Q3) + A3 + [EOS]
    )
    assert sample.labels == (
        ignored(PREFIX + user(1, Q1)) + A1 + [EOS, X]
        + ignored(user(2, Q2)) + A2 + [EOS, X]
        + ignored(user(3, Q3)) + A3 + [EOS]
    )  # fmt: skip
    assert sample.turn_ids == [0, 0] + [1] * 18 + [2] * 17 + [3] * 16
    assert plan.skipped_turns == 0


def test_chatglm2_lm_trains_every_token_after_the_prefix(tokenizer, three_turns):
    (sample,), _ = session_samples(three_turns, tokenizer, CHATGLM2, LanguageModelStrategy(), 2048)
    session, _ = session_samples(three_turns, tokenizer, CHATGLM2, SessionStrategy(), 2048)
    assert sample.input_ids == session[0].input_ids
    assert sample.labels == (
        ignored(PREFIX) + user(1, Q1) + A1 + [EOS, X]
        + user(2, Q2) + A2 + [EOS, X]
        + user(3, Q3) + A3 + [EOS]
    )  # fmt: skip


def test_chatglm2_split(tokenizer, three_turns):
    samples, _ = session_samples(three_turns, tokenizer, CHATGLM2, SplitStrategy(), 2048)
    history1 = user(1, Q1) + A1 + NL2
    history2 = history1 + user(2, Q2) + A2 + NL2
    assert [s.input_ids for s in samples] == [
        PREFIX + user(1, Q1) + A1 + [EOS],
        PREFIX + history1 + user(2, Q2) + A2 + [EOS],
        PREFIX + history2 + user(3, Q3) + A3 + [EOS],
    ]
    assert [s.labels for s in samples] == [
        ignored(PREFIX + user(1, Q1)) + A1 + [EOS],
        ignored(PREFIX + history1 + user(2, Q2)) + A2 + [EOS],
        ignored(PREFIX + history2 + user(3, Q3)) + A3 + [EOS],
    ]
    assert samples[1].turn_ids == [0, 0] + [1] * 18 + [2] * 16


def test_article_session(tokenizer, three_turns):
    (sample,), _ = session_samples(three_turns, tokenizer, CHATGLM2_ARTICLE, SessionStrategy(), 2048)
    # Rounds from 0; answers are "a\n\n" followed by eos, all labelled, eos in the context.
    assert sample.input_ids == (
        PREFIX + user(0, Q1) + A1 + NL2 + [EOS] + user(1, Q2) + A2 + NL2 + [EOS] + user(2, Q3) + A3 + NL2 + [EOS]
    )
    assert sample.labels == (
        ignored(PREFIX + user(0, Q1)) + A1 + NL2 + [EOS]
        + ignored(user(1, Q2)) + A2 + NL2 + [EOS]
        + ignored(user(2, Q3)) + A3 + NL2 + [EOS]
    )  # fmt: skip


def test_article_split(tokenizer, three_turns):
    samples, _ = session_samples(three_turns, tokenizer, CHATGLM2_ARTICLE, SplitStrategy(), 2048)
    history2 = user(0, Q1) + A1 + NL2 + [EOS] + user(1, Q2) + A2 + NL2 + [EOS]
    assert samples[2].input_ids == PREFIX + history2 + user(2, Q3) + A3 + NL2 + [EOS]
    assert samples[2].labels == ignored(PREFIX + history2 + user(2, Q3)) + A3 + NL2 + [EOS]
    assert samples[0].labels == ignored(PREFIX + user(0, Q1)) + A1 + NL2 + [EOS]


def test_same_supervision_in_both_strategies(tokenizer, three_turns):
    for template in (CHATGLM2, CHATGLM2_ARTICLE):
        split, _ = session_samples(three_turns, tokenizer, template, SplitStrategy(), 2048)
        (session,), _ = session_samples(three_turns, tokenizer, template, SessionStrategy(), 2048)
        assert sum(label != X for s in split for label in s.labels) == sum(label != X for label in session.labels)


# Over-length. Lengths with chatglm2: prefix 2, a question 14, answers 2/1/1 tokens, "\n\n" 2, eos 1.
# All three turns: 53 tokens; turns 2-3 renumbered as rounds 1-2: 35; turn 1 alone: 19; turns 2 or 3 alone: 18.


def test_split_drops_the_oldest_history_and_renumbers_rounds(tokenizer, three_turns):
    samples, plan = session_samples(three_turns, tokenizer, CHATGLM2, SplitStrategy(), 40)
    assert [(v.start, v.trained_start, v.end) for v in plan.views] == [(0, 0, 1), (0, 1, 2), (1, 2, 3)]
    assert samples[2].input_ids == PREFIX + user(1, Q2) + A2 + NL2 + user(2, Q3) + A3 + [EOS]
    assert samples[2].labels == ignored(PREFIX + user(1, Q2) + A2 + NL2 + user(2, Q3)) + A3 + [EOS]
    assert samples[2].turn_ids == [0, 0] + [2] * 17 + [3] * 16  # session turn numbers are kept


def test_session_is_cut_into_windows_with_history(tokenizer, three_turns):
    samples, plan = session_samples(three_turns, tokenizer, CHATGLM2, SessionStrategy(), 40)
    assert [(v.start, v.trained_start, v.end) for v in plan.views] == [(0, 0, 2), (1, 2, 3)]
    assert samples[0].input_ids == PREFIX + user(1, Q1) + A1 + NL2 + user(2, Q2) + A2 + [EOS]
    assert samples[0].labels == ignored(PREFIX + user(1, Q1)) + A1 + [EOS, X] + ignored(user(2, Q2)) + A2 + [EOS]
    # The second window starts with turn 2 as (untrained) history, as the split sample of turn 3 does.
    assert samples[1].input_ids == PREFIX + user(1, Q2) + A2 + NL2 + user(2, Q3) + A3 + [EOS]
    assert samples[1].labels == ignored(PREFIX + user(1, Q2) + A2 + NL2 + user(2, Q3)) + A3 + [EOS]


def test_a_turn_longer_than_the_limit_is_truncated_at_the_answer_tail(tokenizer, three_turns):
    samples, plan = session_samples(three_turns, tokenizer, CHATGLM2, SplitStrategy(), 17)
    assert [v.answer_limit for v in plan.views] == [1, 1, 1]
    # The question is whole; the answer keeps its first token; no stop is taught for a cut answer.
    assert samples[0].input_ids == PREFIX + user(1, Q1) + A1[:1]
    assert samples[0].labels == ignored(PREFIX + user(1, Q1)) + A1[:1]
    session, plan = session_samples(three_turns, tokenizer, CHATGLM2, SessionStrategy(), 17)
    assert [s.input_ids for s in session] == [s.input_ids for s in samples]


def test_a_question_longer_than_the_limit_skips_its_turn(tokenizer, three_turns):
    for strategy in (SplitStrategy(), SessionStrategy()):
        samples, plan = session_samples(three_turns, tokenizer, CHATGLM2, strategy, 16)
        assert samples == [] and plan.skipped_turns == 3
