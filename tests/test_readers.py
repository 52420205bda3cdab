"""Readers: three record shapes in .json/.jsonl/.jsonl.gz round-trip; every bad input names file, record, reason."""

import gzip
import json

import pytest

from glm_session.data import DataError, Session, Turn
from glm_session.data.readers import read_sessions

SESSIONS = [
    Session("a", (Turn("你好", "你好！"), Turn("你知道", "知道呀"))),
    Session("b", (Turn("谢谢", "不客气"),), system="你是一个乐于助人的助手。"),
]


def sharegpt(s: Session) -> dict:
    conversations = [
        m for t in s.turns for m in ({"from": "human", "value": t.question}, {"from": "gpt", "value": t.answer})
    ]
    return {"id": s.id, "conversations": conversations, **({"system": s.system} if s.system else {})}


def openai(s: Session) -> dict:
    messages = [{"role": "system", "content": s.system}] if s.system else []
    messages += [
        m
        for t in s.turns
        for m in ({"role": "user", "content": t.question}, {"role": "assistant", "content": t.answer})
    ]
    return {"id": s.id, "messages": messages}


def chatglm(s: Session) -> dict:
    *history, last = s.turns
    record = {
        "id": s.id,
        "prompt": last.question,
        "response": last.answer,
        "history": [[t.question, t.answer] for t in history],
    }
    return {**record, **({"system": s.system} if s.system else {})}


def write(path, records, kind):
    if kind == "json":
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        return
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(text) if kind == "jsonl.gz" else text)


@pytest.mark.parametrize("shape", [sharegpt, openai, chatglm])
@pytest.mark.parametrize("kind", ["json", "jsonl", "jsonl.gz"])
def test_round_trip(tmp_path, shape, kind):
    path = tmp_path / f"data.{kind}"
    write(path, [shape(s) for s in SESSIONS], kind)
    assert read_sessions(path).sessions == SESSIONS
    forced = {sharegpt: "sharegpt", openai: "openai", chatglm: "chatglm"}[shape]
    assert read_sessions(path, format=forced).sessions == SESSIONS


def test_role_map_and_limit(tmp_path):
    path = tmp_path / "smile.jsonl"
    record = {"messages": [{"role": "client", "content": "我很焦虑"}, {"role": "counselor", "content": "我在听"}]}
    write(path, [record, record, record], "jsonl")
    result = read_sessions(path, role_map={"client": "user", "counselor": "assistant"}, limit=2)
    assert [s.turns for s in result.sessions] == [(Turn("我很焦虑", "我在听"),)] * 2
    assert [s.id for s in result.sessions] == ["smile.jsonl:line 1", "smile.jsonl:line 2"]


def test_trailing_question_is_an_error_or_a_counted_drop(tmp_path):
    path = tmp_path / "d.jsonl"
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    write(path, [{"messages": messages}], "jsonl")
    with pytest.raises(DataError, match=r"d.jsonl, line 1: message 3: the session ends with a user message"):
        read_sessions(path)
    result = read_sessions(path, drop_trailing_question=True)
    assert result.sessions[0].turns == (Turn("q1", "a1"),) and result.dropped_trailing_questions == 1


def msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


BAD_RECORDS = [
    (msgs(("user", "q"), ("tool", "x")), "message 2: unknown role 'tool'"),
    (msgs(("user", "q1"), ("user", "q2"), ("assistant", "a")), "message 2: two user messages in a row"),
    (
        msgs(("user", "q"), ("assistant", "a1"), ("assistant", "a2")),
        "message 3: assistant message without a user",
    ),
    (msgs(("assistant", "a"), ("user", "q")), "message 1: assistant message without a user message"),
    (msgs(("user", "q"), ("assistant", "  ")), "message 2: empty assistant text"),
    (
        msgs(("user", "q"), ("assistant", "a"), ("system", "s")),
        "message 3: a system message may only come first",
    ),
    (msgs(("user", "q")), "message 1: the session ends with a user message"),
    (msgs(), "no answered user message"),
    ({"messages": [{"role": "user"}]}, "message 1: missing field 'content'"),
    ({"messages": [{"role": "user", "content": 3}]}, "message 1: 'content' must be str, got int"),
    ({"messages": "hi"}, "'messages' must be list, got string"),
    ({"messages": ["hi"]}, "message 1 must be an object, got string"),
    ({"conversations": [{"from": "human", "value": None}]}, "message 1: 'value' must be str, got null"),
    ({"prompt": "q"}, "missing field 'response'"),
    (
        {"prompt": "q", "response": "a", "history": [["q0"]]},
        "history[0] must be [question, answer], got list",
    ),
    # Wrong types are errors, not read as something else (an empty history, an id from the record number).
    *(
        ({"prompt": "q", "response": "a", "history": bad}, "'history' must be a list of [question, answer]")
        for bad in ("", 0, {}, False)
    ),  # fmt: skip
    ({"prompt": "q", "response": "a", "history": [["q0", "a0"], [3, "a1"]]}, "history[1][0] must be a string"),
    ({"prompt": "q", "response": "a", "history": [["q0", " "]]}, "history[0][1]: empty assistant text"),
    ({"id": 7.5, **msgs(("user", "q"), ("assistant", "a"))}, "'id' must be a string or an integer, got float"),
    ({"id": True, **msgs(("user", "q"), ("assistant", "a"))}, "'id' must be a string or an integer, got boolean"),
    # A system field comes before the messages but is not one of them: message numbers stay those of the list.
    (
        {"system": "s", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]},
        "message 2: two user messages in a row",
    ),
    ({"text": "q"}, "missing field: expected 'conversations', 'messages' or 'prompt'/'response'"),
    (["q", "a"], "a record must be a JSON object, got list"),
    # Two dialogues in one record: 'conversations' was read and 'messages' dropped without a word.
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
         "messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
        "both 'conversations' and 'messages': a record holds one dialogue (or set data.format)",
    ),  # fmt: skip
    ({"messages": [], "prompt": "q", "response": "a"}, "both 'messages' and 'prompt' and 'response'"),
    # Session 18's audit: taken before, and trained.
    ({"id": "", **msgs(("user", "q"), ("assistant", "a"))}, "'id': empty (give a session id, or leave 'id' out)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad", "weight": 0}]},
     "message 2: 'weight': 0: OpenAI's per-message weight is not read"),  # the answer was trained all the same
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": "1"}]},
     "message 2: 'weight': \"1\": OpenAI's per-message weight is not read"),
    (msgs(("user", "a\u0000b"), ("assistant", "c")), "message 1: a control character U+0000 at character 2"),
    (msgs(("user", "q"), ("assistant", "\u001b[31mred")), "message 2: a control character U+001B at character 1"),
    (msgs(("user", "q"), ("assistant", "ding\u0007")), "message 2: a control character U+0007 at character 5"),
]


@pytest.mark.parametrize("record,reason", BAD_RECORDS)
def test_bad_record_names_file_record_and_reason(tmp_path, record, reason):
    path = tmp_path / "bad.jsonl"
    good = msgs(("user", "q"), ("assistant", "a"))
    write(path, [good, record], "jsonl")
    with pytest.raises(DataError) as err:
        read_sessions(path)
    assert str(err.value).startswith(f"{path}, line 2: ")
    assert reason in str(err.value)
    result = read_sessions(path, on_error="skip")
    assert len(result.sessions) == 1 and len(result.skipped) == 1


def test_bad_json_record_is_counted_as_record_number(tmp_path):
    path = tmp_path / "bad.json"
    write(path, [msgs(("user", "q"), ("assistant", "a")), msgs(("user", "q"))], "json")
    with pytest.raises(DataError, match=r"bad.json, record 2: message 1: the session ends with a user message"):
        read_sessions(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    good = json.dumps(msgs(("user", "q"), ("assistant", "a"))).encode()
    path.write_bytes(good + b"\n" + good.replace(b'"q"', b'"caf\xe9"') + b"\n")
    with pytest.raises(DataError, match=r"latin.jsonl, line 2: not valid UTF-8 \(byte 0xe9 at column"):
        read_sessions(path)
    assert len(read_sessions(path, on_error="skip").skipped) == 1
    whole = tmp_path / "latin.json"
    whole.write_bytes(b'[{"messages": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"latin.json: not valid UTF-8 \(byte 0xe9 on line 1\)"):
        read_sessions(whole, on_error="skip")  # a whole-file problem cannot be skipped


def test_truncated_json(tmp_path):
    path = tmp_path / "cut.jsonl"
    good = json.dumps(msgs(("user", "q"), ("assistant", "a")))
    path.write_text(good + "\n" + good[:20] + "\n")
    with pytest.raises(DataError, match=r"cut.jsonl, line 2: invalid JSON: Unterminated string"):
        read_sessions(path)
    whole = tmp_path / "cut.json"
    whole.write_text("[" + good + ", " + good[:20])
    with pytest.raises(DataError, match=r"cut.json: invalid JSON: .* at line 1 column"):
        read_sessions(whole)


def test_truncated_gzip(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    data = gzip.compress(("\n".join([json.dumps(msgs(("user", "q"), ("assistant", "a")))] * 100)).encode())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: not a complete gzip file"):
        read_sessions(path)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: no such file"):
        read_sessions(tmp_path / "nope.jsonl")
    (tmp_path / "data.csv").write_text("q,a\n")
    with pytest.raises(DataError, match=r"data.csv: unknown file type"):
        read_sessions(tmp_path / "data.csv")


def test_lone_surrogate_is_a_record_error(tmp_path):
    # JSON lets a string hold "\\ud800"; no UTF-8 text can, and the samples' Arrow file would fail on it later.
    path = tmp_path / "surrogate.jsonl"
    good = json.dumps(msgs(("user", "q"), ("assistant", "a")))
    bad = good.replace('"a"', '"ab\\ud800"')
    path.write_text(good + "\n" + bad + "\n" + good.replace('"q"', '"q\\udfff"') + "\n")
    with pytest.raises(
        DataError, match=r"surrogate.jsonl, line 2: message 2: a lone surrogate \\ud800 at character 3"
    ):
        read_sessions(path)
    result = read_sessions(path, on_error="skip")
    assert len(result.sessions) == 1 and len(result.skipped) == 2
    assert "line 3: message 1: a lone surrogate \\udfff at character 2" in str(result.skipped[1])


@pytest.mark.parametrize(
    "line,reason",
    [
        ("[" * 100_000 + "]" * 100_000, "invalid JSON: nested too deeply"),
        (
            '{"id": ' + "9" * 5000 + "}",
            "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion",
        ),
    ],
)
def test_json_that_python_cannot_read_is_a_record_error(tmp_path, line, reason):
    path = tmp_path / "deep.jsonl"
    good = json.dumps(msgs(("user", "q"), ("assistant", "a")))
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        read_sessions(path)
    assert str(err.value).startswith(f"{path}, line 2: {reason}")
    assert len(read_sessions(path, on_error="skip").sessions) == 1
    whole = tmp_path / "deep.json"
    whole.write_text("[" + good + ", " + line + "]")
    with pytest.raises(DataError) as err:
        read_sessions(whole)
    assert str(err.value).startswith(f"{whole}: {reason}")


def test_duplicate_session_ids_name_both_records(tmp_path):
    path = tmp_path / "dup.jsonl"
    records = [{"id": i, **msgs(("user", "q"), ("assistant", "a"))} for i in ("a", 7, "b", "7")]
    write(path, records, "jsonl")
    with pytest.raises(
        DataError, match=rf"dup.jsonl, line 4: duplicate session id '7' \(first at {path}, line 2\)"
    ):
        read_sessions(path)
    result = read_sessions(path, on_error="skip")
    assert [s.id for s in result.sessions] == ["a", "7", "b"] and len(result.skipped) == 1
    # Across the files of one read too.
    write(path, records[:3], "jsonl")
    other = tmp_path / "other.jsonl"
    write(other, records[:1], "jsonl")
    with pytest.raises(
        DataError, match=rf"other.jsonl, line 1: duplicate session id 'a' \(first at {path}, line 1\)"
    ):
        read_sessions([path, other])
    # Records without ids are told apart by their place in the file: never duplicates.
    write(path, [msgs(("user", "q"), ("assistant", "a"))] * 2, "jsonl")
    assert len(read_sessions(path).sessions) == 2


def test_a_folder_is_not_a_missing_file(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}: a folder, not a file"):
        read_sessions(tmp_path)


def test_openai_weight_1_is_what_every_answer_gets_and_is_taken(tmp_path):
    path = tmp_path / "weights.jsonl"
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1}]}
    write(path, [record], "jsonl")
    assert read_sessions(path).sessions == [Session("weights.jsonl:line 1", (Turn("q", "a"),))]


def test_tab_newline_and_carriage_return_are_text(tmp_path):
    path = tmp_path / "text.jsonl"
    write(path, [msgs(("user", "第一行\n第二行\t列"), ("assistant", "好\r\n"))], "jsonl")
    assert read_sessions(path).sessions[0].turns == (Turn("第一行\n第二行\t列", "好\r\n"),)


def test_a_key_twice_in_an_object_is_an_error_not_the_last_one_kept(tmp_path):
    first = '{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}'
    second = '{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}'
    good = json.dumps(msgs(("user", "q"), ("assistant", "a")))
    path = tmp_path / "dupkey.jsonl"
    path.write_text(good + "\n" + f'{{"messages": [{first}], "messages": [{second}]}}' + "\n")
    with pytest.raises(DataError) as err:
        read_sessions(path)
    assert str(err.value) == (
        f"{path}, line 2: invalid JSON: the key 'messages' twice in one object (JSON readers keep only the last)"
    )
    assert len(read_sessions(path, on_error="skip").sessions) == 1
    inner = tmp_path / "inner.json"  # in a message, in a .json array: the file cannot be read
    inner.write_text('[{"messages": [{"role": "user", "content": "q", "content": "q2"}]}]')
    with pytest.raises(DataError, match=r"inner.json: invalid JSON: the key 'content' twice in one object"):
        read_sessions(inner)


def test_a_utf8_byte_order_mark_is_an_encoding_mark_not_a_record(tmp_path):
    records = [msgs(("user", "q"), ("assistant", "a"))]
    for kind in ("jsonl", "json"):
        path = tmp_path / f"bom.{kind}"
        write(path, records, kind)
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        assert [s.turns for s in read_sessions(path).sessions] == [(Turn("q", "a"),)]


def test_every_xz_stream_is_read_and_bytes_after_them_are_an_error(tmp_path):
    import lzma

    one, two = (json.dumps(msgs(("user", q), ("assistant", "a"))).encode() + b"\n" for q in ("q1", "q2"))
    path = tmp_path / "streams.jsonl.xz"
    path.write_bytes(lzma.compress(one) + b"\0" * 8 + lzma.compress(two) + b"\0" * 4)  # padding allowed by xz
    assert [s.turns[0].question for s in read_sessions(path).sessions] == ["q1", "q2"]
    damaged = bytearray(lzma.compress(two))
    damaged[0] ^= 0xFF
    for tail, where in ((bytes(damaged), "from byte"), (b"garbage!", "from byte")):
        path.write_bytes(lzma.compress(one) + tail)  # lzma.decompress read q1 and dropped the rest without a word
        with pytest.raises(DataError, match=rf"streams.jsonl.xz: the bytes after xz stream 1 \({where} "):
            read_sessions(path)
    path.write_bytes(lzma.compress(one)[:-10])
    with pytest.raises(DataError, match=r"streams.jsonl.xz: not a complete xz file"):
        read_sessions(path)


def test_an_empty_compressed_file_is_read_as_an_empty_file(tmp_path):
    for name in ("empty.jsonl", "empty.jsonl.gz", "empty.jsonl.xz"):
        (tmp_path / name).write_bytes(b"")
        assert read_sessions(tmp_path / name).sessions == []


def test_a_pipe_a_device_and_a_link_to_nothing_are_named_for_what_they_are(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.jsonl")
    with pytest.raises(DataError, match=r"fifo.jsonl: not a regular file \(a pipe, socket or device\)"):
        read_sessions(tmp_path / "fifo.jsonl")
    with pytest.raises(DataError, match=r"/dev/null: not a regular file"):
        read_sessions("/dev/null")
    (tmp_path / "a.jsonl").symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "a.jsonl")
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "missing.jsonl")
    for name in ("a.jsonl", "gone.jsonl"):
        with pytest.raises(DataError, match=rf"{name}: a symbolic link to nothing"):
            read_sessions(tmp_path / name)
