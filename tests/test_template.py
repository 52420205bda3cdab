"""Templates: the chatglm2 prompt equals ChatGLM2's build_prompt; chatglm2_article equals the article's code."""

import pytest

from glm_session.constants import IGNORE_INDEX
from glm_session.data import CHATGLM2, CHATGLM2_ARTICLE, Session, Turn, get_template
from glm_session.data.build import session_samples
from glm_session.data.samples import SegmentEncoder
from glm_session.data.strategy import SessionStrategy
from glm_session.data.template import prompt_text


def official_build_prompt(query: str, history: list[tuple[str, str]]) -> str:
    """ChatGLM2-6B tokenization_chatglm.py ``build_prompt``, restated."""
    prompt = ""
    for i, (old_query, response) in enumerate(history):
        prompt += f"[Round {i + 1}]\n\n问：{old_query}\n\n答：{response}\n\n"
    prompt += f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
    return prompt


@pytest.mark.parametrize("n_history", [0, 1, 2])
def test_chatglm2_prompt_is_build_prompt(n_history):
    history = [("你好", "你好！"), ("今天天气怎么样？", "很好。\n明天也不错")][:n_history]
    segments = CHATGLM2.render_prompt("谢谢", [Turn(q, a) for q, a in history])
    assert prompt_text(segments) == official_build_prompt("谢谢", history)
    assert [s.token for s in segments[:2]] == ["[gMASK]", "sop"]


def test_chatglm2_prompt_string_pinned():
    segments = CHATGLM2.render_prompt("谢谢", [Turn("你好", "你好！")])
    assert prompt_text(segments) == "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：谢谢\n\n答："


def test_article_prompt_string_pinned(tokenizer):
    segments = CHATGLM2_ARTICLE.render_prompt("谢谢", [Turn("你好", "你好！")])
    assert prompt_text(segments) == "[Round 0]\n\n问：你好\n\n答：你好！\n\n[Round 1]\n\n问：谢谢\n\n答："
    assert [s.token for s in segments if s.token] == ["[gMASK]", "sop", "eos"]  # eos stays in the context


@pytest.mark.parametrize("template", [CHATGLM2, CHATGLM2_ARTICLE])
def test_inference_prompt_equals_the_training_context(template, tokenizer, three_turns):
    """The prompt for turn 3 is, id for id, what the session sample feeds before a3."""
    (sample,), _ = session_samples(three_turns, tokenizer, template, SessionStrategy(), 2048)
    encode = SegmentEncoder(tokenizer)
    prompt = [i for s in template.render_prompt("谢谢", three_turns.turns[:2]) for i in encode(s)]
    assert sample.input_ids[: len(prompt)] == prompt
    assert sample.labels[len(prompt)] == tokenizer.encode("不客气", add_special_tokens=False)[0]


def article_preprocess(conversations, tokenizer, max_seq_length):
    """The article's reference preprocess_function (SpongebBob/Finetune-ChatGLM2-6B main.py), restated."""
    input_ids, labels = [], []
    eos_id = tokenizer.eos_token_id
    turn_idx = 0
    for sentence in conversations:
        sentence_from = sentence["from"].lower()
        if sentence_from == "human":
            sentence_value = f"[Round {turn_idx}]\n\n问：" + sentence["value"] + "\n\n答："
        else:
            sentence_value = sentence["value"] + "\n\n"
        sentence_ids = tokenizer.encode(sentence_value, add_special_tokens=False)
        label = list(sentence_ids) if sentence_from != "human" else [-100] * len(sentence_ids)
        input_ids += sentence_ids
        labels += label
        if sentence_from != "human":
            input_ids += [eos_id]
            labels += [eos_id]
            turn_idx += 1
    input_ids = tokenizer.encode("") + input_ids  # [gMASK] sop
    labels = [-100] * 2 + labels
    pad_len = max_seq_length - len(input_ids)
    return input_ids + [eos_id] * pad_len, labels + [-100] * pad_len


def test_article_template_reproduces_the_reference_code(tokenizer):
    session = Session(
        "kd",
        (
            Turn("知道恋恋笔记本这部电影吗？", "知道呀，是一部改编于同名小说的电影。"),
            Turn("是哪年上映的呀？", "2004年06月25日。"),
        ),
    )
    conversations = [
        {"from": "human" if i % 2 == 0 else "gpt", "value": text}
        for turn in session.turns
        for i, text in enumerate((turn.question, turn.answer))
    ]
    reference_ids, reference_labels = article_preprocess(conversations, tokenizer, max_seq_length=128)
    (sample,), _ = session_samples(session, tokenizer, CHATGLM2_ARTICLE, SessionStrategy(), 128)
    pad = 128 - len(sample.input_ids)
    assert sample.input_ids + [tokenizer.eos_token_id] * pad == reference_ids
    assert sample.labels + [IGNORE_INDEX] * pad == reference_labels


def test_unknown_template_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        get_template("chatml")
