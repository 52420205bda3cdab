"""glm_session.chat: a dialogue through standard input, prompts built as evaluation builds them (the overlength rule
included), the streamed answer equal to evaluation's generation, and bad input in one line."""

import io
import json
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from glm_session.chat import Chat, converse, load_chat_model
from glm_session.data.session import Session, Turn
from glm_session.evaluation.generation import GenerationSettings, build_prompts, generate_answers

GREEDY = GenerationSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_chat_model(
        OmegaConf.create({"ckpt_path": str(checkpoint), "model_dir": None, "max_seq_len": None})
    )


def test_a_dialogue_through_standard_input(checkpoint):
    lines = "你好\n/history\n\n你知道《泰坦尼克号》吗？\n/history\n/reset\n/history\n/exit\nnot read\n"
    result = subprocess.run(
        [sys.executable, "-m", "glm_session.chat", f"ckpt_path={checkpoint}", "generation.max_new_tokens=6"],
        input=lines, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout  # answers of a two-step model may hold any text, newlines too: markers are found in order
    assert out.startswith("chat: /reset starts a new dialogue, /history shows it, /exit ends\n答：")
    marks = ["[1] 问：你好\n[1] 答：", "(1 turn(s))\n答：", "[1] 问：你好\n", "[2] 问：你知道《泰坦尼克号》吗？\n[2] 答：",
             "(2 turn(s))\n(a new dialogue)\n(0 turn(s))\n"]  # fmt: skip
    position = 0
    for mark in marks:  # each after the one before
        position = out.index(mark, position) + len(mark)
    assert position == len(out)  # /exit: "not read" is not answered
    assert out.count("答：") == 2 + 3  # two answers; three in the histories


def test_the_streamed_answer_is_evaluations_answer_to_the_same_prompt(loaded):
    model, tokenizer, template, max_seq_len = loaded
    chat, outs = Chat(model, tokenizer, template, GREEDY, max_seq_len), [io.StringIO(), io.StringIO()]
    answers = [chat.reply(q, out) for q, out in zip(("你好", "你喜欢哪部电影？"), outs, strict=True)]
    session = Session("s", (Turn("你好", answers[0]), Turn("你喜欢哪部电影？", answers[1])))
    prompts, skipped = build_prompts([session], template, tokenizer, GREEDY.prompt_budget(max_seq_len))
    assert skipped == 0 and [p.turn for p in prompts] == [1, 2]
    assert (
        chat.prompt("你喜欢哪部电影？".replace("电影", "书"))[0] != prompts[1].ids
    )  # a different question differs
    assert generate_answers(model, prompts, tokenizer, max_new_tokens=6) == answers
    assert [out.getvalue().strip() for out in outs] == answers  # the stream wrote each answer, nothing else
    assert all(out.getvalue().endswith("\n") for out in outs)


def test_an_overlong_history_loses_its_oldest_turns_as_in_evaluation(loaded):
    model, tokenizer, template, _ = loaded
    chat = Chat(model, tokenizer, template, GREEDY, max_seq_len=60)
    chat.turns = [
        Turn("第一个问题是什么？", "这是第一个回答。"),
        Turn("第二个问题", "第二个回答"),
        Turn("第三", "三"),
    ]
    question = "第四个问题呢？"
    ids, dropped = chat.prompt(question)
    session = Session("s", (*chat.turns, Turn(question, "x")))
    prompts, _ = build_prompts([session], template, tokenizer, GREEDY.prompt_budget(60))
    assert dropped == prompts[-1].dropped_history_turns > 0 and ids == prompts[-1].ids
    out = io.StringIO()
    chat.reply(question, out)
    assert out.getvalue().startswith(
        f"(the oldest {dropped} turn(s) left out of the prompt: it holds 54 tokens)\n"
    )
    out = io.StringIO()
    assert chat.reply("很长的问题" * 40, out) is None
    assert out.getvalue() == "(not sent: the question alone takes more than the prompt's 54 tokens)\n"
    assert len(chat.turns) == 4  # the unsent question is not part of the dialogue


def test_converse_reads_commands(loaded):
    model, tokenizer, template, max_seq_len = loaded
    chat, out = Chat(model, tokenizer, template, GREEDY, max_seq_len), io.StringIO()
    converse(chat, ["/history\n", "  \n", "/exit\n", "你好\n"], out)
    assert out.getvalue().splitlines()[1:] == ["(0 turn(s))"] and chat.turns == []


@pytest.mark.parametrize(
    "arguments, message",
    [
        ([], "give ckpt_path=<run>/checkpoints/last.ckpt or model_dir=<exported folder>"),
        (["model_dir=/nonexistent"], "/nonexistent: no such folder"),
        (["ckpt_path=/nonexistent.ckpt"], "/nonexistent.ckpt"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(arguments, message):
    result = subprocess.run([sys.executable, "-m", "glm_session.chat", *arguments], input="你好\n",
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_an_export_folder_without_a_template_is_one_line(checkpoint, tmp_path):
    from glm_session.export import INFO_FILE, export

    folder = export(checkpoint, tmp_path / "hf")
    info = json.loads((folder / INFO_FILE).read_text())
    (folder / INFO_FILE).write_text(json.dumps({k: v for k, v in info.items() if k != "template"}))
    (tmp_path / "no_info").mkdir()
    (tmp_path / "no_info" / "config.json").write_text("{}")
    (tmp_path / "no_config").mkdir()
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    for arguments, message in [
        ([f"model_dir={folder}"], f"error: {folder / INFO_FILE}: records no template; export the run's checkpoint "
                                  "again with python -m glm_session.export"),
        ([f"model_dir={tmp_path / 'no_info'}"], f"error: {tmp_path / 'no_info'}: no {INFO_FILE}, so the template the "
                                                "model was trained with is unknown; export the run's checkpoint with "
                                                "python -m glm_session.export"),
        ([f"model_dir={tmp_path / 'no_config'}"], f"error: {tmp_path / 'no_config'}: not a model folder (no "
                                                  "config.json); model_dir= takes a folder written by glm_session.export"),
        ([f"ckpt_path={tmp_path / 'text.ckpt'}"], f"error: {tmp_path / 'text.ckpt'}: not a readable checkpoint (not a "
                                                  "file that torch.save wrote)"),
    ]:  # fmt: skip
        result = subprocess.run([sys.executable, "-m", "glm_session.chat", *arguments], input="你好\n",
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [message]


def test_a_damaged_export_folder_or_room_is_one_error(checkpoint, tmp_path):
    """A truncated weights file and a record that is not an object were tracebacks; max_seq_len=0 was replaced by the
    run's silently, and a negative one blamed generation.max_new_tokens."""
    from omegaconf import OmegaConf

    from glm_session.chat import ChatError, load_chat_model
    from glm_session.errors import ConfigError
    from glm_session.export import INFO_FILE, export

    def load(**values):
        return load_chat_model(OmegaConf.create({"ckpt_path": None, "model_dir": None, "max_seq_len": None, **values}))

    truncated, listed = export(checkpoint, tmp_path / "truncated"), export(checkpoint, tmp_path / "listed")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (listed / INFO_FILE).write_text("[]")
    with pytest.raises(ChatError, match=f"{truncated}: does not load \\(SafetensorError: "):
        load(model_dir=str(truncated))
    with pytest.raises(ChatError, match=f"{listed / INFO_FILE}: holds a JSON list, not the run record"):
        load(model_dir=str(listed))
    for room in (0, -5):
        with pytest.raises(ConfigError, match=f"max_seq_len={room}: must be an integer >= 1 or null"):
            load(ckpt_path=str(checkpoint), max_seq_len=room)
    # Session 18's audit: tracebacks (ValueError, TypeError) that named no file
    info = json.loads((listed.parent / "truncated" / INFO_FILE).read_text())
    for key, value, reason in (("template", "foo", "an unknown template 'foo' (one of chatglm2, chatglm2_article, "
                                                   "plain)"),
                               ("max_seq_len", "abc", "max_seq_len 'abc' is not a number of tokens")):  # fmt: skip
        (listed / INFO_FILE).write_text(json.dumps({**info, key: value}))
        with pytest.raises(ChatError, match=re.escape(f"{listed / INFO_FILE}: {reason}")):
            load(model_dir=str(listed))
    (tmp_path / "adapters").mkdir()  # what export --adapter writes: "takes a folder written by glm_session.export"
    (tmp_path / "adapters" / "adapter_config.json").write_text("{}")
    with pytest.raises(ChatError, match=re.escape(f"{tmp_path / 'adapters'}: LoRA adapters alone (export --adapter); "
                                                  "model_dir= takes a whole model")):  # fmt: skip
        load(model_dir=str(tmp_path / "adapters"))
    # the room is chat's max_seq_len, not data.max_seq_len (a key chat does not have)
    with pytest.raises(ConfigError, match=r"generation.max_new_tokens=30: must be at most \d+: max_seq_len=40 less"):
        Chat(*load(ckpt_path=str(checkpoint), max_seq_len=40)[:3], GenerationSettings(max_new_tokens=30), 40)


def test_a_line_that_is_not_utf8_is_not_sent(loaded):
    model, tokenizer, template, max_seq_len = loaded
    chat, out = Chat(model, tokenizer, template, GREEDY, max_seq_len), io.StringIO()
    converse(chat, [b"\xff\xfe\x80bad\n".decode("utf-8", "surrogateescape")], out)  # how stdin hands it over
    assert out.getvalue().splitlines()[1:] == ["(not sent: the line is not valid UTF-8 text)"] and chat.turns == []


def test_an_exported_folder_chats_as_its_checkpoint(checkpoint, loaded, tmp_path):
    from glm_session.export import export

    folder = export(checkpoint, tmp_path / "hf")
    model, tokenizer, template, max_seq_len = load_chat_model(
        OmegaConf.create({"ckpt_path": None, "model_dir": str(folder), "max_seq_len": None})
    )
    assert (template, max_seq_len, tokenizer.fingerprint) == (loaded[2], loaded[3], loaded[1].fingerprint)
    answers = [Chat(*setup[:3], GREEDY, setup[3]).reply("你好", io.StringIO()) for setup in (loaded, (model, tokenizer,
               template, max_seq_len))]  # fmt: skip
    assert answers[0] == answers[1]
