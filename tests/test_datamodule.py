"""The DataModule on the bundled KdConv: statistics, the datasets cache, holdout, and the two commands."""

import gzip
import json

import pytest

import glm_session.data.build as build
from glm_session.config import RESOURCES_DIR
from glm_session.data import DialogueDataModule
from glm_session.data.__main__ import main as data_main
from glm_session.data.__main__ import show
from glm_session.data.collator import ROW_FIELDS
from glm_session.supervision import TurnWeights

KDCONV = {split: str(RESOURCES_DIR / f"kdconv/{split}.jsonl") for split in ("train", "validation", "test")}


def kdconv(tokenizer, cache_dir, **kwargs) -> DialogueDataModule:
    paths = {f"{split}_path": path for split, path in KDCONV.items()}
    return DialogueDataModule(tokenizer, cache_dir=cache_dir, **paths, **kwargs)


@pytest.mark.slow
def test_kdconv_targets(tokenizer, cache_dir):
    """DESIGN §4 data targets on all 900 sessions, template chatglm2, max_seq_len 2048."""
    stats = {
        (strategy, packing): kdconv(
            tokenizer, cache_dir, strategy=strategy, packing=packing, batch_tokens=16384
        ).statistics("all")
        for strategy in ("split", "session")
        for packing in (False, True)
    }
    split, session = stats["split", False], stats["session", False]
    assert split["sessions"] == session["sessions"] == 900
    assert split["samples"] == split["turns"] == session["turns"]
    assert session["samples"] == 900
    assert split["supervised_tokens"] == session["supervised_tokens"]
    assert split["input_tokens"] >= 4 * session["input_tokens"]
    assert stats["session", True]["padding_fraction"] < 0.02
    assert all(
        s["truncated_turns"] == s["skipped_turns"] == s["dropped_history_turns"] == 0 for s in stats.values()
    )


def test_second_build_reads_the_cache(tokenizer, tmp_path, monkeypatch):
    first = kdconv(tokenizer, str(tmp_path), strategy="session", limit=20).pipeline.prepared("train")

    def tokenize_again(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(build, "_build_batch", tokenize_again)
    second = kdconv(tokenizer, str(tmp_path), strategy="session", limit=20).pipeline.prepared("train")
    assert second.samples["input_ids"] == first.samples["input_ids"]
    with pytest.raises(AssertionError, match="tokenized again"):  # a different input does build
        kdconv(tokenizer, str(tmp_path), strategy="session", limit=21).pipeline.prepared("train")


def test_holdout_is_deterministic_by_session(tokenizer, tmp_path):
    path = tmp_path / "one.jsonl.gz"
    lines = [
        json.dumps(
            {
                "id": f"s{i}",
                "messages": [
                    {"role": "user", "content": f"问{i}"},
                    {"role": "assistant", "content": f"答{i}"},
                ],
            }
        )
        for i in range(200)
    ]
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    datamodule = DialogueDataModule(
        tokenizer, path=str(path), holdout={"validation": 0.1, "test": 0.1}, cache_dir=str(tmp_path)
    )
    ids = {split: [s.id for s in datamodule.read(split).sessions] for split in ("train", "validation", "test")}
    assert sum(map(len, ids.values())) == 200 and 10 <= len(ids["validation"]) <= 30
    assert ids["train"] == sorted(ids["train"], key=lambda s: int(s[1:]))  # file order within a split
    again = DialogueDataModule(tokenizer, path=str(path), holdout={"validation": 0.1, "test": 0.1})
    assert [s.id for s in again.read("validation").sessions] == ids["validation"]
    everything = DialogueDataModule(tokenizer, path=str(path))  # no holdout: all sessions train, in order
    assert [s.id for s in everything.read("train").sessions] == [f"s{i}" for i in range(200)]


def test_stats_command(tmp_path, capsys):
    out = tmp_path / "stats.json"
    code = data_main(
        [
            "stats",
            "strategy=split",
            "data.packing=true",
            "data.limit=10",
            f"data.cache_dir={tmp_path}",
            f"out={out}",
        ]
    )
    assert code == 0
    stats = json.loads(out.read_text())
    for key in ("strategy", "packing", "sessions", "turns", "samples", "rows", "input_tokens", "supervised_tokens",
                "padding_tokens", "truncated_turns", "dropped_history_turns", "windows", "skipped_records"):  # fmt: skip
        assert key in stats
    assert (stats["strategy"], stats["packing"], stats["sessions"]) == ("split", True, 10)
    assert "input_tokens" in capsys.readouterr().out


def test_export_command_writes_rows_as_fed(tmp_path, tokenizer):
    out = tmp_path / "rows.jsonl"
    assert (
        data_main(["export", "data.packing=true", "data.limit=5", f"data.cache_dir={tmp_path}", f"out={out}"]) == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    datamodule = kdconv(tokenizer, str(tmp_path), strategy="session", packing=True, limit=5, batch_tokens=16384)
    expected = [
        {name: batch[name][b].tolist() for name in ROW_FIELDS}
        for batch in datamodule.dataloader("train")
        for b in range(len(batch["input_ids"]))
    ]
    assert rows == expected
    packed = next(r for r in rows if r["position_ids"].count(0) > 1)  # a row with two samples restarts at 0
    starts = [i for i, p in enumerate(packed["position_ids"]) if p == 0]
    assert packed["input_ids"][starts[1] : starts[1] + 2] == tokenizer.prefix_ids


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        data_main(argv)
    return exit_.value.code


def test_commands_report_bad_data_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    assert exit_code(["stats", f"data.path={bad}", f"data.cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}, line 1: message 1: the session ends with a user message" in err
    assert "Traceback" not in err
    assert exit_code(["stats", "strategy=sliding"]) == 2
    assert "strategy" in capsys.readouterr().err
    assert exit_code(["export", "data.limit=1", f"data.cache_dir={tmp_path}"]) == 2  # no out=


@pytest.mark.parametrize(
    "argv,message",
    [
        (["stats", "split=foo"], "error: split='foo': must be one of train, validation, test, all"),  # a traceback
        # A split without samples: a table of zeros (exit 0) before.
        (["stats", "data.train_path=null"], "error: no train data: give data.train_path (or data.path with data."),
        (["show", "split=validation", "data.validation_path=null"], "error: no validation data: give data."),
        # A holdout of the split files did nothing.
        (["stats", "data.holdout={validation: 0.5}"], "error: data.holdout={'validation': 0.5}: must be null without "
                                                      "data.path"),
        (["statz"], "error: unknown command 'statz': one of stats, export, show"),
        # A folder as out=: stats printed its whole table, then failed to write.
        (["stats", "out={tmp}"], "error: out='{tmp}': must be a file, not a folder: stats writes one JSON file"),
    ],
)
def test_data_tool_refuses_what_it_used_to_take(tmp_path, capsys, argv, message):
    argv, message = [a.replace("{tmp}", str(tmp_path)) for a in argv], message.replace("{tmp}", str(tmp_path))
    if argv == ["statz"]:  # refused before any config: returned, not raised
        assert data_main(argv) == 2
    else:
        assert exit_code([*argv, "data.limit=5", f"data.cache_dir={tmp_path}"]) == 2
    out, err = capsys.readouterr()
    assert message in err and "Traceback" not in err
    assert out == ""  # refused before any table


def test_data_tool_refuses_what_session_18s_audit_found_taken(tmp_path, capsys):
    mine = tmp_path / "mine.jsonl"
    mine.write_bytes(open(KDCONV["test"], "rb").read())
    (tmp_path / "a_file").write_text("x")
    cases = [
        # out= one of the files it reads: the dialogues were replaced by rows (export) or by the table (stats)
        (["export", f"data.path={mine}", f"out={mine}"],
         f"error: out='{mine}': must be another file than those it reads ({mine}): export would overwrite it"),
        (["stats", f"data.path={mine}", f"out={tmp_path}/../{tmp_path.name}/mine.jsonl"], "stats would overwrite it"),
        (["export", f"out={tmp_path}/a_file/rows.jsonl"],
         f"error: out='{tmp_path}/a_file/rows.jsonl': must be a path in a folder: {tmp_path}/a_file is a file"),
        (["stats", f"data.cache_dir={tmp_path}/a_file"],  # "a_file: File exists", naming no key
         f"error: data.cache_dir='{tmp_path}/a_file': must be a folder for the sample cache: {tmp_path}/a_file is a"),
        (["stats", f"data.path=[{mine},{tmp_path}/./mine.jsonl]"],  # its sessions twice (without ids: no error)
         f"must be a list of distinct files ({mine} and {tmp_path}/./mine.jsonl are one)"),
        (["stats", "data.path=''"], "error: data.path='': must be a file or a non-empty list of files"),  # was "."
        (["stats", "data.train_path=''"], "error: data.train_path='': must be a file, or null"),
        (["stats", "data.role_map={1: user}"],  # a traceback: 'int' object has no attribute 'lower'
         "error: data.role_map={1: 'user'}: must be a mapping from role names (strings) to system, user or"),
        (["stats", f"data.path={mine}", "data.holdout={validation: 0.99}"],  # "0 sessions read": 90 were
         f"error: {mine}: no train sample: data.holdout={{'validation': 0.99}} puts none of the 90 sessions read in it"),
    ]  # fmt: skip
    for argv, message in cases:
        assert exit_code([*argv, f"data.cache_dir={tmp_path / 'cache'}"] if "cache_dir" not in argv[-1] else argv) == 2
        out, err = capsys.readouterr()
        assert message in err and "Traceback" not in err and out == "", (argv, err)
    assert mine.read_bytes() == open(KDCONV["test"], "rb").read()


def test_the_sample_cache_knows_a_files_name_and_a_damaged_cache_is_built_again(tmp_path, capsys, caplog):
    lines = open(KDCONV["test"], "rb").read()
    (tmp_path / "data.jsonl").write_bytes(lines)
    (tmp_path / "data.json").write_bytes(lines)  # JSON Lines in a file named .json: not one JSON value
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    assert data_main(["stats", f"data.path={tmp_path / 'data.jsonl'}", cache]) == 0
    # The same bytes under another name were read from the first file's cache, unchecked, and trained (exit 0)
    assert exit_code(["stats", f"data.path={tmp_path / 'data.json'}", cache]) == 2
    assert f"error: {tmp_path / 'data.json'}: invalid JSON: Extra data at line 2" in capsys.readouterr().err
    for damaged in [*(tmp_path / "cache").glob("samples-*.arrow"), *(tmp_path / "cache").glob("read-*.json")]:
        damaged.write_bytes(damaged.read_bytes()[:100])  # tracebacks before (ArrowInvalid, JSONDecodeError)
    capsys.readouterr()
    assert data_main(["stats", f"data.path={tmp_path / 'data.jsonl'}", cache]) == 0
    assert "sessions" in capsys.readouterr().out
    assert "a damaged sample cache" in caplog.text and "a damaged summary of a read" in caplog.text


def test_tokenizer_path_and_smile_config(tmp_path, tokenizer):
    """``tokenizer.path=DIR`` loads a saved tokenizer; ``data=smile`` reads client/counselor sessions, drops and
    counts trailing questions, skips and counts records that are not dialogues."""
    tokenizer.save_pretrained(tmp_path / "tok")
    smile = tmp_path / "smile.jsonl.gz"
    records = [
        {"id": "smile-0", "messages": [{"role": "client", "content": "我很焦虑"}, {"role": "counselor", "content": "我在听"}, {"role": "client", "content": "谢谢"}]},
        {"id": "smile-1", "messages": [{"role": "client", "content": "只有问题"}]},
        {"id": "smile-2", "messages": [{"role": "client", "content": "你好"}, {"role": "counselor", "content": "你好"}]},
    ]  # fmt: skip
    smile.write_bytes(gzip.compress("\n".join(json.dumps(r, ensure_ascii=False) for r in records).encode()))
    out = tmp_path / "stats.json"
    args = ["stats", "data=smile", f"data.path={smile}", "data.holdout=null", f"tokenizer.path={tmp_path / 'tok'}"]
    assert data_main([*args, f"data.cache_dir={tmp_path}", f"out={out}"]) == 0
    stats = json.loads(out.read_text())
    assert (stats["sessions"], stats["skipped_records"], stats["dropped_trailing_questions"]) == (2, 1, 1)


def test_long_sessions_cut_into_windows_are_reported_with_what_split_would_cost(tokenizer, tmp_path):
    messages = []
    for i in range(40):
        messages += [{"role": "user", "content": f"第{i}个问题：今天天气怎么样？"},
                     {"role": "assistant", "content": f"第{i}个回答：天气很好，可以去公园散步。"}]  # fmt: skip
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"id": "long", "messages": messages}, ensure_ascii=False) + "\n")

    def data(strategy: str, max_seq_len: int) -> DialogueDataModule:
        return DialogueDataModule(tokenizer, strategy=strategy, path=str(path), max_seq_len=max_seq_len,
                                  batch_size=4, cache_dir=str(tmp_path))  # fmt: skip

    session, split = data("session", 256).statistics("train"), data("split", 256).statistics("train")
    assert session["cut_sessions"] == 1 and session["windows"] > 10
    assert session["window_tokens"] == session["input_tokens"]  # the one session is all windows
    assert session["window_split_tokens"] == split["input_tokens"]  # exactly what its split samples take
    warning = data("session", 256).pipeline.window_warning("train")
    assert warning.startswith(
        f"1 train sessions longer than data.max_seq_len=256 were cut into {session['windows']}"
    )
    assert session["window_tokens"] > 0.5 * session["window_split_tokens"]
    whole = data("session", 4096)
    assert whole.statistics("train")["windows"] == 0 and whole.pipeline.window_warning("train") is None


def test_turns_skipped_or_cut_by_max_seq_len_are_warned_with_their_counts(tokenizer, tmp_path):
    """A short data.max_seq_len dropped most turns of a run, said only in data_stats.json."""
    long_question = "这是一个很长的问题，" * 30
    sessions = [
        {"id": "a", "messages": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "好"},
                                 {"role": "user", "content": "短问题"}, {"role": "assistant", "content": "好的"}]},
        {"id": "b", "messages": [{"role": "user", "content": "你好"},
                                 {"role": "assistant", "content": "这是一个很长的回答。" * 30}]},
    ]  # fmt: skip
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in sessions))

    def data(max_seq_len: int) -> DialogueDataModule:
        return DialogueDataModule(tokenizer, strategy="split", path=str(path), max_seq_len=max_seq_len, batch_size=4,
                                  cache_dir=str(tmp_path))  # fmt: skip

    stats = data(64).statistics("train")
    assert (stats["turns"], stats["skipped_turns"], stats["truncated_turns"]) == (3, 1, 1)
    assert data(64).pipeline.length_warning("train") == (
        "train: of 3 turns, 1 skipped (the question alone is longer) and 1 answers cut short at data.max_seq_len=64; "
        "a larger data.max_seq_len keeps them whole"
    )
    assert data(4096).pipeline.length_warning("train") is None


def test_show_prints_a_sample_as_the_model_sees_it(tokenizer, tmp_path):
    path = tmp_path / "three.jsonl"
    messages = [{"role": r, "content": c} for q, a in (("你好", "你好！"), ("你知道", "知道呀"), ("谢谢", "不客气"))
                for r, c in (("user", q), ("assistant", a))]  # fmt: skip
    path.write_text(json.dumps({"id": "s0", "messages": messages}, ensure_ascii=False) + "\n")
    data = DialogueDataModule(tokenizer, path=str(path), cache_dir=str(tmp_path))
    shown = show(data, "train", 0, color=False)  # trained: 2 + 1 + 1 answer tokens and 3 stops
    assert shown == (
        "train sample 0 of 1: session 0, session samples, template chatglm2, supervision all, 53 tokens, 7 trained\n"
        "[gMASK]sop<turn 1: w=1>[Round 1]\n\n问：你好\n\n答：[[你好！]][[</s>]]\n\n<turn 2: w=1>[Round 2]\n\n问：你知道"
        "\n\n答：[[知道呀]][[</s>]]\n\n<turn 3: w=1>[Round 3]\n\n问：谢谢\n\n答：[[不客气</s>]]"
    )
    # Weights by position: turn 1 context only (no stop taught), turn 2 weighs 1/2, turn 3 (the rest) 3/2.
    weighted = DialogueDataModule(tokenizer, path=str(path), cache_dir=str(tmp_path),
                                  supervision=TurnWeights((0, 0.5), rest=1.5))  # fmt: skip
    assert show(weighted, "train", 0, color=False) == (
        "train sample 0 of 1: session 0, session samples, template chatglm2, supervision positions weights=[0,0.5] "
        "rest=1.5, 53 tokens, 4 trained\n"
        "[gMASK]sop<turn 1: w=0>[Round 1]\n\n问：你好\n\n答：你好！\n\n<turn 2: w=1/2>[Round 2]\n\n问：你知道"
        "\n\n答：[[知道呀]][[</s>]]\n\n<turn 3: w=3/2>[Round 3]\n\n问：谢谢\n\n答：[[不客气</s>]]"
    )
