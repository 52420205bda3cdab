"""Convert KdConv (thu-coai/KdConv, Apache-2.0) into the bundled train/validation/test files.

KdConv dialogues alternate speakers and the first speaker asks, so utterance 2i is the user's and
2i+1 the assistant's. A trailing unanswered utterance is dropped and counted. The knowledge triples
(``attrs``) are not used. Every source file (film/music/travel x dev/test, 150 dialogues each) is
split by dialogue index: index % 10 == 8 -> validation, == 9 -> test, else train (720/90/90).

Usage::

    python -m glm_session.resources.build_kdconv --src ../shared/data/kdconv
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

DOMAINS = ("film", "music", "travel")
SOURCE_SPLITS = ("dev", "test")
OUT_DIR = Path(__file__).parent / "kdconv"


def split_of(index: int) -> str:
    """Deterministic split of a dialogue from its index inside its source file."""
    return {8: "validation", 9: "test"}.get(index % 10, "train")


def convert(src: Path, out: Path = OUT_DIR) -> dict[str, int]:
    """Write ``{train,validation,test}.jsonl`` (OpenAI messages shape) and return the counts."""
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    dropped_trailing = 0
    for domain in DOMAINS:
        for source_split in SOURCE_SPLITS:
            dialogues = json.loads((src / domain / f"{source_split}.json").read_text(encoding="utf-8"))
            for index, dialogue in enumerate(dialogues):
                texts = [m["message"] for m in dialogue["messages"]]
                if len(texts) % 2:
                    texts = texts[:-1]
                    dropped_trailing += 1
                messages = [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": text}
                    for i, text in enumerate(texts)
                ]
                rows[split_of(index)].append(
                    {
                        "id": f"kdconv-{domain}-{source_split}-{index:03d}",
                        "topic": dialogue["name"],
                        "messages": messages,
                    }
                )
    for split, records in rows.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    shutil.copyfile(src / "LICENSE", out / "LICENSE")
    counts = {split: len(records) for split, records in rows.items()}
    counts["dropped_trailing_utterances"] = dropped_trailing
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("../shared/data/kdconv"))
    args = parser.parse_args()
    print(json.dumps(convert(args.src), indent=2))


if __name__ == "__main__":
    main()
