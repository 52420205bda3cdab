"""Merge the driver's records (``raw/``: one ``summary.json`` and one ``runs.tgz`` a call) into ``results.json`` and
``tables.md``.

    python experiments/unseen_base/aggregate.py

What is declared before the runs (README "Declared before the runs") is applied here, not chosen after them:

- a rate is chosen per arm + reduction on the **last** validation loss of its grid run (seed 0, base 0); the choice is
  **interior** when the grid holds a lower and a higher rate, both with a higher last validation loss;
- ``SCREENED`` (session 14, after its grids of SMILE's 3-epoch arms were stopped together and lost): a rate whose
  stopped run trailed the best by more than ``SCREEN_NATS`` at the last validation every rate reached, and trailed it
  by no less ``SCREEN_WINDOW`` validations before (falling behind, not catching up), is screened out: it is not run
  again and counts as a losing rate of the grid (for completeness and interiority);
- the bases are identified by the sha256 of their weights; the runs of one device session start from the bases that
  session pretrained. A *generation* is a set of bases with the same weights (named by base 0's sha256 prefix); the
  arms' seeds, intervals and contrasts use the runs of one generation only (``REFERENCE_BASES``), since a paired
  comparison needs every arm to start from the same weights; a rate chosen on another realisation of base 0 stays
  chosen (the rate is a setting, not a result), and each grid entry names the bases it ran from;
- the gate: the session+token run at the chosen rate must end at least ``GATE_NATS`` below the base's step-0 test
  answer loss on SMILE;
- the headline is the test answer loss (token mean over every answer token of every test session, teacher-forced),
  overall and by turn position; an arm's estimate is the mean over its 5 seeds (seed s from base s % 2); 95%
  intervals from a paired hierarchical bootstrap (bases, then seeds, then test sessions: the same draws for every
  arm; ``glm_session.analysis.statistics``);
- ``CONTRASTS``: the family of headline differences, Holm-adjusted within each corpus; ``EQUIVALENCE``:
  session+token vs split_shuffled+token, two one-sided tests with a ±``MARGIN_NATS`` margin;
- generation metrics (ChatGLM2's official ROUGE/BLEU and torchmetrics ROUGE) beside the bases' step-0 scores and two
  fixed answers on the same prompts; a metric a fixed answer reaches is flagged.
"""

from __future__ import annotations

import json
import math
import re
import tarfile
from pathlib import Path

import numpy as np

from glm_session.analysis.statistics import hierarchical_resamples, holm, interval, paired_difference, tost
from glm_session.evaluation.references import fixed_answers, generation_scores
from glm_session.report import plot_curves, seed_summary

HERE = Path(__file__).parent
# The bases the arms' seeds and contrasts come from: base 0's sha256 prefix, set from the first pretraining with
# model.compile_deterministic (JOURNAL.md "Two generations of bases"); None until then (every seed runs afresh).
REFERENCE_BASES: str | None = "39afcc51"
GATE_NATS = 0.3
MARGIN_NATS = 0.02
SEEDS = 5
GRID_RATES = ("1e-4", "2e-4", "5e-4", "1e-3", "2e-3", "5e-3")  # run.py's: 6 rates, 1.7 decades
RESAMPLES = 2000
BUCKETS = [str(t) for t in range(1, 9)] + ["9+"]
DATA = {  # the corpora for the fixed answers (the shared data folder beside the repository)
    "smile": ["data=smile_by_opening"],
    "cpsycoun": ["data=cpsycoun"],
}
EQUIVALENCE = ("session+token", "split_shuffled+token")
CONTRASTS = [  # (a, b): the declared family of a - b differences, per corpus
    ("session+token", "split_shuffled+token"),
    ("session+token", "session+sample"),
    ("session+token", "session+turn"),
    ("split_shuffled+token", "split_shuffled+sample"),
    ("session+token", "split_samples+token"),
    ("session+token", "split_equal_compute+token"),
    ("session+token", "last+token"),
    ("session+token", "rising+token"),
]
# Declared in session 13 (2026-12-04), after CPsyCoun's 3-epoch runs and before SMILE's: what two more epochs change,
# outside the Holm family (secondary). The equivalence test of the 3-epoch pair uses the same margin.
SECONDARY = [
    ("session_3ep+token", "split_shuffled_3ep+token"),
    ("session_3ep+token", "session+token"),
    ("split_shuffled_3ep+token", "split_shuffled+token"),
    ("session_3ep+token", "split_shuffled+token"),  # 3 session epochs against one split epoch's 3.5-4.5
]
EQUIVALENCE_3EP = SECONDARY[0]  # the 3-epoch pair, tested for equivalence too
# Declared in session 14 (2026-12-04), from the partial curves of its stopped grids (call 8's record, which holds
# every rate's validations so far) and before any of them was run again: the rates left behind for good.
SCREENED = {
    "smile_split_shuffled_3ep+token": "s14_call8_arms.json",
    "smile_session_3ep+token": "s14_call8_arms.json",
}
SCREEN_NATS = 0.1
SCREEN_WINDOW = 3


# -- the records --------------------------------------------------------------------------------------------------


def device_session(path: Path) -> str:
    """The device session a record comes from: ``s<N>_call<M>_...`` (the first session's records have no prefix)."""
    head = path.stem.split("_", 1)[0]
    return head if head[:1] == "s" and head[1:].isdigit() else "s1"


def in_call_order(paths: list[Path]) -> list[Path]:
    """Records in the order their calls ran: by device session, then call (``s10_call2`` after ``s9_call4``, which a
    sort by name puts first); a later call's record of a job replaces an earlier one's."""

    def order(path: Path) -> tuple[int, int, str]:
        call = re.search(r"call(\d+)", path.stem)
        return int(device_session(path)[1:]), int(call.group(1)) if call else 0, path.name

    return sorted(paths, key=order)


def generations_of(summaries: list[tuple[str, dict]]) -> dict[str, str]:
    """device session -> the generation of its bases: base 0's sha256 prefix (or base 1's generation where a session
    pretrained base 1 alone); ``<session>: not fingerprinted`` for the first session, which recorded none. Two
    sessions of one generation with different weights for a base stop the aggregate: the bases did not reproduce."""
    fingerprints: dict[str, dict[str, str]] = {}
    for session, summary in summaries:
        fingerprints.setdefault(session, {}).update({k: v for k, v in summary.get("bases", {}).items() if v})
    generation = {s: f["pretrain/seed0"][:8] for s, f in fingerprints.items() if "pretrain/seed0" in f}
    seen: dict[tuple[str, str], tuple[str, str]] = {}  # (generation, base) -> (sha256, session)
    for session, found in fingerprints.items():
        if session not in generation:
            match = [generation[s] for s, f in fingerprints.items()
                     if s in generation and f.get("pretrain/seed1") == found.get("pretrain/seed1")]  # fmt: skip
            generation[session] = match[0] if match and found else f"{session}: not fingerprinted"
        for base, sha in found.items():
            first = seen.setdefault((generation[session], base), (sha, session))
            if first[0] != sha:
                raise SystemExit(f"{base} differs between sessions {first[1]} and {session} of the bases "
                                 f"{generation[session]}: {first[0][:8]} vs {sha[:8]} (the bases did not reproduce)")  # fmt: skip
    return generation


def merge(paths: list[Path]) -> dict:
    """The calls' records by generation of bases: ``{"data": ..., "generation_of": {session: generation},
    "generations": {generation: {"sessions", "runs", "base_eval", "bases"}}}``; within a generation a later call's
    record of a job replaces an earlier one's."""
    summaries = [(device_session(path), json.loads(path.read_text())) for path in paths]
    generation_of = generations_of(summaries)
    merged: dict = {"data": {}, "generation_of": generation_of, "generations": {}, "probes": {}, "probe_runs": {}}
    for session, summary in summaries:
        entry = merged["generations"].setdefault(generation_of[session],
                                                 {"sessions": [], "runs": {}, "base_eval": {}, "bases": {}})  # fmt: skip
        if summary.get("restored"):  # bases.py brought the bases to this session: it did not pretrain them
            if session not in entry.setdefault("carried_to", []):
                entry["carried_to"].append(session)
        elif session not in entry["sessions"]:
            entry["sessions"].append(session)
        for key in ("runs", "base_eval"):
            entry[key].update(summary.get(key, {}))
        entry["bases"].update({k: v for k, v in summary.get("bases", {}).items() if v})
        merged["data"].update(summary.get("data", {}))
        merged["probes"].setdefault(session, {}).update({k: v for k, v in summary.get("probes", {}).items() if v})
        merged["probe_runs"].setdefault(session, {}).update(
            {k: v for k, v in summary.get("runs", {}).items() if k.startswith("probe/")}
        )
    return merged


def determinism_probes(probes: dict[str, dict[str, str]]) -> dict:
    """Per device session and inductor mode: the weights after 60 steps of base 0's pretraining alone on the GPU
    and beside the bases' pretraining, and whether they are the same (``run.py --phase probe``)."""
    result: dict = {}
    for session, found in sorted(probes.items()):
        for mode in ("default", "deterministic"):
            alone, beside = found.get(f"probe/{mode}_alone"), found.get(f"probe/{mode}_beside")
            if alone and beside:
                result.setdefault(session, {})[mode] = {"alone": alone[:8], "beside": beside[:8],
                                                        "repeats": alone == beside}  # fmt: skip
    return result


def resume_probes(probes: dict[str, dict[str, str]], runs: dict[str, dict[str, dict]]) -> dict:
    """Per device session and ``model.compile_dynamic`` mode (``run.py``'s ``PROBE_MODES``): the weights of the
    uninterrupted probe run and of the one stopped and resumed in a new process, whether they are the same, where
    the stop was, and the uninterrupted run's tokens/s after its warm-up steps (alone on the GPU)."""
    result: dict = {}
    for session, found in sorted(probes.items()):
        for mode in ("auto", "rows"):  # run.py PROBE_MODES
            whole, resumed = found.get(f"probe/{mode}_whole"), found.get(f"probe/{mode}_resumed")
            if not (whole and resumed):
                continue
            stop = runs.get(session, {}).get(f"probe/{mode}_stopped", {})
            speed = runs.get(session, {}).get(f"probe/{mode}_whole", {}).get("tokens_per_second")
            result.setdefault(session, {})[mode] = {
                "whole": whole[:8], "resumed": resumed[:8], "repeats": whole == resumed,
                "stopped_after_step": stop.get("global_steps"),
                "tokens_per_second": round(speed) if speed else None,
            }  # fmt: skip
    return result


EVALUATION_PROBE = "probe/evaluation_uncompiled"  # run.py's
EVALUATED_COMPILED = "seeds/cpsycoun_session+token_seed0"  # the same training, its test evaluation compiled


def evaluation_probes(probe_runs: dict[str, dict[str, dict]], reference_runs: dict[str, dict]) -> dict:
    """Per device session: CPsyCoun session+token seed 0 trained again and evaluated uncompiled (``run.py
    --phase evaluation-probe``) beside the kept seed 0 of the reference bases, evaluated compiled: whether the
    training repeated (the validation curve), and what the evaluation's change did to the test numbers and time."""
    compiled = reference_runs.get(EVALUATED_COMPILED, {})
    result: dict = {}
    for session, runs in sorted(probe_runs.items()):
        uncompiled = runs.get(EVALUATION_PROBE, {})
        if "test" not in uncompiled or "test" not in compiled:
            continue
        a, b = compiled["test"], uncompiled["test"]
        turns = a["teacher_forced"]["loss_by_turn"]
        official = {k: round(b["chatglm2_official"][k] - a["chatglm2_official"][k], 4)
                    for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}  # fmt: skip
        result[session] = {
            "training_repeats": [v["loss"] for v in compiled["val_curve"]] == [v["loss"] for v in uncompiled["val_curve"]],
            "test_loss": {"compiled": a["teacher_forced"]["loss"], "uncompiled": b["teacher_forced"]["loss"]},
            "test_loss_difference": b["teacher_forced"]["loss"] - a["teacher_forced"]["loss"],
            "largest_turn_loss_difference": max(
                abs(b["teacher_forced"]["loss_by_turn"][t] - turns[t]) for t in turns
            ),
            "official_difference": official,
            "seconds": {"compiled": a["seconds"], "uncompiled": b["seconds"]},
        }
    return result


def per_session(archives: list[Path], generation_of: dict[str, str]) -> dict[str, dict[str, dict]]:
    """generation -> job -> {"test_losses": {session: {turn: [sum, count]}}, "predictions": [...]}, from every
    ``runs.tgz`` (a test session here, a device session in ``generation_of``)."""
    by_generation: dict[str, dict[str, dict]] = {}
    for archive in archives:
        found = by_generation.setdefault(generation_of[device_session(archive)], {})
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                job, _, file = member.name.rpartition("/evaluation/")
                text = tar.extractfile(member).read().decode()
                if file == "test_losses.json":
                    found.setdefault(job, {})["test_losses"] = json.loads(text)
                elif file == "predictions.jsonl":
                    found.setdefault(job, {})["predictions"] = [json.loads(line) for line in text.splitlines()]
    return by_generation


def reruns(paths: list[Path], generation_of: dict[str, str]) -> list[dict]:
    """Jobs trained and evaluated in two or more calls from the same bases (a call on a new machine that ran what a
    lost machine had run): whether they repeat. A job counts in a call that ran it (``job_seconds``) to completion;
    the aggregate keeps the later call's record, this says how far the earlier one was."""
    found: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    for path in paths:
        summary = json.loads(path.read_text())
        for job in summary.get("job_seconds", {}):
            run = summary.get("runs", {}).get(job, {})
            if run.get("status") == "completed" and "test" in run:
                found.setdefault((generation_of[device_session(path)], job), []).append((path.stem, run))
    result = []
    for (generation, job), records in sorted(found.items()):
        if len(records) < 2:
            continue
        losses = [run["test"]["teacher_forced"]["loss"] for _, run in records]
        curves = [[v["loss"] for v in run["val_curve"]] for _, run in records]
        result.append({
            "bases": generation, "job": job, "calls": [call for call, _ in records],
            "test_loss": losses, "test_loss_spread": max(losses) - min(losses),
            "val_curves_equal": all(c == curves[0] for c in curves),
            "largest_val_difference": max(abs(a - b) for c in curves[1:] for a, b in zip(c, curves[0], strict=False)),
            "test_seconds": [run["test"]["seconds"] for _, run in records],
        })  # fmt: skip
    return result


# -- regime: bases, step 0, rate grids, gate ---------------------------------------------------------------------


def pretraining(runs: dict, fingerprints: dict, sessions: list[str], carried_to: list[str] = ()) -> dict:
    """Each completed base of a generation: its curve, speed, sha256, the device sessions that pretrained it and
    those it was carried to (``bases.py``)."""
    bases = {}
    for name, run in sorted(runs.items()):
        if name.startswith("pretrain/") and run["status"] == "completed":
            curve = run["val_curve"]
            bases[name.removeprefix("pretrain/")] = {
                "status": run["status"],
                "steps": run["global_steps"],
                "epochs": len(curve),
                "tokens": run["input_tokens"],
                "val_loss_by_epoch": [round(point["loss"], 4) for point in curve],
                "train_seconds": round(run["train_seconds"], 1),
                "tokens_per_second": round(run["tokens_per_second"]),
                "weights_sha256": fingerprints.get(name),
                "device_sessions": sessions,
                "carried_to": list(carried_to),
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


def grids(generations: dict) -> dict:
    """Per arm + reduction: every rate's last and best validation loss, its test loss and the bases it ran from; the
    chosen rate. A rate run from several generations of bases is the reference generation's run."""
    result: dict = {}
    order = sorted(generations, key=lambda g: g == REFERENCE_BASES)  # the reference last: its runs replace others'
    runs = [(g, name, run) for g in order for name, run in generations[g]["runs"].items()]
    for generation, name, run in runs:
        if not name.startswith(("grid/", "pilot/")) or run["status"] != "completed" or not run["val_curve"]:
            continue
        arm, rate = name.split("/", 1)[1].rsplit("_lr", 1)
        losses = [point["loss"] for point in run["val_curve"]]
        test = run.get("test")  # missing where the call's deadline stopped the run in its test evaluation
        entry = result.setdefault(arm, {"rates": {}})
        entry["rates"][rate] = {
            "val_last": round(losses[-1], 4),
            "val_best": round(min(losses), 4),
            "val_curve": [round(x, 4) for x in losses],
            "test_loss": round(test["teacher_forced"]["loss"], 4) if test else None,
            "official": {k: round(v, 2) for k, v in test["chatglm2_official"].items()} if test else None,
            "steps": run["global_steps"],
            "bases": generation,
        }
    for arm, record in SCREENED.items():
        result.setdefault(arm, {"rates": {}})["screening"] = screening(arm, HERE / "raw" / record)
    for entry in result.values():
        rates = sorted(entry["rates"], key=float)
        entry["rates"] = {rate: entry["rates"][rate] for rate in rates}
        screened = {rate for rate, s in entry.get("screening", {}).get("rates", {}).items() if s["screened_out"]}
        evaluated = sorted(set(rates) | screened, key=float)  # a screened rate lost: it bounds the choice
        chosen = min(rates, key=lambda r: entry["rates"][r]["val_last"]) if rates else None
        entry["chosen"] = chosen
        entry["interior"] = chosen is not None and 0 < evaluated.index(chosen) < len(evaluated) - 1
        entry["decades"] = round(math.log10(float(evaluated[-1]) / float(evaluated[0])), 2) if evaluated else None
        entry["complete"] = set(GRID_RATES) <= set(evaluated)  # the driver runs seeds only at a complete grid's choice
    return dict(sorted(result.items()))


def screening(arm: str, record: Path) -> dict:
    """``SCREENED``'s rule on the stopped grid runs of ``arm`` in ``record``: at the last validation every rate
    reached, each rate's lag behind the best there and ``SCREEN_WINDOW`` validations before; screened out when the
    lag exceeds ``SCREEN_NATS`` and has not shrunk."""
    runs = json.loads(record.read_text())["runs"]
    curves = {name.rsplit("_lr", 1)[1]: [point["loss"] for point in run["val_curve"]]
              for name, run in runs.items() if name.startswith(f"grid/{arm}_lr")}  # fmt: skip
    missing = set(GRID_RATES) - set(curves)
    if missing:
        raise SystemExit(f"{record}: no grid run of {arm} at {sorted(missing, key=float)} to screen")
    at = min(len(curve) for curve in curves.values())
    if at <= SCREEN_WINDOW:
        raise SystemExit(f"{record}: {arm}'s runs share {at} validations, too few to screen")

    def lags(k: int) -> dict[str, float]:
        best = min(curve[k - 1] for curve in curves.values())
        return {rate: curve[k - 1] - best for rate, curve in curves.items()}

    now, before = lags(at), lags(at - SCREEN_WINDOW)
    return {
        "record": record.name,
        "validation": at,
        "rates": {
            rate: {
                "val_curve": [round(x, 4) for x in curves[rate][:at]],
                "lag": round(now[rate], 4),
                "lag_before": round(before[rate], 4),
                "screened_out": now[rate] > SCREEN_NATS and now[rate] >= before[rate],
            }
            for rate in sorted(curves, key=float)
        },
    }


def gate(step0_losses: dict, lr_grid: dict) -> dict:
    """session+token on SMILE at its chosen rate against the step-0 loss of the base it ran from."""
    arm = lr_grid.get("smile_session+token")
    if arm is None:
        return {"passed": None, "why": "not run"}
    pilot_run = arm["rates"][arm["chosen"]]
    bases = step0_losses.get(pilot_run["bases"], {})
    if "smile" not in bases:
        return {"passed": None, "why": "the pilot's base has no step-0 evaluation"}
    base = bases["smile"]["seed0"]["test_loss"]
    pilot = pilot_run["test_loss"]
    return {
        "bases": pilot_run["bases"],
        "base_step0_test_loss": base,
        "pilot": f"smile_session+token_lr{arm['chosen']}",
        "pilot_test_loss": pilot,
        "drop_nats": round(base - pilot, 4),
        "required_nats": GATE_NATS,
        "passed": base - pilot >= GATE_NATS,
    }


def gate_on_reference(step0_losses: dict, reference: dict) -> dict:
    """The gate again on the reference bases: session+token's seed 0 (from base 0) at its chosen rate against base
    0's step-0 SMILE test loss (the gate above ran on the first session's bases, before any arm)."""
    base = step0_losses.get(REFERENCE_BASES, {}).get("smile", {}).get("seed0")
    pilot = reference.get("smile", {}).get("arms", {}).get("session+token", {}).get("test_loss", {})
    if base is None or 0 not in pilot.get("per_seed", {}):
        return {"passed": None, "why": "the reference bases' step 0 or session+token's seed 0 has not run"}
    drop = base["test_loss"] - pilot["per_seed"][0]
    return {
        "bases": REFERENCE_BASES,
        "base_step0_test_loss": base["test_loss"],
        "pilot": "smile session+token seed 0",
        "pilot_test_loss": pilot["per_seed"][0],
        "drop_nats": round(drop, 4),
        "required_nats": GATE_NATS,
        "passed": drop >= GATE_NATS,
    }


# -- the arms ------------------------------------------------------------------------------------------------------


def final_runs(runs: dict, sessions: dict, lr_grid: dict) -> dict[str, dict[int, str]]:
    """corpus_arm+reduction -> seed -> the job that is that seed's run at the chosen rate (``seeds/...``, or for
    seed 0 the grid's run at the chosen rate when its per-session losses were kept)."""
    arms: dict[str, dict[int, str]] = {}
    for name, run in runs.items():
        if name.startswith("seeds/") and run["status"] == "completed" and name in sessions:
            arm, seed = name.removeprefix("seeds/").rsplit("_seed", 1)
            arms.setdefault(arm, {})[int(seed)] = name
    for arm, entry in lr_grid.items():
        grid_job = f"grid/{arm}_lr{entry['chosen']}"
        if entry["interior"] and grid_job in sessions and 0 not in arms.get(arm, {}):
            arms.setdefault(arm, {})[0] = grid_job
    return arms


def session_arrays(
    test_losses: dict, order: list[str], bucket: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-session loss sums and token counts (of every turn, or of one turn-position bucket) in ``order``."""
    sums, counts = np.zeros(len(order)), np.zeros(len(order))
    for i, session in enumerate(order):
        for turn, (total, count) in test_losses.get(session, {}).items():
            if bucket is None or (turn if int(turn) <= 8 else "9+") == bucket:
                sums[i] += total
                counts[i] += count
    return sums, counts


def point_and_spread(values: list[float]) -> dict:
    """Mean, std and n over the seeds, without the t-interval: the test loss's interval is the declared hierarchical
    one (bases, seeds, sessions)."""
    return {k: v for k, v in seed_summary(values).items() if k != "ci95"}


def plot_arms(corpus: str, runs: dict, sessions: dict, lr_grid: dict) -> None:
    """``val_curves_<corpus>.png``: each arm's validation curves at its chosen rate, mean and std over its seeds."""
    prefix = f"{corpus}_"
    curves = {arm.removeprefix(prefix): [runs[job]["val_curve"] for job in seeds.values()]
              for arm, seeds in sorted(final_runs(runs, sessions, lr_grid).items()) if arm.startswith(prefix)}  # fmt: skip
    if curves:
        plot_curves(curves, HERE / f"val_curves_{corpus}.png",
                    axes=(("step", "optimizer steps", 1.0), ("train_flops", "training PFLOPs", 1e15)))  # fmt: skip


def corpus_arms(corpus: str, runs: dict, sessions: dict, lr_grid: dict, step0_losses: dict) -> dict:
    """The arms of one corpus: each arm's seeds, test loss (overall, by turn) with hierarchical intervals, generation
    metrics; the declared contrasts, the equivalence test, the check, the references."""
    prefix = f"{corpus}_"
    arms = {a.removeprefix(prefix): seeds for a, seeds in final_runs(runs, sessions, lr_grid).items()
            if a.startswith(prefix)}  # fmt: skip
    result: dict = {"arms": {}, "contrasts": {}, "equivalence": None, "check": None, "references": {}}
    base_jobs = {f"base_eval/{corpus}_seed{b}": b for b in (0, 1)}
    order = sorted(next((sessions[j]["test_losses"] for j in base_jobs if j in sessions), {}))
    if not order:  # the bases' step-0 evaluation gives the test sessions and the gain over the base
        result["waiting_for_step0"] = sorted(j for seeds in arms.values() for j in seeds.values())
        return result
    complete = {arm: seeds for arm, seeds in arms.items() if sorted(seeds) == list(range(SEEDS))}

    def as_arm(seeds: dict[int, str], bucket: str | None = None) -> dict:
        arm: dict = {}
        for seed, job in seeds.items():
            arm.setdefault(seed % 2, {})[seed] = session_arrays(sessions[job]["test_losses"], order, bucket)
        return arm

    replicates = hierarchical_resamples({a: as_arm(s) for a, s in complete.items()}, RESAMPLES) if complete else {}
    by_turn_reps = {
        bucket: hierarchical_resamples({a: as_arm(s, bucket) for a, s in complete.items()}, RESAMPLES)
        for bucket in BUCKETS
        if complete
        and all(
            session_arrays(sessions[j]["test_losses"], order, bucket)[1].sum() > 0
            for s in complete.values()
            for j in s.values()
        )  # fmt: skip
    }
    def bucket_point(seeds: dict[int, str], bucket: str) -> float:
        """The arm's loss at one turn-position bucket: the mean over its seeds of each seed's token mean there."""
        means = [a.sum() / c.sum() for job in seeds.values()
                 for a, c in [session_arrays(sessions[job]["test_losses"], order, bucket)]]  # fmt: skip
        return float(np.mean(means))

    for arm, seeds in sorted(arms.items()):
        losses = {s: float(a.sum() / c.sum()) for s, job in sorted(seeds.items())
                  for a, c in [session_arrays(sessions[job]["test_losses"], order)]}  # fmt: skip
        entry = {
            "rate": lr_grid[prefix + arm]["chosen"] if prefix + arm in lr_grid else None,
            "seeds": sorted(seeds),
            "complete": arm in complete,
            "test_loss": {**point_and_spread(list(losses.values())), "per_seed": losses},
            "val_last": seed_summary([runs[j]["val_curve"][-1]["loss"] for j in seeds.values()]),
            "val_best": seed_summary([min(p["loss"] for p in runs[j]["val_curve"]) for j in seeds.values()]),
            "steps": runs[seeds[min(seeds)]]["global_steps"],
            "input_tokens": runs[seeds[min(seeds)]]["input_tokens"],
            "official": {
                k: seed_summary([runs[j]["test"]["chatglm2_official"][k] for j in seeds.values()])
                for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
            },  # fmt: skip
            "rouge": {
                k: seed_summary([runs[j]["test"]["rouge"][k] for j in seeds.values()])
                for k in ("rouge1", "rouge2", "rougeL")
            },  # fmt: skip
        }
        if arm in replicates:
            entry["test_loss"]["ci95"] = interval(replicates[arm])
            entry["test_loss_by_turn"] = {
                bucket: {"mean": float(np.mean(reps[arm])), "ci95": interval(reps[arm]),
                         "point": bucket_point(seeds, bucket)}
                for bucket, reps in by_turn_reps.items()
            }  # fmt: skip
        base = min(step0_losses.get(corpus, {}).get(f"seed{b}", {}).get("test_loss", math.inf) for b in (0, 1))
        entry["gain_over_base"] = float(base - entry["test_loss"]["mean"])
        result["arms"][arm] = entry
    points = {arm: result["arms"][arm]["test_loss"]["mean"] for arm in complete}
    for a, b in CONTRASTS:
        if a in replicates and b in replicates:
            result["contrasts"][f"{a} - {b}"] = paired_difference(
                replicates[a], replicates[b], points[a], points[b]
            )
        else:
            result["contrasts"][f"{a} - {b}"] = None  # not run yet: its arms lack 5 seeds
    # Exploratory, outside the Holm family: each contrast at each turn-position bucket (the article's question: does
    # a construction shift the weight between early and late turns?).
    result["contrasts_by_turn"] = {
        f"{a} - {b}": {
            bucket: paired_difference(reps[a], reps[b], result["arms"][a]["test_loss_by_turn"][bucket]["point"],
                                      result["arms"][b]["test_loss_by_turn"][bucket]["point"])
            for bucket, reps in by_turn_reps.items()
        }
        for a, b in CONTRASTS
        if a in replicates and b in replicates
    }  # fmt: skip
    computed = {k: v["p_two_sided"] for k, v in result["contrasts"].items() if v is not None}
    if computed and len(computed) == len(CONTRASTS):
        for key, p in holm(computed).items():
            result["contrasts"][key]["p_holm"] = p

    def equivalence(a: str, b: str) -> dict | None:
        """The two one-sided tests of a - b within ``MARGIN_NATS``; None while an arm lacks its 5 seeds."""
        if a in replicates and b in replicates:
            return tost(replicates[a], replicates[b], points[a], points[b], MARGIN_NATS)
        return None

    result["equivalence"] = equivalence(*EQUIVALENCE)
    result["secondary"] = {
        f"{a} - {b}": paired_difference(replicates[a], replicates[b], points[a], points[b])
        if a in replicates and b in replicates else None
        for a, b in SECONDARY
    }  # fmt: skip
    result["equivalence_3ep"] = equivalence(*EQUIVALENCE_3EP)
    check = runs.get(f"check/{corpus}_split_grouped+token_seed0")
    session0 = arms.get("session+token", {}).get(0)
    if check and session0:
        curve_a, curve_b = runs[session0]["val_curve"], check["val_curve"]
        result["check"] = {
            "pair": "split_grouped+token vs session+token (seed 0, base 0, the same sessions every step)",
            "max_abs_val_loss_diff": max(abs(p["loss"] - q["loss"]) for p, q in zip(curve_a, curve_b, strict=True)),
            "test_loss_diff": check["test"]["teacher_forced"]["loss"] - runs[session0]["test"]["teacher_forced"]["loss"],
            "seed_std_of_session_token": result["arms"]["session+token"]["test_loss"]["std"],
        }  # fmt: skip
    return result


def references(corpus: str, sessions: dict) -> dict:
    """The bases' generation metrics and two fixed answers on the same prompts (base 0's generated sessions)."""
    result = {}
    for b in (0, 1):
        job = f"base_eval/{corpus}_seed{b}"
        if job in sessions and "predictions" in sessions[job]:
            result[f"base_seed{b}"] = generation_scores(sessions[job]["predictions"])
    prompts = sessions.get(f"base_eval/{corpus}_seed0", {}).get("predictions")
    if prompts and corpus in DATA:
        result.update(fixed_answers(DATA[corpus], prompts))
    return result


def fixed_answer_flags(arms: dict, refs: dict) -> dict:
    """Per metric: the best arm's mean, the best fixed answer's score, and whether the fixed answer reaches it."""
    flags = {}
    fixed = [refs[f] for f in ("most_frequent_answer", "question_copy") if f in refs]
    for family, keys in (("official", ("rouge-1", "rouge-2", "rouge-l", "bleu-4")),
                         ("rouge", ("rouge1", "rouge2", "rougeL"))):  # fmt: skip
        source = "chatglm2_official" if family == "official" else "rouge"
        for key in keys:
            best = max((e[family][key]["mean"] for e in arms.values()), default=math.nan)
            reached = max((f[source][key] for f in fixed), default=math.nan)
            flags[f"{family}.{key}"] = {"best_arm": best, "best_fixed_answer": reached,
                                        "fixed_answer_reaches_it": bool(reached >= best)}  # fmt: skip
    return flags


# -- the tables ----------------------------------------------------------------------------------------------------


def ci(pair: list | tuple | None) -> str:
    return f"[{pair[0]:.4f}, {pair[1]:.4f}]" if pair else "—"


def equivalence_line(pair: tuple[str, str], eq: dict) -> str:
    return (f"Equivalence of {' and '.join(pair)} within ±{MARGIN_NATS}: difference {eq['diff']:+.4f}, 90% interval "
            f"{ci(eq['ci90'])}, TOST p {eq['p']:.4f}: {'equivalent' if eq['equivalent'] else 'not shown equivalent'}.")  # fmt: skip


def tables(results: dict) -> str:
    reference = results["declared"]["reference_bases"]
    lines = [f"## Bases (chatglm2-small, zhbase, 3 epochs; the arms' seeds and contrasts use the bases {reference or '(none yet)'})",
             "", "| bases (base 0's sha256) | device sessions | seed | steps | tokens | zhbase validation loss by epoch | "
             "train s | tokens/s | weights sha256 |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for generation, seeds in results["pretraining"].items():
        for seed, base in seeds.items():
            curve = " → ".join(f"{x:.4f}" for x in base["val_loss_by_epoch"])
            sha = base["weights_sha256"][:8] if base["weights_sha256"] else "not recorded"
            where = ", ".join(base["device_sessions"])
            if base.get("carried_to"):
                where += f" (carried to {', '.join(base['carried_to'])})"
            lines.append(f"| {generation} | {where} | {seed} | {base['steps']:,} | "
                         f"{base['tokens']:,} | {curve} | {base['train_seconds']:.0f} | {base['tokens_per_second']:,} | "
                         f"{sha} |")  # fmt: skip
    if results["determinism_probe"]:
        lines += ["", "## Does a compiled pretraining repeat? (60 steps of base 0, weights' sha256)", "",
                  "| device session | inductor mode | alone | beside the bases' pretraining | the same |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for session, modes in results["determinism_probe"].items():
            for mode, e in modes.items():
                lines.append(f"| {session} | {mode} | {e['alone']} | {e['beside']} | {e['repeats']} |")
    if results["resume_probe"]:
        lines += ["", "## Does a compiled run stopped and resumed in a new process repeat? (CPsyCoun split_shuffled+token "
                  "from random weights, 60 steps; weights' sha256)", "",
                  "| device session | model.compile_dynamic | uninterrupted | stopped, then resumed | stopped after step "
                  "| the same | tokens/s (uninterrupted, alone, after 10 steps) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for session, modes in results["resume_probe"].items():
            for mode, e in modes.items():
                setting = {"auto": "null (torch's choice)", "rows": "rows"}[mode]
                speed = f"{e['tokens_per_second']:,}" if e["tokens_per_second"] else "—"
                lines.append(f"| {session} | {setting} | {e['whole']} | {e['resumed']} | {e['stopped_after_step']} | "
                             f"{e['repeats']} | {speed} |")  # fmt: skip
    if results["evaluation_probe"]:
        lines += ["", "## Does the test evaluation change when it runs uncompiled? (CPsyCoun session+token seed 0, "
                  "trained twice: its kept run evaluated compiled, the probe uncompiled)", "",
                  "| device session | training repeats | test loss, compiled | uncompiled | difference | largest turn "
                  "difference | official ROUGE-1 / ROUGE-L / BLEU-4 difference | seconds (generation, teacher-forced), "
                  "compiled | uncompiled |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for session, e in results["evaluation_probe"].items():
            o, t = e["official_difference"], e["seconds"]
            lines.append(f"| {session} | {e['training_repeats']} | {e['test_loss']['compiled']:.6f} | "
                         f"{e['test_loss']['uncompiled']:.6f} | {e['test_loss_difference']:+.2e} | "
                         f"{e['largest_turn_loss_difference']:.2e} | {o['rouge-1']:+.2f} / {o['rouge-l']:+.2f} / "
                         f"{o['bleu-4']:+.2f} | {t['compiled']['generation']:.0f}, {t['compiled']['teacher_forced']:.0f} | "
                         f"{t['uncompiled']['generation']:.0f}, {t['uncompiled']['teacher_forced']:.0f} |")  # fmt: skip
    if results["reruns"]:
        lines += ["", "## Does a run repeat? (jobs trained and evaluated in two calls from the same bases; the later "
                  "call's record is the one kept)", "",
                  "| bases | job | calls | test loss | spread | validation curves equal | largest validation "
                  "difference |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for e in results["reruns"]:
            lines.append(f"| {e['bases']} | {e['job']} | {', '.join(e['calls'])} | "
                         f"{' / '.join(f'{x:.6f}' for x in e['test_loss'])} | {e['test_loss_spread']:.1e} | "
                         f"{e['val_curves_equal']} | {e['largest_val_difference']:.1e} |")  # fmt: skip
    lines += ["", "## Step 0: each base's test answer loss (chatglm2 template), before fine-tuning", "",
              "| bases | corpus | seed | test sessions | test loss | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU-4 | empty |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for generation, by_corpus in results["step0"].items():
        for corpus, seeds in by_corpus.items():
            for seed, m in seeds.items():
                o = m["official"]
                lines.append(f"| {generation} | {corpus} | {seed} | {m['test_sessions']} | {m['test_loss']:.4f} | "
                             f"{o['rouge-1']:.2f} | {o['rouge-2']:.2f} | {o['rouge-l']:.2f} | {o['bleu-4']:.2f} | "
                             f"{o['empty_predictions']} |")  # fmt: skip
    g = results["gate"]
    lines += ["", "## The gate", "", f"SMILE base seed 0 ({g['bases']}) step-0 test loss {g['base_step0_test_loss']:.4f}; "
              f"{g['pilot']} ends at {g['pilot_test_loss']:.4f}: {g['drop_nats']:.4f} nats below "
              f"(required {g['required_nats']}): {'passed' if g['passed'] else 'NOT passed'}."]  # fmt: skip
    g = results["gate_on_reference_bases"]
    if g["passed"] is None:
        lines += ["", f"On the reference bases: {g['why']}."]
    else:
        lines += ["", f"On the reference bases ({g['bases']}): base seed 0's step-0 SMILE test loss "
                  f"{g['base_step0_test_loss']:.4f}; {g['pilot']} ends at {g['pilot_test_loss']:.4f}: "
                  f"{g['drop_nats']:.4f} nats below: {'passed' if g['passed'] else 'NOT passed'}."]  # fmt: skip
    lines += ["", "## Rate grids (one run a rate: base seed 0, seed 0; last validation loss, the chosen rate in bold)",
              "", "| arm + reduction | " + " | ".join(f"lr {r}" for r in GRID_RATES)
              + " | chosen | interior | bases |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm, entry in results["lr_grid"].items():
        cells = []
        screened = entry.get("screening", {}).get("rates", {})
        for rate in GRID_RATES:
            r = entry["rates"].get(rate)
            cell = f"{r['val_last']:.4f}" if r else "screened out" if screened.get(rate, {}).get("screened_out") else "—"
            cells.append(f"**{cell}**" if rate == entry["chosen"] else cell)
        bases = ", ".join(sorted({r["bases"] for r in entry["rates"].values()})) or REFERENCE_BASES
        out = sum(r["screened_out"] for r in screened.values())
        interior = f"{entry['interior']}" + ("" if entry["complete"] else
                                             f" ({len(entry['rates'])} of {len(GRID_RATES)} rates run"
                                             + (f", {out} screened out)" if out else ")"))  # fmt: skip
        lines.append(f"| {arm} | {' | '.join(cells)} | {entry['chosen'] or '—'} | {interior} | {bases} |")
    screened = {arm: entry["screening"] for arm, entry in results["lr_grid"].items() if "screening" in entry}
    if screened:
        lines += ["", f"## Screened rates (stopped grid runs: a rate more than {SCREEN_NATS} nats behind the best at "
                  f"the last validation all reached, and no less behind {SCREEN_WINDOW} validations before, is not "
                  "run again)", "", "| arm + reduction | record | validation | "
                  + " | ".join(f"lr {r}" for r in GRID_RATES) + " |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for arm, e in screened.items():
            cells = [f"{r['val_curve'][-1]:.4f} (+{r['lag']:.3f}, +{r['lag_before']:.3f} before)"
                     + (" **out**" if r["screened_out"] else "") for r in e["rates"].values()]  # fmt: skip
            lines.append(f"| {arm} | {e['record']} | {e['validation']} | {' | '.join(cells)} |")
    if reference is None:
        lines += ["", "## The arms", "", "No reference bases yet: the next pretraining (with model.compile_deterministic) "
                  "makes them, and REFERENCE_BASES names them."]  # fmt: skip
    for generation, arms in [(reference, results["arms"]), *results["arms_on_earlier_bases"].items()]:
        lines += arm_tables(generation, arms, generation == reference)
    return "\n".join(lines) + "\n"


def arm_tables(generation: str, arms: dict, is_reference: bool) -> list[str]:
    """One generation's arms, contrasts, equivalence and check, per corpus."""
    lines = []
    for corpus, c in arms.items():
        if not c["arms"]:
            if is_reference:
                waiting = c.get("waiting_for_step0", [])
                lines += ["", f"## {corpus}: the arms from the bases {generation}", "",
                          f"{len(waiting)} runs ({', '.join(waiting)}) wait for the bases' step-0 evaluation on "
                          f"{corpus} (`--phase evaluate`)." if waiting else "No arm has run from them yet."]  # fmt: skip
            continue
        what = "the reference bases" if is_reference else "earlier bases, not paired with the reference"
        lines += ["", f"## {corpus}: the arms at their chosen rates from the bases {generation} ({what}; test answer "
                  "loss, every test session)", "",
                  "| arm | rate | seeds | test loss mean ± std | 95% interval (bases → seeds → sessions) | gain over base | "
                  "last val | best val | ROUGE-1 | ROUGE-L | BLEU-4 |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for arm, e in c["arms"].items():
            t, o = e["test_loss"], e["official"]
            lines.append(f"| {arm} | {e['rate']} | {t['n']} | {t['mean']:.4f} ± {t['std']:.4f} | {ci(t.get('ci95'))} | "
                         f"{e['gain_over_base']:.4f} | {e['val_last']['mean']:.4f} | {e['val_best']['mean']:.4f} | "
                         f"{o['rouge-1']['mean']:.2f} | {o['rouge-l']['mean']:.2f} | {o['bleu-4']['mean']:.2f} |")  # fmt: skip
        refs = c["references"]
        for name, r in refs.items():
            o = r["chatglm2_official"]
            lines.append(f"| *{name}* | — | — | — | — | — | — | — | {o['rouge-1']:.2f} | {o['rouge-l']:.2f} | "
                         f"{o['bleu-4']:.2f} |")  # fmt: skip
        lines += [
            "",
            "| contrast (a − b, test loss) | difference | 95% interval | p | p (Holm) |",
            "|---|---|---|---|---|",
        ]
        for key, d in c["contrasts"].items():
            if d is None:
                lines.append(f"| {key} | not run yet | | | |")
            else:
                holm_p = f"{d['p_holm']:.4f}" if "p_holm" in d else "— (family incomplete)"
                lines.append(f"| {key} | {d['diff']:+.4f} | {ci(d['ci95'])} | {d['p_two_sided']:.4f} | {holm_p} |")
        by_turn = {arm: e["test_loss_by_turn"] for arm, e in c["arms"].items() if e.get("test_loss_by_turn")}
        if by_turn:
            buckets = list(next(iter(by_turn.values())))
            lines += ["", "Test answer loss by turn position (arms with 5 seeds; mean over seeds; intervals in "
                      "`results.json`):", "", "| arm | " + " | ".join(f"turn {b}" for b in buckets) + " |",
                      "|---|" + "---|" * len(buckets)]  # fmt: skip
            for arm, turns in by_turn.items():
                lines.append(f"| {arm} | " + " | ".join(f"{turns[b]['point']:.4f}" for b in buckets) + " |")
        if c.get("contrasts_by_turn"):
            lines += ["", "The contrasts by turn position (exploratory: outside the Holm family; difference and 95% "
                      "interval):", "", "| contrast (a − b) | " + " | ".join(f"turn {b}" for b in buckets) + " |",
                      "|---|" + "---|" * len(buckets)]  # fmt: skip
            for key, by_bucket in c["contrasts_by_turn"].items():
                cells = [f"{d['diff']:+.4f} {ci(d['ci95'])}" for d in by_bucket.values()]
                lines.append(f"| {key} | " + " | ".join(cells) + " |")
        eq = c["equivalence"]
        lines.append("")
        if eq:
            lines.append(equivalence_line(EQUIVALENCE, eq))
        else:
            lines.append(f"Equivalence of {' and '.join(EQUIVALENCE)}: not run yet (both arms need 5 seeds).")
        if any(c.get("secondary", {}).values()) or (is_reference and "secondary" in c):
            lines += ["", "Three epochs (secondary, outside the Holm family; declared in session 13, after CPsyCoun's "
                      "3-epoch runs, before SMILE's):", "", "| contrast (a − b, test loss) | difference | 95% interval | "
                      "p |", "|---|---|---|---|"]  # fmt: skip
            for key, d in c["secondary"].items():
                lines.append(f"| {key} | not run yet | | |" if d is None else
                             f"| {key} | {d['diff']:+.4f} | {ci(d['ci95'])} | {d['p_two_sided']:.4f} |")  # fmt: skip
            if c.get("equivalence_3ep"):
                lines += ["", equivalence_line(EQUIVALENCE_3EP, c["equivalence_3ep"])]
        if c["check"]:
            k = c["check"]
            lines.append(f"\nCheck (Invariant 2): split_grouped+token vs session+token, seed 0: validation curves differ "
                         f"by at most {k['max_abs_val_loss_diff']:.4f}, test losses by {k['test_loss_diff']:+.4f} "
                         f"(session+token's seed std {k['seed_std_of_session_token']:.4f}).")  # fmt: skip
    return lines


def main() -> None:
    raw = HERE / "raw"
    merged = merge(in_call_order(list(raw.glob("*.json"))))
    generations = merged["generations"]
    sessions = per_session(in_call_order(list(raw.glob("*.tgz"))), merged["generation_of"])
    kept = {job for job, found in sessions.get(REFERENCE_BASES, {}).items() if "test_losses" in found}
    kept |= {job for by_job in sessions.values() for job in by_job if job.startswith("check/")}
    (raw / "kept_test_losses.txt").write_text("".join(f"{job}\n" for job in sorted(kept)))  # for run.py
    step0_losses = {g: step0(entry["base_eval"]) for g, entry in generations.items() if entry["base_eval"]}
    lr_grid = grids(generations)
    arms_by_generation = {}
    for g, entry in generations.items():
        found = sessions.get(g, {})
        arms = {corpus: corpus_arms(corpus, entry["runs"], found, lr_grid, step0_losses.get(g, {}))
                for corpus in ("smile", "cpsycoun")}  # fmt: skip
        if g == REFERENCE_BASES or any(c["arms"] for c in arms.values()):
            for corpus, c in arms.items():
                c["references"] = references(corpus, found)
                c["fixed_answer_check"] = fixed_answer_flags(c["arms"], c["references"])
            arms_by_generation[g] = arms
    reference = arms_by_generation.get(REFERENCE_BASES, {})
    plotted = next((g for g in [REFERENCE_BASES, *sorted(arms_by_generation)]
                    if any(c["arms"] for c in arms_by_generation.get(g, {}).values())), None)  # fmt: skip
    for corpus in ("smile", "cpsycoun"):
        if plotted:
            plot_arms(corpus, generations[plotted]["runs"], sessions.get(plotted, {}), lr_grid)
    best_gain = {
        corpus: max(((f"{arm} ({g})", e["gain_over_base"]) for g, arms in arms_by_generation.items()
                     for arm, e in arms[corpus]["arms"].items()), key=lambda x: x[1], default=None)
        for corpus in ("smile", "cpsycoun")
    }  # fmt: skip
    results = {
        "regime": {
            "preset": "chatglm2-small",
            "tokenizer": "glm_session/resources/tokenizer_zhbase (16,005 pieces, zhbase only)",
            "pretraining": "experiment=unseen/pretrain: zhbase, 3 epochs, 65,536 tokens a step, lr 2e-3",
            "fine_tuning": "experiment=unseen/<corpus>_<arm>: one epoch, validation every quarter epoch",
            "reference_bases": REFERENCE_BASES,
            "base_step0_test_loss": {
                g: {
                    f"seed{b}": {
                        corpus: seeds[f"seed{b}"]["test_loss"]
                        for corpus, seeds in by_corpus.items()
                        if f"seed{b}" in seeds
                    }
                    for b in (0, 1)
                }
                for g, by_corpus in step0_losses.items()
            },  # fmt: skip
            "best_gain_over_base": {
                corpus: {"arm": g[0], "nats": round(g[1], 4)} if g else None for corpus, g in best_gain.items()
            },  # fmt: skip
        },
        "splits": {
            corpus: {"sessions": data["sessions"], "openings": data["openings"], "turns": data["turns"]}
            for corpus, data in merged["data"].items()
            if "openings" in data
        },  # fmt: skip
        "pretraining": {g: pretraining(e["runs"], e["bases"], e["sessions"], e.get("carried_to", []))
                        for g, e in generations.items()},  # fmt: skip
        "determinism_probe": determinism_probes(merged["probes"]),
        "resume_probe": resume_probes(merged["probes"], merged["probe_runs"]),
        "evaluation_probe": evaluation_probes(
            merged["probe_runs"], generations.get(REFERENCE_BASES, {}).get("runs", {})
        ),
        "reruns": reruns(in_call_order(list(raw.glob("*.json"))), merged["generation_of"]),
        "step0": step0_losses,
        "lr_grid": lr_grid,
        "gate": gate(step0_losses, lr_grid),
        "gate_on_reference_bases": gate_on_reference(step0_losses, reference),
        "arms": reference,
        "arms_on_earlier_bases": {g: a for g, a in arms_by_generation.items() if g != REFERENCE_BASES},
        "curves_plotted_from": plotted,
        "equivalence": {corpus: c["equivalence"] for corpus, c in reference.items()},
        "declared": {
            "margin_nats": MARGIN_NATS,
            "equivalence": list(EQUIVALENCE),
            "contrasts": CONTRASTS,
            "secondary": SECONDARY,
            "equivalence_3ep": list(EQUIVALENCE_3EP),
            "seeds": SEEDS,
            "resamples": RESAMPLES,
            "gate_nats": GATE_NATS,
            "reference_bases": REFERENCE_BASES,
        },  # fmt: skip
        "sources": sorted(p.name for p in raw.iterdir()),
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    (HERE / "tables.md").write_text(tables(results))
    print(tables(results))


if __name__ == "__main__":
    main()
