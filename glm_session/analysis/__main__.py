"""Per-turn gradient weights.

Usage::

    python -m glm_session.analysis article-toy          # the article's numbers, from its attribution model
    python -m glm_session.analysis exact-toy [supervision=...]         # token-level weights of the same toy batch
    python -m glm_session.analysis report  [overrides] [out_dir=DIR]   # a dataset: JSON, table, bar chart
    python -m glm_session.analysis measure [overrides] [out_dir=DIR]   # exact vs autograd on a real batch

Overrides are Hydra's (conf/analysis.yaml), e.g. ``data=smile data.limit=2000 data.batch_tokens=16384
accumulate=4 measure.sessions=4 supervision=last``. Every command but ``article-toy`` takes the supervision policy
(``supervision=all|last|from_turn|positions|rising``, conf/supervision/).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig

from glm_session.analysis.article import ARTICLE_TOY, article_toy
from glm_session.analysis.toy import exact_toy
from glm_session.config import build, compose_config
from glm_session.data.source import SPLITS
from glm_session.data.strategy import get_strategy
from glm_session.errors import ConfigError, check_choice, check_int, cli_errors, file_in_the_way

COMMANDS = ("article-toy", "exact-toy", "report", "measure")


def toy(cfg: DictConfig) -> dict:
    """The toy batch's exact shares under the policy of ``cfg``, and each pair's gradient scale: the sum of its
    coefficients, 1 when every weight is 1 (weights act in the numerator only). Printed as a table."""
    from glm_session.analysis.toy import toy_turns
    from glm_session.analysis.weights import exact_coefficients

    supervision = build(cfg.supervision)
    if not any(w for s in ARTICLE_TOY for w in supervision.session_weights(len(s))):
        raise ConfigError("supervision", supervision.describe(), "a policy that trains some answer of the toy batch "
                          "(every turn weight is 0: nothing to share)")  # fmt: skip
    shares = exact_toy(supervision=supervision)
    scale = {
        name: sum(
            exact_coefficients(toy_turns(name.split("+")[0], supervision=supervision), name.split("+")[1]).values()
        )
        for name in shares
    }
    weights = {" ".join(s): supervision.session_weights(len(s)) for s in ARTICLE_TOY}
    lines = [
        f"supervision: {supervision.describe()}",
        "turn weights: " + "; ".join(f"({s}) {', '.join(map(str, w))}" for s, w in weights.items()),
        f"{'':16}{'a':>8}{'b':>8}{'c':>8}{'scale':>8}",
    ]
    for name, by_content in shares.items():
        cells = [str(by_content.get(content, 0)) for content in "abc"]
        lines.append(f"{name:16}" + "".join(f"{c:>8}" for c in [*cells, str(scale[name])]))
    print("\n".join(lines))
    return {"supervision": supervision.describe(), "shares": shares, "scale": scale}


def data_for(cfg: DictConfig, strategy: str, **data_overrides):
    """The data of ``cfg`` built with ``strategy`` (and other data settings); a split without samples is an error,
    not a report of zeros."""
    split = check_choice("split", cfg.split, (*SPLITS, "all"))
    data = build(cfg.data, strategy=get_strategy(strategy), **data_overrides)
    if split in ("validation", "test") and data.supervision.name != "all":
        raise ConfigError(
            "split", split, f"train or all with supervision={data.supervision.describe()}: validation and test "
            "samples train every answer with weight 1, whatever the policy"
        )  # fmt: skip
    if split == "all":  # as the data tool checks it
        data.pipeline.check_supervision(split)
    else:
        data.pipeline.require_batches(split)
    return data


def check_out_dir(out_dir: str) -> None:
    """``out_dir``: a folder, or a path where one can be made (a file there was "File exists")."""
    blocking = file_in_the_way(out_dir)
    if blocking is not None:
        raise ConfigError("out_dir", out_dir, f"a folder to write into: {blocking} is a file")


def report(cfg: DictConfig) -> dict:
    from glm_session.analysis.report import weight_report, write_report

    check_out_dir(cfg.out_dir)
    accumulate = check_int("accumulate", cfg.accumulate, minimum=1)
    datas = {strategy: data_for(cfg, strategy) for strategy in ("split", "session")}
    result = weight_report(datas, accumulate, cfg.split)
    title = (
        f"{Path(str(cfg.data.train_path or cfg.data.path)).parent.name} {cfg.split}, template {cfg.template.name}, "
        f"supervision {datas['session'].supervision.describe()}"
    )
    write_report(result, cfg.out_dir, title)
    print((Path(cfg.out_dir) / "weights.md").read_text())
    print(f"wrote {cfg.out_dir}/weights.json, weights.md, weights.png")
    return result


def measure(cfg: DictConfig) -> dict:
    import torch
    from transformers import GlmForCausalLM

    from glm_session.analysis.measured import measured_weights, turn_directions
    from glm_session.analysis.report import dataset_turns
    from glm_session.analysis.weights import exact_coefficients
    from glm_session.model import PRESETS, chatglm2_config, padded_vocab_size

    check_out_dir(cfg.out_dir)
    sessions = check_int("measure.sessions", cfg.measure.sessions, minimum=1)
    if not cfg.measure.ckpt_path:
        check_choice("measure.model", cfg.measure.model, tuple(PRESETS))
    results = {}
    for strategy in ("split", "session"):
        data = data_for(cfg, strategy, limit=sessions, packing=False, batch_tokens=None, batch_size=10**6)
        if cfg.measure.ckpt_path:
            from glm_session.checkpoints import CheckpointError, load_model

            model, info = load_model(cfg.measure.ckpt_path, merge_adapters=False)  # a LoRA run: its adapters' gradients
            if info.tokenizer_fingerprint != data.tokenizer.fingerprint:
                raise CheckpointError(
                    f"{cfg.measure.ckpt_path}: trained with tokenizer {info.tokenizer_fingerprint} "
                    f"({info.tokenizer_path or 'the bundled one'}), not with {data.tokenizer.vocab_file} "
                    f"({data.tokenizer.fingerprint}): give the run's tokenizer (tokenizer=... or tokenizer.path=...)"
                )  # fmt: skip
            if info.template != data.template.name:  # its samples would be measured in a format it never saw
                raise CheckpointError(f"{cfg.measure.ckpt_path}: trained with template={info.template}, not with "
                                      f"template={data.template.name}: give template={info.template}")  # fmt: skip
        else:
            torch.manual_seed(cfg.seed)
            model = GlmForCausalLM(
                chatglm2_config(cfg.measure.model, vocab_size=padded_vocab_size(len(data.tokenizer)))
            )
        model.float().eval()
        batch = next(iter(data.dataloader(cfg.split)))
        in_batch = set(batch["sample_index"][:, 0].tolist())  # one sample a row
        turns = [t for t in dataset_turns(data, cfg.split) if t.sample in in_batch]
        directions = turn_directions(model, batch)
        for reduction in ("token", "sample", "turn"):
            exact = {k: float(v) for k, v in exact_coefficients(turns, reduction).items()}
            measured, residual = measured_weights(model, batch, reduction, directions=directions)
            error = max(abs(measured[k] - exact[k]) for k in exact)
            results[f"{strategy}+{reduction}"] = {
                "turns": len(exact), "max_abs_error": error, "relative_residual": residual,
                "exact": {f"{s}:{t}": v for (s, t), v in exact.items()},
                "measured": {f"{s}:{t}": v for (s, t), v in measured.items()},
            }  # fmt: skip
            print(f"{strategy}+{reduction}: {len(exact)} turns, max |measured - exact| = {error:.2e}")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "measured.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {cfg.out_dir}/measured.json")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else ""
    if command not in COMMANDS:
        print(__doc__, file=sys.stderr)
        what = f"unknown command {command!r}" if command else "no command"
        print(f"error: {what}: one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command == "article-toy":
        if argv[1:]:  # the article's own batch and attribution: nothing to set
            print(f"error: article-toy takes no overrides, got {' '.join(argv[1:])}", file=sys.stderr)
            return 2
        print(json.dumps(article_toy()))
        return 0
    with cli_errors():
        cfg = compose_config("analysis", argv[1:])
        {"exact-toy": toy, "report": report, "measure": measure}[command](cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
