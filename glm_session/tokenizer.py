"""ChatGLM2's tokenizer: a SentencePiece model plus five special tokens, without ``trust_remote_code``.

It reproduces ``tokenization_chatglm.py`` of THUDM/chatglm2-6b id for id:

- ``encode(text, add_special_tokens=False)`` is the SentencePiece encoding of ``text``;
- ``encode(text)`` puts ``[gMASK] sop`` in front (ChatGLM2's ``get_prefix_tokens``);
- ``[MASK] [gMASK] [sMASK] sop eop`` take the ids right after the SentencePiece vocabulary
  (64789..64793 for the real ``tokenizer.model``);
- eos is SentencePiece's eos (2) and pad is its unk (0).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from glm_session.errors import UserError

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
PREFIX_TOKENS = ("[gMASK]", "sop")
VOCAB_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
BUNDLED_TOKENIZER_DIR = Path(__file__).parent / "resources" / "tokenizer"


class TokenizerError(UserError, ValueError):
    """A ``tokenizer.model`` that cannot be ChatGLM2's: not SentencePiece, or without the ids ChatGLM2 uses."""


class TokenizerNotFound(UserError, FileNotFoundError):
    """No ``tokenizer.model`` at the path given."""


class ChatGLM2Tokenizer:
    """SentencePiece tokenizer with ChatGLM2's special tokens and ids.

    Args:
        vocab_file: path of a SentencePiece ``tokenizer.model``.
    """

    def __init__(self, vocab_file: str | os.PathLike) -> None:
        self.vocab_file = Path(vocab_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.vocab_file))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{self.vocab_file}: not a SentencePiece model ({err})") from None
        if not 0 <= self.sp.eos_id() < self.sp.vocab_size():  # trained with --eos_id=-1 (unk always exists)
            raise TokenizerError(
                f"{self.vocab_file}: the SentencePiece model has no eos piece (id {self.sp.eos_id()}): ChatGLM2 ends "
                "every answer with eos; train it with an eos id (ChatGLM2's is 2)"
            )
        self.sp_vocab_size = self.sp.vocab_size()
        self.special_tokens = {tok: self.sp_vocab_size + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.special_ids = {i: tok for tok, i in self.special_tokens.items()}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None) -> ChatGLM2Tokenizer:
        """Load from a folder holding ``tokenizer.model`` (or the file itself); ``None`` = bundled small one."""
        path = Path(path) if path is not None else BUNDLED_TOKENIZER_DIR
        vocab_file = path / VOCAB_FILE if path.is_dir() else path
        if not vocab_file.is_file():
            raise TokenizerNotFound(f"{path}: no {VOCAB_FILE} (a ChatGLM2 SentencePiece model) found")
        return cls(vocab_file)

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """Write ``tokenizer.model`` and ``tokenizer_config.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / VOCAB_FILE).write_bytes(self.sp.serialized_model_proto())
        config = {
            "tokenizer_class": type(self).__name__,
            "special_tokens": SPECIAL_TOKENS,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "vocab_size": len(self),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return [directory / VOCAB_FILE, directory / CONFIG_FILE]

    # ids -------------------------------------------------------------------------------------------

    @property
    def eos_token_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_token_id(self) -> int:
        return self.sp.bos_id()

    @property
    def pad_token_id(self) -> int:
        return self.sp.unk_id()

    @property
    def prefix_ids(self) -> list[int]:
        """``[gMASK] sop``, in front of every ChatGLM2 input."""
        return [self.special_tokens[t] for t in PREFIX_TOKENS]

    def __len__(self) -> int:
        return self.sp_vocab_size + len(SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        return len(self)

    @cached_property
    def fingerprint(self) -> str:
        """Hash of the SentencePiece model: equal fingerprints encode equally."""
        return hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()[:16]

    # text <-> ids ----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """SentencePiece ids of ``text``, with ``[gMASK] sop`` in front unless ``add_special_tokens=False``."""
        ids = self.sp.encode(text)
        return self.prefix_ids + ids if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """``encode(text, add_special_tokens=False)`` for many texts in one SentencePiece call."""
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are written by name unless ``skip_special_tokens``."""
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self.special_ids:
                pieces.append(self.sp.decode(run))
                run = []
                if not skip_special_tokens:
                    pieces.append(self.special_ids[i])
            elif 0 <= i < self.sp_vocab_size:
                if not (skip_special_tokens and self.sp.is_control(i)):
                    run.append(i)
            else:
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(self)})")
        pieces.append(self.sp.decode(run))
        return "".join(pieces)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.special_tokens.get(tokens, self.sp.piece_to_id(tokens))
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.special_ids.get(ids) or self.sp.id_to_piece(ids)
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    def tokenize(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_file={str(self.vocab_file)!r}, size={len(self)})"
