"""Inspect what the DataModule builds.

Usage::

    python -m glm_session.data stats  [overrides] [split=train|validation|test|all] [out=FILE.json]
    python -m glm_session.data export [overrides] [split=...] out=FILE.jsonl
    python -m glm_session.data show   [overrides] [split=...] [index=N]

Overrides are Hydra's (conf/data_tool.yaml), e.g. ``strategy=split template=chatglm2_article data.packing=true
data.max_seq_len=1024 data.path=FILE data.limit=100 tokenizer.path=DIR``.

``stats`` prints a table and writes it as JSON. ``export`` writes one JSON line per model row, exactly as fed to
the model (padding included, epoch 0 order): input_ids, labels, position_ids and, per token, turn_ids,
session_index and sample_index. ``show`` prints sample N as the model sees it, its trained tokens marked (green in a
terminal, else between ``[[`` and ``]]``; a trained label that is not the input token, eos taught after an answer
where the text goes on, is shown by name before that token, ``[[</s>]]``). Every command takes ``experiment=NAME``: that experiment's data, as training builds it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from glm_session.config import build, compose_config
from glm_session.constants import IGNORE_INDEX
from glm_session.data.collator import ROW_FIELDS
from glm_session.errors import ConfigError, cli_errors

COMMANDS = ("stats", "export", "show")


def format_table(stats: dict) -> str:
    width = max(len(k) for k in stats)
    lines = []
    for key, value in stats.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        shown = f"{value:.4f}" if isinstance(value, float) else shown
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def stats(datamodule, split: str, out: str | None) -> dict:
    start = time.perf_counter()
    result = datamodule.statistics(split)
    result["seconds"] = round(time.perf_counter() - start, 3)
    print(format_table(result))
    for message in datamodule.pipeline.describe_skips(split):
        print(f"skipped: {message}", file=sys.stderr)
    warning = datamodule.pipeline.window_warning(split)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


def export(datamodule, split: str, out: str | None) -> int:
    if not out:
        raise ConfigError("out", out, "a file to write the rows to: export needs out=FILE.jsonl")
    if Path(out).is_dir():
        raise ConfigError("out", out, "a file, not a folder: export writes one JSON Lines file")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with open(out, "w") as f:
        for batch in datamodule.dataloader(split):
            for b in range(batch["input_ids"].shape[0]):
                f.write(json.dumps({name: batch[name][b].tolist() for name in ROW_FIELDS}) + "\n")
                rows += 1
    print(f"wrote {rows} rows to {out}")
    return rows


def show(datamodule, split: str, index: int, color: bool | None = None) -> str:
    """Sample ``index`` of ``split`` as text, its trained tokens marked."""
    samples = datamodule.pipeline.prepared(split).samples
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(samples):
        raise ConfigError("index", index, f"an integer in [0, {len(samples)}): the samples of the {split} split")
    sample, tokenizer = samples[index], datamodule.tokenizer

    def as_text(ids: list[int]) -> str:  # eos by name: SentencePiece writes control symbols as nothing
        pieces, chunk = [], []
        for i in ids:
            if i == tokenizer.eos_token_id:
                pieces += [tokenizer.decode(chunk), tokenizer.convert_ids_to_tokens(i)]
                chunk = []
            else:
                chunk.append(i)
        return "".join([*pieces, tokenizer.decode(chunk)])

    color = sys.stdout.isatty() if color is None else color
    start, end = ("\033[1;32m", "\033[0m") if color else ("[[", "]]")
    pieces, run, trained = [], [], False
    for i, (token, label) in enumerate(zip(sample["input_ids"], sample["labels"], strict=True)):
        learned = label == token and i > 0  # the input token is what this position learns
        if learned != trained and run:
            shown = as_text(run)
            pieces.append(f"{start}{shown}{end}" if trained else shown)
            run = []
        trained = learned
        if label not in (IGNORE_INDEX, token) and i > 0:  # eos taught at a position whose input goes on
            if run:
                pieces.append(f"{start}{as_text(run)}{end}" if trained else as_text(run))
                run = []
            pieces.append(f"{start}{tokenizer.convert_ids_to_tokens(label)}{end}")
        run.append(token)
    if run:
        shown = as_text(run)
        pieces.append(f"{start}{shown}{end}" if trained else shown)
    spec = datamodule.pipeline.spec_of(split)
    header = (f"{split} sample {index} of {len(samples)}: session {sample['session_index']}, {spec.strategy.name} "
              f"samples, template {spec.template.name}, {sample['length']} tokens, {sample['supervised_tokens']} trained")  # fmt: skip
    return header + "\n" + "".join(pieces)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    command, overrides = argv[0], argv[1:]
    with cli_errors():
        cfg = compose_config("data_tool", overrides)
        datamodule = build(cfg.data)
        if command == "stats":
            stats(datamodule, cfg.split, cfg.out)
        elif command == "export":
            export(datamodule, cfg.split, cfg.out)
        else:
            print(show(datamodule, cfg.split, cfg.index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
