"""Plain-text documents for pretraining a base (issue 21): the ``text`` record shape, the ``plain`` template with
``strategy=lm`` (exact ids), several files as one source, ``.xz`` files, holdout by opening, the zhbase tokenizer."""

import gzip
import json
import lzma

import pytest

from glm_session.config import RESOURCES_DIR
from glm_session.data import DataError, DialogueDataModule, Session, Turn
from glm_session.data.build import session_samples
from glm_session.data.readers import read_sessions
from glm_session.data.strategy import LanguageModelStrategy
from glm_session.data.template import PLAIN
from glm_session.errors import ConfigError
from glm_session.tokenizer import ChatGLM2Tokenizer

X = -100
GMASK, SOP, EOS = 6001, 6003, 2


def write_jsonl(path, records, compress=None):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes({None: bytes, "gz": gzip.compress, "xz": lzma.compress}[compress](text))
    return path


def test_text_records_are_documents_of_one_turn(tmp_path):
    path = write_jsonl(
        tmp_path / "docs.jsonl", [{"id": "d1", "text": "第一篇。\n第二行"}, {"id": 7, "text": "短"}]
    )
    read = read_sessions(path, format="text")
    assert read.sessions == [Session("d1", (Turn("", "第一篇。\n第二行"),)), Session("7", (Turn("", "短"),))]
    # Never guessed: a text record among dialogues is an error, not a document trained in a dialogue template.
    with pytest.raises(DataError, match=r"docs.jsonl, line 1: missing field: .* data.format=text"):
        read_sessions(path, format="auto")


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"id": "d1", "text": ""}, "'text': empty, or no visible character"),
        ({"id": "d1", "text": "\u200b \n"}, "'text': empty, or no visible character"),
        ({"id": "d1", "text": 5}, "'text'"),
        ({"id": "d1", "body": "x"}, "'text'"),
    ],
)
def test_bad_text_record_names_file_record_and_reason(tmp_path, record, reason):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"id": "d0", "text": "好"}, record])
    with pytest.raises(DataError, match=reason) as info:
        read_sessions(path, format="text")
    assert str(path) in str(info.value) and "line 2" in str(info.value)


def test_plain_lm_sample_is_the_text_after_the_prefix_then_eos(tokenizer):
    document = Session("d1", (Turn("", "你好！\n\n谢谢"),))
    (sample,), plan = session_samples(document, tokenizer, PLAIN, LanguageModelStrategy(), 2048)
    text = [416, 3548, 13, 13, 461]  # 你好 ！ <0x0A> <0x0A> 谢谢
    assert tokenizer.convert_ids_to_tokens(text) == ["你好", "！", "<0x0A>", "<0x0A>", "谢谢"]
    assert sample.input_ids == [GMASK, SOP, *text, EOS]
    assert sample.labels == [X, X, *text, EOS]  # every token of the text and the stop
    assert sample.turn_ids == [0, 0, 1, 1, 1, 1, 1, 1]
    # A document longer than a row keeps its head (without a stop) and is counted as truncated.
    (head,), plan = session_samples(document, tokenizer, PLAIN, LanguageModelStrategy(), 5)
    assert head.input_ids == [GMASK, SOP, 416, 3548, 13] and head.labels == [X, X, 416, 3548, 13]
    assert plan.views[0].answer_limit == 3


def test_xz_files_read_like_gzip_ones_and_a_cut_one_is_named(tmp_path):
    records = [{"id": f"d{i}", "text": f"文{i}"} for i in range(3)]
    xz = write_jsonl(tmp_path / "docs.jsonl.xz", records, "xz")
    gz = write_jsonl(tmp_path / "docs.jsonl.gz", records, "gz")
    assert read_sessions(xz, format="text").sessions == read_sessions(gz, format="text").sessions
    cut = tmp_path / "cut.jsonl.xz"
    cut.write_bytes(xz.read_bytes()[:-8])
    with pytest.raises(DataError, match=r"cut.jsonl.xz: not a complete xz file"):
        read_sessions(cut, format="text")


def test_several_files_are_one_source_in_order_and_split_by_holdout(tokenizer, tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl.gz", [{"id": f"a{i}", "text": f"甲{i}"} for i in range(100)], "gz")
    second = write_jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "text": f"乙{i}"} for i in range(100)])
    data = DialogueDataModule(tokenizer, template=PLAIN, strategy="lm", format="text", path=[str(first), str(second)],
                              holdout={"validation": 0.1, "test": 0.1}, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    ids = {split: [s.id for s in data.read(split).sessions] for split in ("train", "validation", "test")}
    assert sorted(sum(ids.values(), [])) == sorted([f"a{i}" for i in range(100)] + [f"b{i}" for i in range(100)])
    assert ids["train"][0].startswith("a") and ids["train"][-1].startswith("b")  # file order
    assert 5 <= len(ids["validation"]) <= 40 and 5 <= len(ids["test"]) <= 40


@pytest.mark.parametrize(
    ("template", "strategy", "format"),
    [("chatglm2", "lm", "text"), ("plain", "session", "text"), ("plain", "lm", "auto")],
)
def test_text_goes_with_the_plain_template_and_lm_only(tokenizer, template, strategy, format):
    with pytest.raises(ConfigError, match="data.format="):
        DialogueDataModule(tokenizer, template=template, strategy=strategy, format=format)


def test_holdout_by_opening_keeps_sessions_that_open_alike_in_one_split(tokenizer, tmp_path):
    # 60 openings, each opening 4 sessions (different ids, different later turns).
    records = [
        {"id": f"s{o}_{k}", "messages": [{"role": "user", "content": f"开场{o}"}, {"role": "assistant", "content": "嗯"},
                                         {"role": "user", "content": f"后来{k}"}, {"role": "assistant", "content": "好"}]}
        for o in range(60) for k in range(4)
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "d.jsonl", records)
    holdout = {"validation": 0.2, "test": 0.2}
    by_opening = DialogueDataModule(tokenizer, path=str(path), holdout=holdout, holdout_by="opening")
    split_of = {}
    for split in ("train", "validation", "test"):
        for session in by_opening.read(split).sessions:
            split_of.setdefault(session.turns[0].question, set()).add(split)
    assert len(split_of) == 60 and all(len(splits) == 1 for splits in split_of.values())
    assert {next(iter(s)) for s in split_of.values()} == {"train", "validation", "test"}
    by_id = DialogueDataModule(tokenizer, path=str(path), holdout=holdout)  # the default: each session on its own
    mixed = {}
    for split in ("train", "validation", "test"):
        for session in by_id.read(split).sessions:
            mixed.setdefault(session.turns[0].question, set()).add(split)
    assert any(len(splits) > 1 for splits in mixed.values())
    summary = by_opening.pipeline.source.summary("test", tmp_path)
    assert summary["openings"] == sum(1 for s in split_of.values() if s == {"test"})
    assert summary["sessions"] == 4 * summary["openings"]
    with pytest.raises(ConfigError, match="data.holdout_by='turn'"):
        DialogueDataModule(tokenizer, path=str(path), holdout=holdout, holdout_by="turn")
    with pytest.raises(ConfigError, match="data.holdout_by='opening': must be id with data.format=text"):
        DialogueDataModule(tokenizer, template=PLAIN, strategy=LanguageModelStrategy(), path=str(path),
                           holdout=holdout, holdout_by="opening", format="text")  # fmt: skip


def test_the_zhbase_tokenizer_keeps_chatglm2s_layout():
    tokenizer = ChatGLM2Tokenizer.from_pretrained(RESOURCES_DIR / "tokenizer_zhbase")
    assert len(tokenizer) == 16005
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    specials = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]  # after the SentencePiece pieces, as in ChatGLM2
    assert [tokenizer.convert_tokens_to_ids(t) for t in specials] == [16000, 16001, 16002, 16003, 16004]
    assert tokenizer.convert_ids_to_tokens(tokenizer.sp.encode("你好！谢谢")) == ["你好", "！", "谢谢"]


def test_a_plain_text_base_is_evaluated_in_the_dialogue_template(tmp_path, cache_dir):
    from glm_session.config import compose_config
    from glm_session.evaluate import evaluate
    from glm_session.train import train

    documents = [{"id": f"d{i}", "text": f"第{i}篇。天地玄黄，宇宙洪荒。"} for i in range(40)]
    path = write_jsonl(tmp_path / "docs.jsonl", documents)
    run = tmp_path / "base"
    overrides = ["experiment=unseen/pretrain", "model=chatglm2-tiny", f"data.path=[{path}]", "trainer.max_epochs=1",
                 "data.holdout={validation: 0.2, test: 0.1}", "data.num_workers=0", "data.pin_memory=false",
                 f"data.cache_dir={cache_dir}", f"output_dir={run}"]  # fmt: skip
    metrics, _ = train(compose_config("train", overrides))
    assert metrics["run_info"]["template"] == "plain" and metrics["run_info"]["strategy"] == "lm"
    cfg = compose_config("evaluate", [f"ckpt_path={run}/checkpoints/last.ckpt", "data.limit=3", "limit=1",
                                      "generation.max_new_tokens=2", f"output_dir={tmp_path / 'eval'}",
                                      f"data.cache_dir={cache_dir}"])  # fmt: skip
    evaluation = evaluate(cfg)  # KdConv's test sessions, in the chatglm2 template and the base's own tokenizer
    assert evaluation["template"] == "chatglm2" and evaluation["teacher_forced"]["sessions"] == 3
