"""Merge the driver's ``summary.json`` files (one a call, ``raw/``) into ``results.json`` and ``tables.md``.

    python experiments/unseen_base/aggregate.py [raw/*.json]

What is declared before the runs (README "Declared before the runs") is applied here, not chosen after them:
- a rate is chosen per arm + reduction on the **last** validation loss of its run (seed 0, base 0); the choice is
  **interior** when the grid holds a lower and a higher rate, both with a higher last validation loss;
- the gate: the session+token run at the chosen rate must end at least ``GATE_NATS`` below the base's step-0 test
  answer loss on SMILE.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).parent
GATE_NATS = 0.3


def merge(paths: list[Path]) -> dict:
    merged: dict = {"runs": {}, "base_eval": {}, "data": {}, "jobs": {}}
    for path in paths:  # in order: a later call's record of a job replaces an earlier one's
        summary = json.loads(path.read_text())
        for key in merged:
            merged[key].update(summary.get(key, {}))
    return merged


def pretraining(runs: dict) -> dict:
    bases = {}
    for name, run in sorted(runs.items()):
        if name.startswith("pretrain/"):
            curve = run["val_curve"]
            bases[name.removeprefix("pretrain/")] = {
                "status": run["status"],
                "steps": run["global_steps"],
                "epochs": len(curve),
                "tokens": run["input_tokens"],
                "val_loss_by_epoch": [round(point["loss"], 4) for point in curve],
                "train_seconds": round(run["train_seconds"], 1),
                "tokens_per_second": round(run["tokens_per_second"]),
            }
    return bases


def step0(base_eval: dict) -> dict:
    """Each base's test answer loss and official ROUGE/BLEU before any fine-tuning, per corpus and seed."""
    result: dict = {}
    for name, metrics in sorted(base_eval.items()):
        corpus, seed = name.rsplit("_", 1)
        result.setdefault(corpus, {})[seed] = {
            "test_loss": round(metrics["teacher_forced"]["loss"], 4),
            "test_sessions": metrics["sessions"],
            "generated_sessions": metrics["generated_sessions"],
            "official": {k: round(v, 2) for k, v in metrics["chatglm2_official"].items()},
        }
    return result


def grids(runs: dict) -> dict:
    """Per arm + reduction: every rate's last and best validation loss, its test loss, the chosen rate."""
    result: dict = {}
    for name, run in runs.items():
        if not name.startswith(("grid/", "pilot/")) or run["status"] != "completed":
            continue
        arm, rate = name.split("/", 1)[1].rsplit("_lr", 1)
        losses = [point["loss"] for point in run["val_curve"]]
        entry = result.setdefault(arm, {"rates": {}})
        entry["rates"][rate] = {
            "val_last": round(losses[-1], 4),
            "val_best": round(min(losses), 4),
            "val_curve": [round(x, 4) for x in losses],
            "test_loss": round(run["test"]["teacher_forced"]["loss"], 4),
            "official": {k: round(v, 2) for k, v in run["test"]["chatglm2_official"].items()},
            "steps": run["global_steps"],
        }
    for entry in result.values():
        rates = sorted(entry["rates"], key=float)
        entry["rates"] = {rate: entry["rates"][rate] for rate in rates}
        chosen = min(rates, key=lambda r: entry["rates"][r]["val_last"])
        entry["chosen"] = chosen
        entry["interior"] = 0 < rates.index(chosen) < len(rates) - 1
        entry["decades"] = round(math.log10(float(rates[-1]) / float(rates[0])), 2)
    return result


def gate(bases: dict, lr_grid: dict) -> dict:
    arm = lr_grid.get("smile_session+token")
    if arm is None or "smile" not in bases:
        return {"passed": None, "why": "not run"}
    base = bases["smile"]["seed0"]["test_loss"]
    pilot = arm["rates"][arm["chosen"]]["test_loss"]
    return {
        "base_step0_test_loss": base,
        "pilot": f"smile_session+token_lr{arm['chosen']}",
        "pilot_test_loss": pilot,
        "drop_nats": round(base - pilot, 4),
        "required_nats": GATE_NATS,
        "passed": base - pilot >= GATE_NATS,
    }


def tables(results: dict) -> str:
    lines = ["## Bases (chatglm2-small, zhbase, 3 epochs)", "",
             "| seed | steps | tokens | zhbase validation loss by epoch | train s | tokens/s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for seed, base in results["pretraining"].items():
        curve = " → ".join(f"{x:.4f}" for x in base["val_loss_by_epoch"])
        lines.append(f"| {seed} | {base['steps']:,} | {base['tokens']:,} | {curve} | {base['train_seconds']:.0f} | "
                     f"{base['tokens_per_second']:,} |")  # fmt: skip
    lines += ["", "## Step 0: each base's test answer loss (chatglm2 template), before fine-tuning", "",
              "| corpus | seed | test sessions | test loss | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU-4 | empty |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for corpus, seeds in results["step0"].items():
        for seed, m in seeds.items():
            o = m["official"]
            lines.append(f"| {corpus} | {seed} | {m['test_sessions']} | {m['test_loss']:.4f} | {o['rouge-1']:.2f} | "
                         f"{o['rouge-2']:.2f} | {o['rouge-l']:.2f} | {o['bleu-4']:.2f} | {o['empty_predictions']} |")  # fmt: skip
    for arm, entry in results["lr_grid"].items():
        lines += ["", f"## Rate grid: {arm} (one epoch, base seed 0, seed 0)", "",
                  "| rate | validation loss every quarter epoch | last | best | test loss | ROUGE-1 | ROUGE-L | BLEU-4 |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for rate, r in entry["rates"].items():
            mark = " **chosen**" if rate == entry["chosen"] else ""
            o = r["official"]
            lines.append(f"| {rate}{mark} | {' → '.join(f'{x:.4f}' for x in r['val_curve'])} | {r['val_last']:.4f} | "
                         f"{r['val_best']:.4f} | {r['test_loss']:.4f} | {o['rouge-1']:.2f} | {o['rouge-l']:.2f} | "
                         f"{o['bleu-4']:.2f} |")  # fmt: skip
        lines.append(
            f"\nChosen {entry['chosen']} (interior: {entry['interior']}; grid spans {entry['decades']} decades)."
        )
    g = results["gate"]
    lines += ["", "## The gate", "", f"SMILE base seed 0 step-0 test loss {g['base_step0_test_loss']:.4f}; "
              f"{g['pilot']} ends at {g['pilot_test_loss']:.4f}: {g['drop_nats']:.4f} nats below "
              f"(required {g['required_nats']}): {'passed' if g['passed'] else 'NOT passed'}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]] or sorted((HERE / "raw").glob("*.json"))
    merged = merge(paths)
    step0_losses = step0(merged["base_eval"])
    lr_grid = grids(merged["runs"])
    results = {
        "regime": {
            "preset": "chatglm2-small",
            "tokenizer": "glm_session/resources/tokenizer_zhbase (16,005 pieces, zhbase only)",
            "pretraining": "experiment=unseen/pretrain: zhbase, 3 epochs, 65,536 tokens a step, lr 2e-3",
            "fine_tuning": "experiment=unseen/<corpus>_<arm>: one epoch, validation every quarter epoch",
        },
        "splits": {
            corpus: {"sessions": data["sessions"], "openings": data["openings"], "turns": data["turns"]}
            for corpus, data in merged["data"].items()
        },
        "pretraining": pretraining(merged["runs"]),
        "step0": step0_losses,
        "lr_grid": lr_grid,
        "gate": gate(step0_losses, lr_grid),
        "equivalence": None,  # the arms' comparison (TOST): not run yet
        "sources": [p.name for p in paths],
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (HERE / "tables.md").write_text(tables(results))
    print(tables(results))


if __name__ == "__main__":
    main()
