"""Inspect what the DataModule builds.

Usage::

    python -m glm_session.data stats  [overrides] [split=train|validation|test|all] [out=FILE.json]
    python -m glm_session.data export [overrides] [split=...] out=FILE.jsonl
    python -m glm_session.data show   [overrides] [split=...] [index=N]

Overrides are Hydra's (conf/data_tool.yaml), e.g. ``strategy=split template=chatglm2_article data.packing=true
data.max_seq_len=1024 data.path=FILE data.limit=100 tokenizer.path=DIR``.

``stats`` prints a table and writes it as JSON, with the supervised answers and tokens by turn position and, for
the supervision policy and the loss reduction (``reduction=token|sample|turn|sum``; an experiment's
``model.reduction``), each turn position's share of the gradient weight of one step holding the whole split (the
exact coefficients of ``glm_session.analysis``, summed by position) and the gradient's scale (their sum: 1 with
every weight 1 under token, sample and turn). ``export`` writes one JSON line per model row,
exactly as fed to the model (padding included, epoch 0 order): input_ids, labels, position_ids and, per token,
turn_ids, session_index and sample_index, and ``loss_weight`` (every trained label's supervision weight) when the
policy weighs turns other than 0 or 1. ``show`` prints sample N as the model sees it, its trained tokens marked
(green in a terminal, else between ``[[`` and ``]]``; a trained label that is not the input token, eos taught after
an answer where the text goes on, is shown by name before that token, ``[[</s>]]``) and each turn's weight
(``<turn k: w=...>``). Every command takes ``experiment=NAME``: that experiment's data, as training builds it, and
``supervision=...`` (conf/supervision/). A policy that trains nothing in the train split is an error.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from glm_session.config import build, compose_config
from glm_session.constants import IGNORE_INDEX
from glm_session.data.collator import ROW_FIELDS, WEIGHT_FIELD
from glm_session.data.source import SPLITS
from glm_session.errors import ConfigError, check_choice, cli_errors, file_in_the_way
from glm_session.model.loss import REDUCTIONS

COMMANDS = ("stats", "export", "show")


def format_table(stats: dict) -> str:
    width = max(len(k) for k in stats)
    lines = []
    for key, value in stats.items():
        if isinstance(value, dict):  # by turn: a table of its own
            continue
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        shown = f"{value:.4f}" if isinstance(value, float) else shown
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def gradient_shares(datamodule, split: str, reduction: str) -> tuple[dict[int, float], float]:
    """Each turn position's share of the gradient weight of one step holding all of ``split``'s samples, and the
    gradient's scale against every weight 1 (the sum of the exact coefficients: weights act in the numerator)."""
    from glm_session.analysis.report import dataset_turns
    from glm_session.analysis.weights import exact_coefficients, weights_by_turn_index

    turns = dataset_turns(datamodule, split)
    shares = {turn: float(share) for turn, share in weights_by_turn_index(turns, reduction).items()}
    return shares, float(sum(exact_coefficients(turns, reduction).values()))


def by_turn_table(stats: dict) -> str:
    """Turn position, supervised answers and tokens, and share of the gradient weight (%)."""
    shares = stats["gradient_share_by_turn"]
    lines = [f"{'turn':>4}  {'answers':>9}  {'tokens':>11}  {'gradient %':>10}  ({stats['reduction']})"]
    for turn, counts in stats["supervised_by_turn"].items():
        lines.append(f"{turn:>4}  {counts['answers']:>9,}  {counts['tokens']:>11,}  {100 * shares[turn]:>10.2f}")
    return "\n".join(lines)


def stats(datamodule, split: str, out: str | None, reduction: str = "token") -> dict:
    start = time.perf_counter()
    result = datamodule.statistics(split)
    result["reduction"] = reduction
    result["gradient_share_by_turn"], result["gradient_scale"] = gradient_shares(datamodule, split, reduction)
    result["seconds"] = round(time.perf_counter() - start, 3)
    print(format_table(result))
    print(by_turn_table(result))
    for message in datamodule.pipeline.describe_skips(split):
        print(f"skipped: {message}", file=sys.stderr)
    for warning in (datamodule.pipeline.length_warning(split), datamodule.pipeline.window_warning(split)):
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


def check_out(command: str, out: str | None, inputs: list[str] = ()) -> None:
    """``out=``, where a command writes: export needs a file; stats may write one; neither writes into a folder, a
    path under a file, or over one of the files it reads (``inputs``)."""
    if command == "export" and not out:
        raise ConfigError("out", out, "a file to write the rows to: export needs out=FILE.jsonl")
    if not out:
        return
    kind = "one JSON Lines file" if command == "export" else "one JSON file"
    if Path(out).is_dir():
        raise ConfigError("out", out, f"a file, not a folder: {command} writes {kind}")
    blocking = file_in_the_way(Path(out).parent)
    if blocking is not None:
        raise ConfigError("out", out, f"a path in a folder: {blocking} is a file")
    if Path(out).exists():
        read = next((file for file in inputs if Path(file).exists() and Path(file).samefile(out)), None)
        if read is not None:
            raise ConfigError("out", out, f"another file than those it reads ({read}): {command} would overwrite it")


def data_files(data) -> list[str]:
    """The files a data config reads: its split files or ``path`` (one or a list), and the tokenizer."""
    files = [data.get(f"{split}_path") for split in SPLITS]
    path = data.get("path")
    files += [path] if isinstance(path, str) else list(path or [])
    tokenizer = data.get("tokenizer")
    files.append(tokenizer.get("path") if tokenizer is not None and hasattr(tokenizer, "get") else None)
    return [str(f) for f in files if isinstance(f, str) and f]


def export(datamodule, split: str, out: str) -> int:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    fields = ROW_FIELDS + ((WEIGHT_FIELD,) if datamodule.pipeline.spec_of(split).supervision.weighted else ())
    with open(out, "w") as f:
        for batch in datamodule.dataloader(split):
            for b in range(batch["input_ids"].shape[0]):
                f.write(json.dumps({name: batch[name][b].tolist() for name in fields}) + "\n")
                rows += 1
    print(f"wrote {rows} rows to {out}")
    return rows


def show(datamodule, split: str, index: int, color: bool | None = None) -> str:
    """Sample ``index`` of ``split`` as text, its trained tokens marked, and before each turn its supervision
    weight (``<turn k: w=...>``; 0: the answer is context only)."""
    samples = datamodule.pipeline.prepared(split).samples
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(samples):
        raise ConfigError("index", index, f"an integer in [0, {len(samples)}): the samples of the {split} split")
    sample, tokenizer = samples[index], datamodule.tokenizer
    spec = datamodule.pipeline.spec_of(split)
    weights = spec.supervision.session_weights(len(sample["turn_weights"]) - 1)  # exact, as the policy gives them

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

    def flush() -> None:
        if run:
            pieces.append(f"{start}{as_text(run)}{end}" if trained else as_text(run))
            run.clear()

    turns = sample["turn_ids"]
    for i, (token, label) in enumerate(zip(sample["input_ids"], sample["labels"], strict=True)):
        learned = label == token and i > 0  # the input token is what this position learns
        if learned != trained:
            flush()
        trained = learned
        if turns[i] > 0 and (i == 0 or turns[i] != turns[i - 1]):  # a turn starts: its weight
            flush()
            pieces.append(f"<turn {turns[i]}: w={weights[turns[i] - 1]}>")
        if label not in (IGNORE_INDEX, token) and i > 0:  # eos taught at a position whose input goes on
            flush()
            pieces.append(f"{start}{tokenizer.convert_ids_to_tokens(label)}{end}")
        run.append(token)
    flush()
    header = (f"{split} sample {index} of {len(samples)}: session {sample['session_index']}, {spec.strategy.name} "
              f"samples, template {spec.template.name}, supervision {spec.supervision.describe()}, "
              f"{sample['length']} tokens, {sample['supervised_tokens']} trained")  # fmt: skip
    return header + "\n" + "".join(pieces)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        what = f"unknown command {argv[0]!r}" if argv else "no command"
        print(f"error: {what}: one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command, overrides = argv[0], argv[1:]
    with cli_errors():
        cfg = compose_config("data_tool", overrides)
        reduction = check_choice("reduction", cfg.reduction, REDUCTIONS)
        split = check_choice("split", cfg.split, (*SPLITS, "all"))
        check_out(command, cfg.out, data_files(cfg.data))  # before the data is built, not after the table
        datamodule = build(cfg.data)
        if split == "all":
            datamodule.pipeline.check_supervision(split)
        else:  # a split that gives no sample is an error, as for a run, not a table of zeros
            datamodule.pipeline.require_batches(split)
        if command == "stats":
            stats(datamodule, split, cfg.out, reduction)
        elif command == "export":
            export(datamodule, split, cfg.out)
        else:
            print(show(datamodule, split, cfg.index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
