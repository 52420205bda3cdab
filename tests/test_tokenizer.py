"""ChatGLM2Tokenizer: ids, special tokens, decode, save/load, and ChatGLM2's own algorithm."""

import os
from pathlib import Path

import pytest
import sentencepiece as spm

from glm_session import ChatGLM2Tokenizer


def test_special_tokens_follow_the_sentencepiece_vocabulary(tokenizer):
    assert tokenizer.sp_vocab_size == 6000
    assert len(tokenizer) == 6005
    assert tokenizer.convert_tokens_to_ids(["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]) == [
        6000, 6001, 6002, 6003, 6004,
    ]  # fmt: skip
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_encode_puts_gmask_sop_in_front(tokenizer):
    assert tokenizer.encode("你好", add_special_tokens=False) == [416]
    assert tokenizer.encode("你好") == [6001, 6003, 416]
    assert tokenizer.encode("[Round 1]\n\n问：", add_special_tokens=False) == [
        4123, 901, 3451, 3402, 4124, 13, 13, 3796, 3711,
    ]  # fmt: skip
    assert tokenizer.convert_ids_to_tokens([4123, 901, 3451, 3402, 4124, 13]) == [
        "[", "Round", "▁", "1", "]", "<0x0A>",
    ]  # fmt: skip


def test_decode_round_trips_and_names_special_tokens(tokenizer):
    text = "[Round 1]\n\n问：你知道艾玛·斯通吗？ hello 2024\n\n答："
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    ids = tokenizer.encode("你好") + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids) == "[gMASK]sop你好"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "你好"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([len(tokenizer)])


def test_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = ChatGLM2Tokenizer.from_pretrained(tmp_path)
    assert loaded.fingerprint == tokenizer.fingerprint
    assert loaded.encode("谢谢，不客气") == tokenizer.encode("谢谢，不客气")
    assert ChatGLM2Tokenizer.from_pretrained(tmp_path / "tokenizer.model").fingerprint == tokenizer.fingerprint


def test_missing_or_bad_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        ChatGLM2Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        ChatGLM2Tokenizer.from_pretrained(tmp_path)


def test_a_sentencepiece_model_without_eos_is_refused(tmp_path):
    """ChatGLM2 ends answers with eos; a model trained without it gave an IndexError deep in the sample building
    before this check (an unk piece SentencePiece always has: it is the pad)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"第{i}句话，你好世界。hello world {i}" for i in range(300)) + "\n")
    spm.SentencePieceTrainer.train(f"--input={corpus} --model_prefix={tmp_path / 'sp'} --vocab_size=80 --eos_id=-1 "
                                   "--character_coverage=1.0 --minloglevel=2")  # fmt: skip
    with pytest.raises(ValueError, match="sp.model: the SentencePiece model has no eos piece \\(id -1\\)"):
        ChatGLM2Tokenizer.from_pretrained(tmp_path / "sp.model")


class ChatGLM2Reference:
    """ChatGLM2's tokenization_chatglm.py algorithm, restated: SPTokenizer ids, specials after the vocabulary,
    ``build_inputs_with_special_tokens`` = [gMASK] sop + ids."""

    def __init__(self, model_file: str) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        n = self.sp.vocab_size()
        self.special = {t: n + i for i, t in enumerate(["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"])}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.sp.piece_to_id(p) for p in self.sp.encode_as_pieces(text)]
        return [self.special["[gMASK]"], self.special["sop"]] + ids if add_special_tokens else ids


@pytest.mark.parametrize("text", ["你好", "[Round 1]\n\n问：谢谢\n\n答：", "2004年06月25日 ok", "🙂 罕见字：龘"])
def test_matches_chatglm2_algorithm(tokenizer, text):
    reference = ChatGLM2Reference(str(tokenizer.vocab_file))
    assert tokenizer.encode(text) == reference.encode(text)
    assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)


@pytest.mark.skipif(
    not os.environ.get("GLM_SESSION_CHATGLM2_TOKENIZER"),
    reason="set GLM_SESSION_CHATGLM2_TOKENIZER to a folder holding ChatGLM2-6B's tokenizer.model",
)
def test_real_chatglm2_tokenizer():
    tokenizer = ChatGLM2Tokenizer.from_pretrained(Path(os.environ["GLM_SESSION_CHATGLM2_TOKENIZER"]))
    assert len(tokenizer) == 64794
    assert tokenizer.convert_tokens_to_ids(["[gMASK]", "sop"]) == [64790, 64792]
    # Published ids (THUDM/ChatGLM2-6B issue #221): encode("你好") with and without the prefix.
    assert tokenizer.encode("你好") == [64790, 64792, 36474, 54591]
    assert tokenizer.encode("你好", add_special_tokens=False) == [36474, 54591]
