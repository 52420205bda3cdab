"""Aggregate the strategy comparison (``run.py``'s ``comparison.tgz``) into results.json, tables and plots.

    python experiments/strategy_comparison/aggregate.py smile=ARCHIVE kdconv=ARCHIVE [--out experiments/strategy_comparison]

Each corpus is read from the archive (or folder) given for it: one ``run.py`` call may hold both, or each its own.

For every arm + reduction (seed 0 is the learning-rate sweep's job at the chosen rate, seeds 1-4 the seed jobs):

- the primary metric, the test answer loss (token mean over every answer token of the whole test split), overall
  and by turn position (1..8, 9+): mean and std over seeds, and a 95% bootstrap interval over test sessions and
  seeds (2,000 resamples; the same resampled sessions for every arm, so that differences are paired);
- the generation metrics on the sampled test sessions: torchmetrics ROUGE-1/2/L on jieba words, ChatGLM2's official
  ROUGE-1/2/L and BLEU-4 (``glm_session/evaluation/official.py``), the mean prediction and reference lengths;
- beside them: the bases (the starting checkpoints) and two fixed answers scored by the same metrics on the same
  prompts (the most frequent training answer; the question copied back); a metric that a fixed answer reaches is
  flagged: it does not measure quality here;
- the matched pair (split_grouped vs session under matched reductions) along the whole validation curve, against the
  noise floor (session with unpacked rows); paired differences of the main comparisons.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from glm_session.evaluation.references import fixed_answers, generation_scores
from glm_session.report import plot_curves

HERE = Path(__file__).parent
BUCKETS = [str(t) for t in range(1, 9)] + ["9+"]
RESAMPLES = 2000
CORPORA = {
    "smile": ["data=smile", "data.holdout={validation: 0.02, test: 0.05}"],
    "kdconv": [],
}


def load(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    runs = {}
    for job in manifest["jobs"]:
        path = folder / job["name"]
        run = {"status": job["status"], "name": job["name"]}
        for key, file in (("metrics", "metrics.json"), ("evaluation", "evaluation/metrics.json"),
                          ("test_losses", "evaluation/test_losses.json")):  # fmt: skip
            if (path / file).exists():
                run[key] = json.loads((path / file).read_text())
        if job["name"].startswith("base_eval/"):
            for key, file in (("evaluation", "metrics.json"), ("test_losses", "test_losses.json")):
                if (path / file).exists():
                    run[key] = json.loads((path / file).read_text())
        predictions = path / (
            "predictions.jsonl" if job["name"].startswith("base_eval/") else "evaluation/predictions.jsonl"
        )
        if predictions.exists():
            run["predictions"] = [json.loads(line) for line in predictions.read_text().splitlines()]
        runs[job["name"]] = run
    return {"manifest": manifest, "runs": runs}


def final_runs(data: dict) -> dict[str, dict[int, dict]]:
    """arm + reduction -> seed -> run (finished ones only)."""
    rates = data["manifest"]["rates"]
    arms: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    for name, run in data["runs"].items():
        if run["status"] != "done" or "test_losses" not in run:
            continue
        kind, _, rest = name.partition("/")
        if kind == "lr":
            arm, rate = rest.rsplit("_lr", 1)
            if rates.get(arm, {}).get("lr") == rate:
                arms[arm][0] = run
        elif kind in ("seeds", "matched"):
            arm, seed = rest.rsplit("_seed", 1)
            arms[arm][int(seed)] = run
    return arms


def bucket(turn: str) -> str:
    return turn if int(turn) <= 8 else "9+"


class Losses:
    """Per-session loss sums and counts of every run, on one list of test sessions, for bootstrap resampling."""

    def __init__(self, runs: list[dict]) -> None:
        self.sessions = sorted(runs[0]["test_losses"])
        self.index = {s: i for i, s in enumerate(self.sessions)}

    def arrays(self, run: dict, which: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        sums, counts = np.zeros(len(self.sessions)), np.zeros(len(self.sessions))
        for session, turns in run["test_losses"].items():
            for turn, (total, count) in turns.items():
                if which is None or bucket(turn) == which:
                    sums[self.index[session]] += total
                    counts[self.index[session]] += count
        return sums, counts


def summarise(values: list[float]) -> dict:
    """Mean, std and a 95% bootstrap interval over the seeds' values."""
    array = np.array(values)
    means = np.random.default_rng(1).choice(array, size=(RESAMPLES, len(array))).mean(axis=1)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0, "n": len(array),
            "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}  # fmt: skip


def bootstrap(
    per_seed: list[tuple[np.ndarray, np.ndarray]], weights: np.ndarray, rng: np.random.Generator
) -> list:
    """95% interval of the seeds' mean token-mean loss, resampling sessions (``weights``: B x sessions counts) and
    seeds."""
    sums = np.stack([s for s, _ in per_seed])  # (R, n)
    counts = np.stack([c for _, c in per_seed])
    losses = (weights @ sums.T) / np.maximum(weights @ counts.T, 1)  # (B, R)
    picks = rng.integers(0, len(per_seed), size=(len(weights), len(per_seed)))
    means = np.take_along_axis(losses, picks, axis=1).mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def paired(a: list, b: list, weights: np.ndarray, rng: np.random.Generator) -> dict:
    """Mean difference a - b over the seeds both have (paired by seed), with its 95% bootstrap interval."""
    la = (weights @ np.stack([s for s, _ in a]).T) / np.maximum(weights @ np.stack([c for _, c in a]).T, 1)
    lb = (weights @ np.stack([s for s, _ in b]).T) / np.maximum(weights @ np.stack([c for _, c in b]).T, 1)
    diff = la - lb  # (B, seeds)
    picks = rng.integers(0, diff.shape[1], size=diff.shape)
    means = np.take_along_axis(diff, picks, axis=1).mean(axis=1)
    full = [(sa.sum() / ca.sum()) - (sb.sum() / cb.sum()) for (sa, ca), (sb, cb) in zip(a, b, strict=True)]
    return {"difference": float(np.mean(full)), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "seeds": len(full)}  # fmt: skip


def curve_diff(a: dict, b: dict) -> float:
    ca, cb = a["metrics"]["val_curve"], b["metrics"]["val_curve"]
    assert [p["step"] for p in ca] == [p["step"] for p in cb], "the two curves are validated at other steps"
    return max(abs(p["loss"] - q["loss"]) for p, q in zip(ca, cb, strict=True))


def corpus_results(data: dict, corpus: str, rng: np.random.Generator) -> dict:
    arms = {arm: seeds for arm, seeds in final_runs(data).items() if arm.startswith(corpus + "_")}
    all_runs = [run for seeds in arms.values() for run in seeds.values()]
    bases = {name.removeprefix("base_eval/"): run for name, run in data["runs"].items()
             if name.startswith(f"base_eval/{corpus}") and "test_losses" in run}  # fmt: skip
    if not all_runs:
        return {"arms": {}, "note": "no finished run"}
    losses = Losses(all_runs)
    n = len(losses.sessions)
    weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(RESAMPLES)]).astype(float)
    result: dict = {"test_sessions": n, "arms": {}, "comparisons": {}, "baselines": {}}
    rates = data["manifest"]["rates"]
    lr_of = {job["name"]: job["lr_of"] for job in data["manifest"]["jobs"]}  # matched runs take a session run's
    for arm, seeds in sorted(arms.items()):
        order = sorted(seeds)
        per_seed = [losses.arrays(seeds[s]) for s in order]
        entry = {
            "seeds": order,
            "lr": float((rates.get(arm) or rates.get(lr_of.get(seeds[order[0]]["name"]), {})).get("lr", "nan")),
            "test_answer_loss": {
                **summarise([s.sum() / c.sum() for s, c in per_seed]),
                "ci95": bootstrap(per_seed, weights, rng),
            },  # fmt: skip
            "test_answer_loss_by_turn": {},
        }
        for which in BUCKETS:
            arrays = [losses.arrays(seeds[s], which) for s in order]
            if all(c.sum() > 0 for _, c in arrays):
                entry["test_answer_loss_by_turn"][which] = {
                    **summarise([s.sum() / c.sum() for s, c in arrays]), "ci95": bootstrap(arrays, weights, rng)}  # fmt: skip
        gens = [generation_scores(seeds[s]["predictions"]) for s in order if "predictions" in seeds[s]]
        for key in ("rouge", "chatglm2_official"):
            entry[key] = {k: summarise([g[key][k] for g in gens]) for k in gens[0][key]} if gens else {}
        entry["prediction_chars_mean"] = summarise([g["prediction_chars_mean"] for g in gens]) if gens else None
        entry["reference_chars_mean"] = gens[0]["reference_chars_mean"] if gens else None
        curves = [seeds[s]["metrics"]["val_curve"] for s in order]
        entry["val_curve"] = [{"step": p["step"], "supervised_tokens": p["supervised_tokens"], "train_flops": p["train_flops"],
                               "loss": float(np.mean([c[i]["loss"] for c in curves]))}
                              for i, p in enumerate(curves[0]) if all(len(c) > i for c in curves)]  # fmt: skip
        first = seeds[order[0]]["metrics"]
        entry["steps"] = first["global_steps"]
        entry["answer_tokens_per_step"] = first["supervised_tokens"] / max(1, first["global_steps"])
        entry["input_tokens_per_step"] = first["input_tokens"] / max(1, first["global_steps"])
        entry["train_flops"] = first["train_flops"]
        result["arms"][arm] = entry

    def pair(a: str, b: str) -> None:
        if a in arms and b in arms:
            common = sorted(set(arms[a]) & set(arms[b]))
            if common:
                result["comparisons"][f"{a} - {b}"] = paired(
                    [losses.arrays(arms[a][s]) for s in common],
                    [losses.arrays(arms[b][s]) for s in common],
                    weights,
                    rng,
                )

    for reduction in ("token", "sample", "turn"):
        pair(f"{corpus}_session+{reduction}", f"{corpus}_split_shuffled+{reduction}")
    pair(f"{corpus}_session+token", f"{corpus}_split_equal_compute+token")
    pair(f"{corpus}_session+token", f"{corpus}_session+turn")
    pair(f"{corpus}_session+token", f"{corpus}_session+sample")
    pair(f"{corpus}_split_shuffled+token", f"{corpus}_split_shuffled+sample")

    matched = {}
    for session, split, unpacked in (("token", "token", "token"), ("turn", "sample", "turn")):
        a, b, c = (arms.get(f"{corpus}_{x}", {}).get(0) for x in
                   (f"session+{session}", f"split_grouped+{split}", f"session_unpacked+{unpacked}"))  # fmt: skip
        if a and b:
            entry = {
                "max_abs_val_loss_diff": curve_diff(a, b),
                "steps": [p["step"] for p in a["metrics"]["val_curve"]],
            }
            if c:
                entry["noise_floor"] = curve_diff(a, c)
                entry["tolerance"] = max(2 * entry["noise_floor"], 1e-3)
                entry["agree"] = entry["max_abs_val_loss_diff"] <= entry["tolerance"]
            matched[f"session+{session} vs split_grouped+{split}"] = entry
    if matched:
        result["matched_pair"] = {**matched.get("session+token vs split_grouped+token", {}), "pairs": matched}

    for name, run in sorted(bases.items()):
        sums, counts = losses.arrays(run)
        seed = name.removeprefix(corpus + "_")  # the base pretrained with seed 0 is every seed-0 run's start
        result["baselines"]["base_model" if seed == "seed0" else f"base_model_{seed}"] = {
            "test_answer_loss": float(sums.sum() / counts.sum()),
            "test_answer_loss_by_turn": {
                w: float(s.sum() / c.sum()) for w in BUCKETS for s, c in [losses.arrays(run, w)] if c.sum() > 0
            },  # fmt: skip
            **generation_scores(run["predictions"]),
        }
    reference_prompts = next(iter(bases.values()))["predictions"] if bases else all_runs[0]["predictions"]
    result["baselines"].update(fixed_answers(CORPORA[corpus], reference_prompts))
    # A metric that a fixed answer reaches (mean of the best arm) does not measure quality here.
    flags = {}
    for family, keys in (
        ("rouge", ("rouge1", "rouge2", "rougeL")),
        ("chatglm2_official", ("rouge-1", "rouge-2", "rouge-l", "bleu-4")),
    ):
        for key in keys:
            best = max(
                (e[family][key]["mean"] for e in result["arms"].values() if e.get(family)), default=math.nan
            )
            fixed = max(result["baselines"][f][family][key] for f in ("most_frequent_answer", "question_copy"))
            flags[f"{family}.{key}"] = {
                "best_arm": best,
                "best_fixed_answer": fixed,
                "fixed_answer_reaches_it": fixed >= best,
            }
    result["fixed_answer_check"] = flags
    return result


def plot(results: dict, out: Path) -> None:
    arms = results["arms"]
    shown = [a for a in ("smile_session+token", "smile_split_shuffled+token", "smile_split_grouped+token",
                         "smile_split_equal_compute+token", "smile_session+turn", "smile_split_shuffled+turn") if a in arms]  # fmt: skip
    plot_curves(
        {arm.removeprefix("smile_"): [arms[arm]["val_curve"]] for arm in shown},
        out / "val_loss_curves.png",
        axes=(("step", "optimizer steps", 1), ("supervised_tokens", "answer tokens seen (M)", 1e6),
              ("train_flops", "training FLOPs (1e15)", 1e15)),  # fmt: skip
        ylabel="validation answer loss (mean over seeds)",
    )


def tables(results: dict) -> str:
    """The README's tables, from ``results``."""
    lines = []
    for corpus, part in (("SMILE", results), ("KdConv", results.get("kdconv") or {"arms": {}})):
        lines += [f"### {corpus}: test answer loss (primary) and generation", "",
                  "| arm + reduction | lr | seeds | test answer loss, mean ± std | 95% CI (sessions × seeds) | ROUGE-1 (torchmetrics) | ROUGE-1 / ROUGE-L / BLEU-4 (ChatGLM2 official) | prediction chars |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for arm, e in part["arms"].items():
            t, o = e["test_answer_loss"], e["chatglm2_official"]
            lines.append(f"| {arm} | {e['lr']:.0e} | {len(e['seeds'])} | {t['mean']:.4f} ± {t['std']:.4f} | "
                         f"[{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}] | {e['rouge']['rouge1']['mean']:.2f} | "
                         f"{o['rouge-1']['mean']:.2f} / {o['rouge-l']['mean']:.2f} / {o['bleu-4']['mean']:.2f} | "
                         f"{e['prediction_chars_mean']['mean']:.1f} |")  # fmt: skip
        for name, b in part.get("baselines", {}).items():
            loss = f"{b['test_answer_loss']:.4f}" if "test_answer_loss" in b else "—"
            o = b["chatglm2_official"]
            lines.append(f"| *{name}* | | | {loss} | | {b['rouge']['rouge1']:.2f} | {o['rouge-1']:.2f} / {o['rouge-l']:.2f} / "
                         f"{o['bleu-4']:.2f} | {b['prediction_chars_mean']:.1f} |")  # fmt: skip
        reference = next(iter(part["arms"].values()), {}).get("reference_chars_mean")
        lines += ["", f"Reference answers: {reference:.1f} characters on average." if reference else "", ""]
        lines += [
            "| paired difference (a - b) | seeds | test answer loss difference | 95% CI |",
            "|---|---:|---:|---:|",
        ]
        for name, c in part.get("comparisons", {}).items():
            lines.append(
                f"| {name} | {c['seeds']} | {c['difference']:+.4f} | [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] |"
            )
        lines.append("")
        if part["arms"]:
            lines += [f"### {corpus}: test answer loss by turn position (mean over seeds)", "",
                      "| arm + reduction | " + " | ".join(BUCKETS) + " |", "|---|" + "---:|" * len(BUCKETS)]  # fmt: skip
            rows = [
                (arm, {k: v["mean"] for k, v in e["test_answer_loss_by_turn"].items()})
                for arm, e in part["arms"].items()
            ]
            rows += [(f"*{n}*", b["test_answer_loss_by_turn"]) for n, b in part.get("baselines", {}).items()
                     if "test_answer_loss_by_turn" in b]  # fmt: skip
            for arm, by_turn in rows:
                lines.append(
                    f"| {arm} | "
                    + " | ".join(f"{by_turn[b]:.3f}" if b in by_turn else "—" for b in BUCKETS)
                    + " |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "sources", nargs="+", help="corpus=comparison.tgz (or the folder run.py wrote), per corpus"
    )
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    per_corpus, manifests = {}, {}
    for source in args.sources:
        corpus, _, path = source.partition("=")
        folder = Path(path)
        if folder.is_file():
            folder = Path(tempfile.mkdtemp())
            with tarfile.open(path) as tar:
                tar.extractall(folder, filter="data")
        data = load(folder)
        per_corpus[corpus] = corpus_results(data, corpus, rng)
        manifests[corpus] = data["manifest"]
    smile = per_corpus.get("smile", {"arms": {}})
    results = {
        "data": [
            "SMILE 20k (CC0): 18,529 / 373 / 977 train / validation / test sessions, split by a hash of the id",
            "KdConv (Apache-2.0): 720 / 90 / 90 sessions",
        ],
        "primary_metric": "test_answer_loss",
        **smile,
        "kdconv": per_corpus.get("kdconv"),
        "runs": {
            corpus: {
                "rates": {arm: r for arm, r in m["rates"].items() if arm.startswith(corpus)},
                "jobs": {status: sum(j["status"].startswith(status) for j in m["jobs"] if corpus in j["name"])
                         for status in ("done", "failed", "skipped")},
                "not_run": [f"{j['name']}: {j['status']}" for j in m["jobs"] if j["status"] != "done" and corpus in j["name"]],
                "seconds": m["seconds"],
            }
            for corpus, m in manifests.items()
        },
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    plot(results, args.out)
    (args.out / "tables.md").write_text(tables(results))
    print(json.dumps({arm: e["test_answer_loss"] for arm, e in results["arms"].items()}, indent=1))
    print(f"wrote {args.out / 'results.json'} and val_loss_curves.png")


if __name__ == "__main__":
    main()
