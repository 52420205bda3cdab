"""glm_session.export: a tiny run's checkpoint becomes a folder that plain transformers loads (the same weights), a
fast AutoTokenizer with ChatGLM2Tokenizer's ids, greedy generation that agrees with ours, and clear errors."""

import json

import pytest
import torch
from transformers import AutoTokenizer, GlmForCausalLM

from glm_session.checkpoints import load_model
from glm_session.config import RESOURCES_DIR
from glm_session.data import CHATGLM2
from glm_session.data.chat_template import add_chat_template, jinja_chat_template
from glm_session.data.session import Turn
from glm_session.data.template import CHATGLM2_ARTICLE, prompt_text
from glm_session.export import ExportError, export, main
from glm_session.tokenizer import ChatGLM2Tokenizer

HISTORY = [Turn("你知道《泰坦尼克号》吗？", "知道，1997年上映。")]
PROMPT = prompt_text(CHATGLM2.render_prompt("谁导演的？", HISTORY))
TEXTS = [
    "你好",
    "[Round 1]\n\n问：你好\n\n答：",
    "The Shawshank Redemption (1994), directed by Frank Darabont.",
    "电话 13800138000，价格 ¥1,299.00，3.14159",
    "  indented\n\tcode:\n    return x  \n\n\n",
    "混合 mixed 文本 text，標點！？\r\n",
    "😀 🇨🇳 𝔘 \u200b\u3000 é",
    "",
    PROMPT,
    prompt_text(CHATGLM2_ARTICLE.render_prompt("谁导演的？", HISTORY)),
]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("exported") / "hf"
    main([str(checkpoint), str(dst)])
    return dst


def test_the_folder_holds_the_checkpoints_weights_and_metadata(checkpoint, exported):
    assert {p.name for p in exported.iterdir()} - {"chat_template.jinja"} == {  # its own file in transformers 5.2x
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "tokenizer.model", "glm_session.json",
    }  # fmt: skip
    assert AutoTokenizer.from_pretrained(exported).chat_template == jinja_chat_template(
        CHATGLM2, "[gMASK]sop", "</s>"
    )
    model, info = GlmForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert {f"model.{name}" for name in model.state_dict()} == set(state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[f"model.{name}"]), name

    generation = json.loads((exported / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (2, 0)
    assert generation["suppress_tokens"] == list(
        range(6005, 6144)
    )  # the vocabulary's padding: no text decodes to it
    metadata = json.loads((exported / "glm_session.json").read_text())
    assert metadata["template"] == "chatglm2" and metadata["strategy"] == "session"
    assert metadata["tokenizer_fingerprint"] == ChatGLM2Tokenizer.from_pretrained(exported).fingerprint
    assert metadata["checkpoint"] == str(checkpoint)


def test_without_a_chat_template_and_a_template_that_does_not_fit(checkpoint, tokenizer, tmp_path, monkeypatch):
    export(checkpoint, tmp_path / "plain", chat_template=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "plain").chat_template is None
    assert AutoTokenizer.from_pretrained(tmp_path / "plain")("[gMASK]")["input_ids"] == tokenizer.encode("[gMASK]")
    # A tokenizer whose chat template would not give the project's ids (here: a template that numbers rounds
    # differently from the run's) is refused, naming the way out.
    import glm_session.export as exporting

    monkeypatch.setattr(exporting, "add_chat_template", lambda fast, template, prefix, eos: add_chat_template(
        fast, CHATGLM2_ARTICLE, prefix, eos))  # fmt: skip
    with pytest.raises(ExportError, match="--no-chat-template"):
        export(checkpoint, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_dtype(checkpoint, tmp_path):
    main([str(checkpoint), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    model = GlmForCausalLM.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16 and model.config.dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_auto_tokenizer_ids_are_ours(exported, tokenizer):
    fast = AutoTokenizer.from_pretrained(exported)
    assert fast.is_fast and len(fast) == len(tokenizer) == 6005
    assert (fast.eos_token_id, fast.pad_token_id) == (2, 0)
    specials = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
    assert fast.convert_tokens_to_ids(specials) == [6000, 6001, 6002, 6003, 6004]
    # Written out by hand: [gMASK] sop, then "[" "Round" "▁" "1" "]" "\n" "\n" "问" "：" "你好" "\n" "\n" "答" "：",
    # newlines by byte fallback (<0x0A> = 3 + 10).
    expected = [6001, 6003, 4123, 901, 3451, 3402, 4124, 13, 13, 3796, 3711, 416, 13, 13, 4603, 3711]
    assert fast("[Round 1]\n\n问：你好\n\n答：")["input_ids"] == expected
    assert fast("你好")["input_ids"] == [6001, 6003, 416]
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert fast(text)["input_ids"] == ids, text
        assert fast(text, add_special_tokens=False)["input_ids"] == ids[2:], text
        assert fast.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True), text
    assert ChatGLM2Tokenizer.from_pretrained(exported).encode(PROMPT) == tokenizer.encode(PROMPT)
    # Special-token strings typed in a text are the special tokens (as chat tokenizers read them: the chat template
    # writes "[gMASK]sop"); SentencePiece reads them as text. "▁" is 3451.
    assert fast("[gMASK] sop </s> eop")["input_ids"] == [6001, 6003, 6001, 3451, 6003, 3451, 2, 3451, 6004]
    assert tokenizer.encode("[gMASK] sop </s> eop")[2:] != [6001, 3451, 6003, 3451, 2, 3451, 6004]


def test_the_chat_template_gives_the_runs_prompt(exported, tokenizer):
    fast = AutoTokenizer.from_pretrained(exported)
    messages = [{"role": "user", "content": HISTORY[0].question}, {"role": "assistant", "content": HISTORY[0].answer},
                {"role": "user", "content": "谁导演的？"}]  # fmt: skip
    assert fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == "[gMASK]sop" + PROMPT
    ids = fast.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == tokenizer.encode(PROMPT)  # the project's segment-wise ids are the whole text's for this prompt


def test_bundled_dialogues_tokenize_alike(exported, tokenizer):
    fast = AutoTokenizer.from_pretrained(exported)
    texts = []
    for line in (RESOURCES_DIR / "kdconv" / "validation.jsonl").read_text().splitlines():
        m = json.loads(line)["messages"]
        turns = [Turn(m[i]["content"], m[i + 1]["content"]) for i in range(0, len(m) - 1, 2)]
        texts += [prompt_text(CHATGLM2.render_turns(turns)), prompt_text(CHATGLM2_ARTICLE.render_turns(turns))]
    assert fast(texts)["input_ids"] == [tokenizer.encode(text) for text in texts]


def test_plain_transformers_generation_equals_ours(checkpoint, exported, tokenizer):
    model = GlmForCausalLM.from_pretrained(exported).eval()
    inputs = AutoTokenizer.from_pretrained(exported)(PROMPT, return_tensors="pt")
    greedy = {"do_sample": False, "max_new_tokens": 5, "min_new_tokens": 5}
    plain = model.generate(**inputs, **greedy)
    ours = torch.tensor([tokenizer.encode(PROMPT)])
    assert torch.equal(plain, model.generate(ours, attention_mask=torch.ones_like(ours), **greedy))
    trained, _ = load_model(checkpoint)
    assert torch.equal(plain, trained.eval().generate(ours, attention_mask=torch.ones_like(ours), **greedy))
    assert plain.shape == (1, ours.shape[1] + 5)


# errors ------------------------------------------------------------------------------------------


def exit_message(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_missing_corrupt_and_foreign_checkpoints(tmp_path, capsys):
    missing = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert exit_message(capsys, missing, tmp_path / "out") == f"error: {missing}: no such checkpoint file\n"

    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    assert exit_message(capsys, corrupt, tmp_path / "out") == (
        f"error: {corrupt}: not a complete checkpoint (truncated or corrupt)\n"
    )
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    assert exit_message(capsys, foreign, tmp_path / "out").startswith(
        f"error: {foreign}: not a glm_session training checkpoint (no 'glm_session' entry"
    )
    assert (
        exit_message(capsys, tmp_path, tmp_path / "out") == f"error: {tmp_path}: a folder, not a checkpoint file\n"
    )
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    torch.save({}, sharded / "meta.pt")  # what trainer=fsdp writes beside the shards
    assert exit_message(capsys, sharded, tmp_path / "out").startswith(
        f"error: {sharded}: a sharded (trainer=fsdp) checkpoint folder"
    )
    assert not (tmp_path / "out").exists()


def test_another_tokenizer_or_a_used_folder(checkpoint, tmp_path, capsys):
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    content["glm_session"]["tokenizer_fingerprint"] = "0123456789abcdef"
    other = tmp_path / "other.ckpt"
    torch.save(content, other)
    with pytest.raises(ExportError, match=r"other.ckpt: trained with tokenizer 0123456789abcdef, not with "):
        export(other, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "config.json").write_text("{}")
    message = exit_message(capsys, checkpoint, tmp_path / "used")
    assert message == f"error: {tmp_path / 'used'}: exists and is not an empty folder\n"
