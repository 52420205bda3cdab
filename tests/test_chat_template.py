"""glm_session.data.chat_template: ``apply_chat_template`` of the exported tokenizer gives the project's inference prompts,
text for text and id for id, for both dialogue templates, with and without a system text, on every KdConv turn."""

import pytest

from glm_session.config import RESOURCES_DIR
from glm_session.data.chat_template import ChatTemplateError, add_chat_template, chat_messages, jinja_chat_template
from glm_session.data.readers import read_sessions
from glm_session.data.samples import SegmentEncoder
from glm_session.data.session import Turn
from glm_session.data.template import CHATGLM2, CHATGLM2_ARTICLE, PLAIN
from glm_session.export import fast_tokenizer

SYSTEM = "你是一个助手。"
HISTORY = [Turn("你好", "你好！"), Turn("天气", "晴。")]


def chat_tokenizer(tokenizer, template):
    fast = fast_tokenizer(tokenizer)
    add_chat_template(fast, template, "[gMASK]sop", "</s>")
    return fast


@pytest.fixture(scope="module", params=[CHATGLM2, CHATGLM2_ARTICLE], ids=lambda t: t.name)
def template(request):
    return request.param


def test_the_rendered_texts_written_out(tokenizer):
    messages = chat_messages(HISTORY, "再见", SYSTEM)
    chatglm2 = chat_tokenizer(tokenizer, CHATGLM2).apply_chat_template(messages, tokenize=False)
    assert chatglm2 == (
        "[gMASK]sop你是一个助手。\n\n[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：天气\n\n答：晴。\n\n"
        "[Round 3]\n\n问：再见\n\n答："
    )
    article = chat_tokenizer(tokenizer, CHATGLM2_ARTICLE).apply_chat_template(messages, tokenize=False)
    assert article == (
        "[gMASK]sop你是一个助手。\n\n[Round 0]\n\n问：你好\n\n答：你好！\n\n</s>[Round 1]\n\n问：天气\n\n答：晴。\n\n</s>"
        "[Round 2]\n\n问：再见\n\n答："
    )
    # A whole conversation (the last message an answer) ends as a training sample does: with eos.
    closed = chat_messages(HISTORY[:1], "天气") + [{"role": "assistant", "content": "晴。"}]
    assert chat_tokenizer(tokenizer, CHATGLM2).apply_chat_template(closed, tokenize=False).endswith("答：晴。</s>")


def test_ids_written_out(tokenizer):
    fast = chat_tokenizer(tokenizer, CHATGLM2)
    ids = fast.apply_chat_template(chat_messages([], "你好"), add_generation_prompt=True, return_dict=False)
    # [gMASK] sop, "[" "Round" "▁" "1" "]" "\n" "\n" "问" "：" "你好" "\n" "\n" "答" "：" (test_export writes the same)
    assert ids == [6001, 6003, 4123, 901, 3451, 3402, 4124, 13, 13, 3796, 3711, 416, 13, 13, 4603, 3711]
    article = chat_tokenizer(tokenizer, CHATGLM2_ARTICLE)
    ids = article.apply_chat_template(chat_messages([Turn("你好", "你好")], "你好"), return_dict=False)
    assert ids[:2] == [6001, 6003] and ids.count(2) == 1  # the first answer's eos, in the context
    assert ids[ids.index(2) - 3 : ids.index(2)] == [416, 13, 13]  # after "你好\n\n"


def test_the_tokenizer_cuts_a_prompt_at_the_segment_edges(tokenizer, template):
    """Each text between special tokens falls into exactly the template's segments (BPE merges stay inside)."""
    fast = chat_tokenizer(tokenizer, template)
    sections, pieces = [[]], []
    for segment in template.render_prompt("再见", HISTORY, SYSTEM):
        if segment.token is None:
            sections[-1].append(segment.text)
        else:  # special tokens cut the text before the pre-tokenizer sees it
            sections.append([])
    for section in sections:
        pieces += [piece for piece, _ in fast.backend_tokenizer.pre_tokenizer.pre_tokenize_str("".join(section))]
    expected = [text for section in sections for text in section]
    assert pieces == expected
    assert len(expected) == 1 + 3 + 2 * (
        1 if template.eos_in_context else 2
    )  # system, questions, answers (+ seps)


def test_every_kdconv_turn_gives_the_projects_prompt_ids(tokenizer, template):
    fast, encode = chat_tokenizer(tokenizer, template), SegmentEncoder(tokenizer)
    sessions = [s for split in ("train", "validation", "test")
                for s in read_sessions(RESOURCES_DIR / "kdconv" / f"{split}.jsonl").sessions]  # fmt: skip
    assert len(sessions) == 900
    expected, conversations = [], []
    for session in sessions:
        for k, turn in enumerate(session.turns):
            for system in (None, SYSTEM):
                segments = template.render_prompt(turn.question, session.turns[:k], system)
                expected.append([i for segment in segments for i in encode(segment)])
                conversations.append(chat_messages(session.turns[:k], turn.question, system))
    got = fast.apply_chat_template(conversations, add_generation_prompt=True, return_dict=False)
    assert len(got) == len(expected) == 19054
    mismatched = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert mismatched == []


def test_plain_has_no_chat_form_and_a_system_message_comes_first(tokenizer):
    with pytest.raises(ChatTemplateError, match="plain"):
        jinja_chat_template(PLAIN, "[gMASK]sop", "</s>")
    fast = chat_tokenizer(tokenizer, CHATGLM2)
    late_system = [{"role": "user", "content": "你好"}, {"role": "system", "content": SYSTEM}]
    with pytest.raises(Exception, match="a system message comes first"):
        fast.apply_chat_template(late_system, tokenize=False)
