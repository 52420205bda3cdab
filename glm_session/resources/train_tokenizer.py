"""Train the small bundled SentencePiece models (ChatGLM2 layout): from the bundled KdConv training split (the
default tokenizer), or from zhbase alone (``--corpus zhbase``: the tokenizer of bases pretrained on plain text, which
has never seen a fine-tuning dialogue).

The real ChatGLM2 ``tokenizer.model`` (64,789 pieces) cannot be downloaded here, so the small models and the
tests use this one: BPE, byte fallback (so every text encodes, newlines included), unk=0 / bos=1 / eos=2 as in
ChatGLM2, identity normalisation (so ``decode(encode(text)) == text``) and no dummy prefix (so a segment's ids
do not depend on where it stands). Training is single-threaded on a fixed input, hence reproducible.

Usage::

    python -m glm_session.resources.train_tokenizer            # writes glm_session/resources/tokenizer/
    python -m glm_session.resources.train_tokenizer --corpus zhbase --vocab-size 16000 \
        --out glm_session/resources/tokenizer_zhbase             # every line of ../shared/data/zhbase (46 s)
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
from pathlib import Path

import sentencepiece as spm

HERE = Path(__file__).parent
TRAIN_FILE = HERE / "kdconv" / "train.jsonl"
OUT_DIR = HERE / "tokenizer"
ZHBASE_FILES = ("books_pd.jsonl.gz", "laws.jsonl.gz", "medqa_sample.jsonl.gz")
# Template text the tokenizer should encode compactly (both ChatGLM2 templates).
TEMPLATE_LINES = [f"[Round {i}]" for i in range(40)] + ["问：", "答："]


def training_lines(train_file: Path = TRAIN_FILE) -> list[str]:
    lines = []
    with open(train_file, encoding="utf-8") as f:
        for line in f:
            lines.extend(m["content"] for m in json.loads(line)["messages"])
    return lines + TEMPLATE_LINES


def zhbase_lines(folder: Path) -> list[str]:
    """Every non-empty line of zhbase's passages, in file order, and the template lines."""
    lines = []
    for name in ZHBASE_FILES:
        with gzip.open(folder / name, "rt", encoding="utf-8") as f:
            for record in f:
                lines.extend(line for line in json.loads(record)["text"].split("\n") if line)
    return lines + TEMPLATE_LINES


def train(vocab_size: int, out_dir: Path = OUT_DIR, lines: list[str] | None = None) -> Path:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines if lines is not None else training_lines()),
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
        max_sentence_length=8192,
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
    parser.add_argument("--corpus", choices=("kdconv", "zhbase"), default="kdconv")
    parser.add_argument("--zhbase", type=Path, default=HERE.parents[1] / ".." / "shared" / "data" / "zhbase")
    args = parser.parse_args()
    path = train(args.vocab_size, args.out, zhbase_lines(args.zhbase) if args.corpus == "zhbase" else None)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
