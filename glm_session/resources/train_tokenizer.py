"""Train the small bundled SentencePiece model (ChatGLM2 layout) from the bundled KdConv training split.

The real ChatGLM2 ``tokenizer.model`` (64,789 pieces) cannot be downloaded here, so the small models and the
tests use this one: BPE, byte fallback (so every text encodes, newlines included), unk=0 / bos=1 / eos=2 as in
ChatGLM2, identity normalisation (so ``decode(encode(text)) == text``) and no dummy prefix (so a segment's ids
do not depend on where it stands). Training is single-threaded on a fixed input, hence reproducible.

Usage::

    python -m glm_session.resources.train_tokenizer            # writes glm_session/resources/tokenizer/
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import sentencepiece as spm

HERE = Path(__file__).parent
TRAIN_FILE = HERE / "kdconv" / "train.jsonl"
OUT_DIR = HERE / "tokenizer"
# Template text the tokenizer should encode compactly (both ChatGLM2 templates).
TEMPLATE_LINES = [f"[Round {i}]" for i in range(40)] + ["问：", "答："]


def training_lines(train_file: Path = TRAIN_FILE) -> list[str]:
    lines = []
    with open(train_file, encoding="utf-8") as f:
        for line in f:
            lines.extend(m["content"] for m in json.loads(line)["messages"])
    return lines + TEMPLATE_LINES


def train(vocab_size: int, out_dir: Path = OUT_DIR) -> Path:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=6000)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    path = train(args.vocab_size, args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
