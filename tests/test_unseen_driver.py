"""The driver of experiments/unseen_base: which jobs it plans, from which base, and when a job counts as done."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("unseen_run", ROOT / "experiments" / "unseen_base" / "run.py")
driver = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = driver  # dataclasses look their module up
spec.loader.exec_module(driver)
spec = importlib.util.spec_from_file_location(
    "unseen_aggregate", ROOT / "experiments" / "unseen_base" / "aggregate.py"
)
aggregate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aggregate)


def plan(tmp_path, **kwargs):
    defaults = dict(phases=[], bases=[0, 1], arms=[], seeds_of=[], rates={}, kept=set(), extra=[], eval_extra=[])
    return driver.plan(tmp_path / "root", tmp_path / "data", **{**defaults, **kwargs})


def overrides(job):
    return {a.split("=", 1)[0]: a.split("=", 1)[1] for a in job.command if "=" in a}


def test_seeds_alternate_bases_at_the_chosen_rate(tmp_path):
    jobs = plan(tmp_path, seeds_of=["cpsycoun_session+token"], rates={"cpsycoun_session+token": "2e-3"})
    runs = [j for j in jobs if not j.name.startswith("data/")]
    assert [j.name for j in runs] == [f"seeds/cpsycoun_session+token_seed{s}" for s in range(5)] + [
        "check/cpsycoun_split_grouped+token_seed0"
    ]
    root = tmp_path / "root"
    assert [j.init for j in runs] == [root / f"pretrain/seed{b}/checkpoints/last.ckpt" for b in (0, 1, 0, 1, 0, 0)]
    assert [overrides(j)["seed"] for j in runs] == ["0", "1", "2", "3", "4", "0"]
    assert {overrides(j)["optimizer.lr"] for j in runs} == {"2e-3"}
    assert overrides(runs[-1])["experiment"] == "unseen/cpsycoun_split_grouped"
    assert runs[1].needs == ["data/cpsycoun", "pretrain/seed1"]


def test_a_kept_grid_run_is_seed_0_and_an_arm_without_an_interior_rate_waits(tmp_path):
    jobs = plan(tmp_path, seeds_of=["smile_last+token", "smile_rising+token"], rates={"smile_last+token": "5e-4"},
                kept={"grid/smile_last+token_lr5e-4"})  # fmt: skip
    assert [j.name for j in jobs if j.name.startswith("seeds/")] == [
        f"seeds/smile_last+token_seed{s}" for s in (1, 2, 3, 4)
    ]


def test_a_kept_check_is_not_run_again(tmp_path):
    jobs = plan(tmp_path, seeds_of=["smile_session+token"], rates={"smile_session+token": "2e-3"},
                kept={"check/smile_split_grouped+token_seed0"})  # fmt: skip
    assert not [j for j in jobs if j.name.startswith("check/")]
    assert len([j for j in jobs if j.name.startswith("seeds/")]) == 5


def test_a_kept_step_0_evaluation_is_not_run_again(tmp_path):
    jobs = plan(tmp_path, phases=["evaluate"], kept={"base_eval/smile_seed0", "base_eval/kdconv_seed1"})
    assert [j.name for j in jobs if j.name.startswith("base_eval/")] == [
        "base_eval/smile_seed1",
        "base_eval/cpsycoun_seed0",
        "base_eval/cpsycoun_seed1",
        "base_eval/kdconv_seed0",
    ]


def test_the_probe_runs_alone_one_after_the_other_then_stops_and_resumes_beside_the_pretraining(tmp_path):
    jobs = {j.name: j for j in plan(tmp_path, phases=["pretrain", "probe"], extra=["speed=fast"])}
    assert list(jobs) == ["data/zhbase", "data/cpsycoun", "probe/auto_whole", "probe/rows_whole",
                          "probe/auto_stopped", "probe/auto_resumed", "probe/rows_stopped", "probe/rows_resumed",
                          "pretrain/seed0", "pretrain/seed1"]  # fmt: skip
    assert jobs["probe/auto_whole"].needs == ["data/cpsycoun"] and not jobs["probe/auto_whole"].after
    # One after the other, then together; a probe that fails (a mode that does not compile) holds nothing back.
    assert jobs["probe/rows_whole"].after == ["probe/auto_whole"]
    for name in ("probe/auto_stopped", "probe/rows_stopped", "pretrain/seed0", "pretrain/seed1"):
        assert jobs[name].after == ["probe/rows_whole"] and "probe/rows_whole" not in jobs[name].needs
    root = tmp_path / "root"
    for mode, setting in (("auto", "null"), ("rows", "rows")):
        whole, stopped, resumed = (overrides(jobs[f"probe/{mode}_{how}"]) for how in ("whole", "stopped", "resumed"))  # fmt: skip
        assert whole["model.compile_dynamic"] == stopped["model.compile_dynamic"] == setting
        assert whole["trainer.max_steps"] == "60" and whole["model.init_from"] == "null"
        assert whole["speed"] == "fast" and whole["experiment"] == "unseen/cpsycoun_split_shuffled"
        assert stopped["stop_after_step"] == "30" and "stop_after_step" not in whole
        assert jobs[f"probe/{mode}_resumed"].needs == [f"probe/{mode}_stopped"]
        assert resumed["ckpt_path"] == str(root / f"probe/{mode}_stopped/checkpoints/last.ckpt")
        assert {k: v for k, v in resumed.items() if k not in ("ckpt_path", "hydra.run.dir")} == {
            k: v for k, v in whole.items() if k != "hydra.run.dir"
        }
    assert "model.compile_dynamic" not in overrides(jobs["pretrain/seed0"])  # the experiment's own: rows


def test_a_job_after_another_starts_when_that_one_ended_done_or_not(tmp_path):
    root = tmp_path / "root"
    complete = "import json, pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True); " \
               "(p / 'metrics.json').write_text(json.dumps({'status': 'completed'}))"  # fmt: skip
    jobs = [driver.Job("probe/auto_whole", [sys.executable, "-c", "raise SystemExit(1)"]),
            driver.Job("pretrain/seed0", [sys.executable, "-c", complete, str(root / "pretrain/seed0")],
                       after=["probe/auto_whole"]),
            driver.Job("pretrain/seed1", [sys.executable, "-c", complete, str(root / "pretrain/seed1")],
                       needs=["probe/auto_whole"])]  # fmt: skip
    driver.run(jobs, root, deadline=120, last_start=120, grace=5, at_once=4, memory=100)
    assert [job.status for job in jobs] == ["failed (exit 1)", "done", "skipped (a job it needs did not finish)"]
    first, second, skipped = (job.seconds for job in jobs)  # when each started and ended, from the call's start
    assert len(first) == len(second) == 2 and first[0] <= first[1] <= second[0] <= second[1] and skipped == []
    assert driver.summary(jobs, root)["job_seconds"] == {"probe/auto_whole": first, "pretrain/seed0": second}


def test_a_stopped_probe_is_done_once_stop_after_step_stopped_it(tmp_path):
    jobs = {j.name: j for j in plan(tmp_path, phases=["probe"])}
    root = tmp_path / "root"
    folder = root / "probe/auto_stopped"
    folder.mkdir(parents=True)
    assert not driver.done(root, jobs["probe/auto_stopped"])
    (folder / "metrics.json").write_text(json.dumps({"status": "stopped", "global_steps": 30}))
    assert driver.done(root, jobs["probe/auto_stopped"])
    (root / "probe/auto_whole").mkdir(parents=True)
    (root / "probe/auto_whole/metrics.json").write_text(json.dumps({"status": "stopped"}))
    assert not driver.done(root, jobs["probe/auto_whole"])  # an uninterrupted probe must complete


def test_the_probes_tables_say_whether_a_resumed_run_repeats():
    probes = {"s7": {"probe/default_alone": "aa" * 32, "probe/default_beside": "ab" * 32,
                     "probe/deterministic_alone": "cc" * 32, "probe/deterministic_beside": "cc" * 32},
              "s8": {"probe/auto_whole": "11" * 32, "probe/auto_resumed": "12" * 32,
                     "probe/rows_whole": "33" * 32, "probe/rows_resumed": "33" * 32}}  # fmt: skip
    runs = {"s8": {"probe/auto_stopped": {"global_steps": 30}, "probe/auto_whole": {"tokens_per_second": 1234.4},
                   "probe/rows_stopped": {"global_steps": 30}}}  # fmt: skip
    assert aggregate.determinism_probes(probes) == {
        "s7": {"default": {"alone": "aaaaaaaa", "beside": "abababab", "repeats": False},
               "deterministic": {"alone": "cccccccc", "beside": "cccccccc", "repeats": True}}
    }  # fmt: skip
    assert aggregate.resume_probes(probes, runs) == {
        "s8": {"auto": {"whole": "11111111", "resumed": "12121212", "repeats": False, "stopped_after_step": 30,
                        "tokens_per_second": 1234},
               "rows": {"whole": "33333333", "resumed": "33333333", "repeats": True, "stopped_after_step": 30,
                           "tokens_per_second": None}}
    }  # fmt: skip


def test_the_machine_load_reads_the_first_gpu_and_says_none_without_nvidia_smi():
    two_gpus = [sys.executable, "-c", "print('87, 40960'); print('3, 512')"]
    sample = driver.machine_load(30.4, 10, query=two_gpus)
    assert (sample["seconds"], sample["jobs"], sample["gpu_utilisation"], sample["gpu_memory_mib"]) == (
        30,
        10,
        87,
        40960,
    )
    assert sample["cpu_load"] >= 0 and sample["cpus"] >= 1
    for query in (
        ["no-such-nvidia-smi"],
        [sys.executable, "-c", "print('[N/A], 512')"],
        [sys.executable, "-c", ""],
    ):
        sample = driver.machine_load(0, 0, query=query)
        assert sample["gpu_utilisation"] is None and sample["gpu_memory_mib"] is None


def test_runs_are_grouped_by_the_weights_of_their_bases():
    a0, a1, b0, b1 = "420cacc8" + "0" * 56, "9da81ec8" + "0" * 56, "6cdfac42" + "0" * 56, "77" * 32
    summaries = [
        ("s1", {"runs": {}}),  # the first session recorded no fingerprints
        ("s2", {"bases": {"pretrain/seed0": a0, "pretrain/seed1": a1}}),
        ("s2", {"bases": {}}),  # an arms call of the same session
        ("s4", {"bases": {"pretrain/seed0": a0, "pretrain/seed1": a1}}),
        ("s6", {"bases": {"pretrain/seed0": b0}}),
        ("s7", {"bases": {"pretrain/seed0": b0, "pretrain/seed1": b1}}),
        ("s8", {"bases": {"pretrain/seed1": b1}}),  # base 1 alone: its generation by base 1's weights
    ]
    assert aggregate.generations_of(summaries) == {"s1": "s1: not fingerprinted", "s2": "420cacc8", "s4": "420cacc8",
                                                   "s6": "6cdfac42", "s7": "6cdfac42", "s8": "6cdfac42"}  # fmt: skip
    with pytest.raises(SystemExit, match="pretrain/seed1 differs between sessions s7 and s9"):
        aggregate.generations_of([*summaries, ("s9", {"bases": {"pretrain/seed0": b0, "pretrain/seed1": a1}})])
    assert aggregate.device_session(Path("raw/s6_call3_arms.json")) == "s6"
    assert aggregate.device_session(Path("raw/call2_pretrain.json")) == "s1"


def test_a_grid_runs_six_rates_from_base_0(tmp_path):
    jobs = [j for j in plan(tmp_path, arms=["smile_split_shuffled+sample"]) if j.name.startswith("grid/")]
    assert [overrides(j)["optimizer.lr"] for j in jobs] == ["1e-4", "2e-4", "5e-4", "1e-3", "2e-3", "5e-3"]
    assert {overrides(j)["model.reduction"] for j in jobs} == {"sample"}
    assert {overrides(j)["seed"] for j in jobs} == {"0"}
    assert {j.memory_gib for j in jobs} == {14.5}  # a SMILE split arm: its test evaluation's, above its training's


def test_a_given_base_replaces_pretraining(tmp_path):
    base = tmp_path / "chatglm2-6b"
    base.mkdir()
    jobs = plan(tmp_path, phases=["pretrain", "evaluate"], seeds_of=["smile_session+token"],
                rates={"smile_session+token": "1e-4"}, given=[base])  # fmt: skip
    assert not [
        j for j in jobs if j.name.startswith(("pretrain/", "base_eval/"))
    ]  # a folder: not evaluate's input
    runs = [j for j in jobs if j.name.startswith("seeds/")]
    assert {j.init for j in runs} == {base} and all(j.needs == ["data/smile"] for j in runs)


def test_a_grid_run_is_done_once_trained_its_test_evaluation_is_not_needed(tmp_path):
    root = tmp_path / "root"
    job = driver.Job("grid/smile_split_shuffled+sample_lr1e-3", [])
    (root / job.name).mkdir(parents=True)
    (root / job.name / "metrics.json").write_text(json.dumps({"status": "stopped"}))
    assert not driver.done(root, job)
    (root / job.name / "metrics.json").write_text(json.dumps({"status": "completed"}))
    assert driver.done(root, job)  # its validation curve is what the grid reads


def test_a_run_is_done_only_when_trained_and_evaluated(tmp_path):
    root = tmp_path / "root"
    job = driver.Job("seeds/smile_session+token_seed1", [])
    folder = root / job.name
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"status": "stopped"}))
    assert not driver.done(root, job)
    (folder / "metrics.json").write_text(json.dumps({"status": "completed"}))
    assert not driver.done(root, job)  # stopped by the deadline while it evaluated the test split
    (folder / "evaluation").mkdir()
    (folder / "evaluation" / "metrics.json").write_text("{}")
    assert driver.done(root, job)


def test_the_aggregate_says_a_grid_is_complete_only_with_every_rate_of_the_drivers_grid():
    assert aggregate.GRID_RATES == driver.GRID_RATES

    def run(rate, last):
        return {f"grid/smile_split_samples+token_lr{rate}": {"status": "completed", "global_steps": 6449,
                                                              "val_curve": [{"loss": last + 0.3}, {"loss": last}]}}  # fmt: skip

    five = {k: v for rate, last in zip(driver.GRID_RATES[:5], (3.3, 3.2, 3.1, 3.0, 3.2), strict=True)
            for k, v in run(rate, last).items()}  # fmt: skip
    entry = aggregate.grids({"39afcc51": {"runs": five}})["smile_split_samples+token"]
    assert (entry["chosen"], entry["interior"], entry["complete"], entry["decades"]) == ("1e-3", True, False, 1.3)
    six = {**five, **run("5e-3", 3.5)}
    entry = aggregate.grids({"39afcc51": {"runs": six}})["smile_split_samples+token"]
    assert (entry["chosen"], entry["interior"], entry["complete"], entry["decades"]) == ("1e-3", True, True, 1.7)


def test_only_interior_rates_of_complete_grids_are_chosen(tmp_path):
    results = tmp_path / "results.json"
    every = {rate: {} for rate in driver.GRID_RATES}
    four = {rate: {} for rate in ("1e-4", "2e-4", "5e-4", "1e-3")}
    results.write_text(json.dumps({"lr_grid": {"a+token": {"rates": every, "chosen": "2e-3", "interior": True},
                                               "b+token": {"rates": every, "chosen": "5e-3", "interior": False},
                                               "c+token": {"rates": four, "chosen": "5e-4", "interior": True}}}))  # fmt: skip
    assert driver.chosen_rates(results) == {"a+token": "2e-3"}  # c: two rates not run, its choice may move
    assert driver.chosen_rates(None) == {} and driver.chosen_rates(tmp_path / "none.json") == {}
    assert driver.recorded_rates(results)["c+token"] == {"1e-4", "2e-4", "5e-4", "1e-3"}
    assert driver.grids_file(None, None) == driver.HERE / "results.json"
    assert driver.grids_file(None, [tmp_path / "chatglm2-6b"]) is None  # another base runs its own grids
    assert driver.grids_file(results, [tmp_path / "chatglm2-6b"]) == results


def screening_record(tmp_path, curves: dict[str, list[float]], arm: str = "smile_session_3ep+token") -> Path:
    runs = {f"grid/{arm}_lr{rate}": {"status": "stopped", "val_curve": [{"loss": x} for x in curve]}
            for rate, curve in curves.items()}  # fmt: skip
    record = tmp_path / "s14_call8_arms.json"
    record.write_text(json.dumps({"runs": runs}))
    return record


def test_a_stopped_grid_screens_out_the_rates_that_trail_by_more_than_the_margin_and_fall_further_behind(tmp_path):
    assert (aggregate.SCREEN_NATS, aggregate.SCREEN_WINDOW) == (0.1, 3)
    curves = {  # four validations shared (5e-4 reached a fifth, not used), the best 3.00 at the fourth
        "1e-4": [3.80, 3.60, 3.50, 3.40],  # 0.40 behind, 0.30 at the first: out
        "2e-4": [3.55, 3.40, 3.30, 3.20],  # 0.20 behind, 0.05 at the first: out
        "5e-4": [3.50, 3.30, 3.20, 3.09, 3.00],  # 0.09 behind (growing): within the margin, kept
        "1e-3": [3.50, 3.25, 3.10, 3.00],  # the best
        "2e-3": [3.60, 3.35, 3.20, 3.05],  # 0.05 behind
        "5e-3": [4.00, 3.70, 3.45, 3.25],  # 0.25 behind but 0.50 at the first: catching up, kept
    }
    result = aggregate.screening("smile_session_3ep+token", screening_record(tmp_path, curves))
    assert (result["record"], result["validation"]) == ("s14_call8_arms.json", 4)
    assert {rate: (r["lag"], r["lag_before"], r["screened_out"]) for rate, r in result["rates"].items()} == {
        "1e-4": (0.4, 0.3, True), "2e-4": (0.2, 0.05, True), "5e-4": (0.09, 0.0, False),
        "1e-3": (0.0, 0.0, False), "2e-3": (0.05, 0.1, False), "5e-3": (0.25, 0.5, False),
    }  # fmt: skip
    assert result["rates"]["5e-4"]["val_curve"] == [3.5, 3.3, 3.2, 3.09]
    with pytest.raises(SystemExit, match="no grid run of smile_session_3ep\\+token at \\['5e-3'\\]"):
        aggregate.screening("smile_session_3ep+token",
                            screening_record(tmp_path, {k: v for k, v in curves.items() if k != "5e-3"}))  # fmt: skip
    with pytest.raises(SystemExit, match="share 3 validations, too few"):
        aggregate.screening("smile_session_3ep+token",
                            screening_record(tmp_path, {k: v[:3] for k, v in curves.items()}))  # fmt: skip


def test_a_screened_out_rate_completes_the_grid_and_bounds_the_choice(tmp_path, monkeypatch):
    arm = "smile_session_3ep+token"
    curves = {"1e-4": [3.8, 3.6, 3.5, 3.4], "2e-4": [3.55, 3.4, 3.3, 3.2], "5e-4": [3.5, 3.3, 3.2, 3.09],
              "1e-3": [3.5, 3.25, 3.1, 3.0], "2e-3": [3.6, 3.35, 3.2, 3.05], "5e-3": [4.0, 3.7, 3.45, 3.25]}  # fmt: skip
    (tmp_path / "raw").mkdir()
    screening_record(tmp_path / "raw", curves)
    monkeypatch.setattr(aggregate, "HERE", tmp_path)
    monkeypatch.setattr(aggregate, "SCREENED", {arm: "s14_call8_arms.json"})

    def completed(rates_and_losses):
        return {"39afcc51": {"runs": {f"grid/{arm}_lr{rate}": {"status": "completed", "global_steps": 3750,
                                                                "val_curve": [{"loss": loss}]}
                                      for rate, loss in rates_and_losses.items()}}}  # fmt: skip

    entry = aggregate.grids({"39afcc51": {"runs": {}}})[arm]  # screened, nothing run again yet
    assert (entry["chosen"], entry["interior"], entry["complete"]) == (None, False, False)
    entry = aggregate.grids(completed({"5e-4": 2.80, "1e-3": 2.85, "2e-3": 2.90, "5e-3": 3.0}))[arm]
    assert (entry["chosen"], entry["interior"], entry["complete"], entry["decades"]) == ("5e-4", True, True, 1.7)
    entry = aggregate.grids(completed({"5e-4": 2.9, "1e-3": 2.85, "2e-3": 2.83, "5e-3": 2.80}))[arm]
    assert (entry["chosen"], entry["interior"], entry["complete"]) == ("5e-3", False, True)  # extend the grid
    entry = aggregate.grids(completed({"5e-4": 2.9, "1e-3": 2.85, "2e-3": 2.83}))[arm]
    assert (entry["chosen"], entry["interior"], entry["complete"]) == ("2e-3", False, False)  # the highest run
    # the driver: screened rates are recorded (not run again), complete the grid and bound the choice
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"lr_grid": aggregate.grids(completed({"5e-4": 2.80, "1e-3": 2.85, "2e-3": 2.90,
                                                                         "5e-3": 3.0}))}))  # fmt: skip
    assert driver.recorded_rates(results)[arm] == set(driver.GRID_RATES)
    assert driver.recorded_screened(results)[arm] == {"1e-4", "2e-4"}
    assert driver.chosen_rates(results) == {arm: "5e-4"}
    root = tmp_path / "root"
    for rate, loss in {"5e-4": 2.9, "1e-3": 2.85, "2e-3": 2.83, "5e-3": 2.95}.items():
        folder = root / f"grid/{arm}_lr{rate}"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"status": "completed", "val_curve": [{"loss": loss}]}))
    assert arm not in driver.root_rates(root)  # 1e-4 and 2e-4 neither run nor screened out
    assert driver.root_rates(root, screened={arm: {"1e-4", "2e-4"}})[arm] == "2e-3"
    jobs = plan(tmp_path, arms=[arm], recorded=driver.recorded_rates(results))
    assert not [j for j in jobs if j.name.startswith("grid/")]  # four run, two screened out: nothing left


def test_session_14s_screening_leaves_four_rates_of_each_smile_3_epoch_grid_to_run(tmp_path):
    for arm in ("smile_split_shuffled_3ep+token", "smile_session_3ep+token"):
        result = aggregate.screening(arm, aggregate.HERE / "raw" / aggregate.SCREENED[arm])
        assert [rate for rate, r in result["rates"].items() if r["screened_out"]] == ["1e-4", "2e-4"]
    screened = driver.recorded_screened(driver.HERE / "results.json")["smile_session_3ep+token"]
    assert screened == {"1e-4", "2e-4"}
    # As session 17 found the grid: only the screened rates recorded (it ran the other four; results.json has them now)
    jobs = plan(tmp_path, arms=["smile_session_3ep+token"], recorded={"smile_session_3ep+token": screened})
    assert [j.name for j in jobs if j.name.startswith("grid/")] == [
        f"grid/smile_session_3ep+token_lr{rate}" for rate in ("5e-4", "1e-3", "2e-3", "5e-3")
    ]
    # and as it left it: every rate recorded, nothing to run again
    jobs = plan(tmp_path, arms=["smile_session_3ep+token"],
                recorded=driver.recorded_rates(driver.HERE / "results.json"))  # fmt: skip
    assert [j.name for j in jobs if j.name.startswith("grid/")] == []


def test_after_session_20_every_seed_of_both_corpora_is_kept_and_nothing_runs_again(tmp_path):
    # From the repository's own records: the chosen rates (results.json) and the kept runs (raw/)
    rates = driver.chosen_rates(driver.HERE / "results.json")
    assert set(rates) == set(driver.ARMS)
    kept = driver.kept_test_losses(driver.HERE / "raw")
    assert {f"seeds/{arm}_seed{s}" for arm in driver.ARMS for s in (1, 2, 3, 4)} - kept == set()
    # (an arm's seed 0 is its own kept seed run or, where the grid ran on base 0 with seed 0, the grid's run)
    jobs = plan(tmp_path, seeds_of=driver.ARMS, rates=rates, kept=kept)
    assert [j.name for j in jobs if not j.name.startswith("data/")] == []


def test_session_20_planned_seeds_1_3_and_4_of_smiles_3_epoch_session_arm_at_2e_3_in_43_5_gib(tmp_path):
    # Session 20's call, planned from session 19's records: every kept run but those three
    rates = driver.chosen_rates(driver.HERE / "results.json")
    arms = ["smile_split_shuffled_3ep+token", "smile_session_3ep+token"]
    assert [rates[arm] for arm in arms] == ["2e-3", "2e-3"]
    session_20 = {f"seeds/smile_session_3ep+token_seed{s}" for s in (1, 3, 4)}
    kept = driver.kept_test_losses(driver.HERE / "raw") - session_20
    jobs = plan(tmp_path, seeds_of=arms, rates=rates, kept=kept)
    runs = [j for j in jobs if not j.name.startswith("data/")]
    assert [j.name for j in runs] == sorted(session_20)
    assert {overrides(j)["optimizer.lr"] for j in runs} == {"2e-3"}
    assert [overrides(j)["seed"] for j in runs] == ["1", "3", "4"]
    # all three at once on an H100 (81,559 MiB), their test evaluations included: 3 x 14.5 = 43.5 <= 77.6
    h100 = driver.card_memory_gib([sys.executable, "-c", "print(81559)"])
    assert sum(j.memory_gib for j in runs) == 43.5 <= h100 == 77.6
    # session 19's eight runs, planned as it planned them (4 x 12.5 + 4 x 6 = 74), now hold 116: five at once
    assert 4 * driver.memory_gib("smile_split_shuffled_3ep") + 4 * driver.memory_gib("smile_session_3ep") == 116.0


def test_the_jobs_may_hold_the_first_cards_memory_less_2_gib_and_120_without_nvidia_smi():
    two_h200s = [sys.executable, "-c", "print(143771); print(143771)"]
    assert driver.card_memory_gib(two_h200s) == 138.4
    for query in (["no-such-nvidia-smi"], [sys.executable, "-c", "print('[N/A]')"], [sys.executable, "-c", ""]):
        assert driver.card_memory_gib(query) == driver.MEMORY_WITHOUT_GPU_GIB == 120.0


def test_a_grid_runs_only_the_rates_not_recorded(tmp_path, capsys):
    recorded = {"smile_split_shuffled+sample": {"1e-4", "2e-4", "5e-4", "1e-3"}}
    jobs = plan(tmp_path, arms=["smile_split_shuffled+sample", "smile_split_samples+token"], recorded=recorded)
    assert [j.name for j in jobs if j.name.startswith("grid/")] == [
        "grid/smile_split_shuffled+sample_lr2e-3", "grid/smile_split_shuffled+sample_lr5e-3",
        *[f"grid/smile_split_samples+token_lr{rate}" for rate in driver.GRID_RATES]]  # fmt: skip
    assert "grid/smile_split_shuffled+sample_lr1e-4: recorded" in capsys.readouterr().out


def test_the_rate_of_a_grid_run_in_this_root_once_every_rate_completed(tmp_path):
    root = tmp_path / "root"

    def record(rate: str, last: float, status: str = "completed") -> None:
        folder = root / f"grid/smile_session+token_lr{rate}"
        folder.mkdir(parents=True, exist_ok=True)
        curve = [{"step": 10, "loss": 9.0}, {"step": 20, "loss": last}]
        (folder / "metrics.json").write_text(json.dumps({"status": status, "val_curve": curve}))

    for rate, last in zip(driver.GRID_RATES[:5], (3.4, 3.2, 3.1, 3.0, 3.05), strict=True):
        record(rate, last)
    assert driver.root_rates(root) == {}  # 5e-3 not run yet
    record("5e-3", 2.9, status="stopped")
    assert driver.root_rates(root) == {}  # stopped: not a grid point yet
    record("5e-3", 3.3)
    assert driver.root_rates(root) == {"smile_session+token": "1e-3"}  # the lowest last validation loss
    record("5e-3", 2.9)
    assert driver.root_rates(root) == {}  # chosen at the grid's edge: not interior, its seeds wait
    # rates that earlier calls ran (results.json) complete a grid whose last rate ran here
    earlier = {"smile_split_samples+token": {"1e-4": 3.3128, "2e-4": 3.2068, "5e-4": 3.1148, "1e-3": 3.1031,
                                             "2e-3": 3.2128}}  # fmt: skip
    assert "smile_split_samples+token" not in driver.root_rates(root, earlier)
    folder = root / "grid/smile_split_samples+token_lr5e-3"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"status": "completed", "val_curve": [{"loss": 3.4}]}))
    assert driver.root_rates(root, earlier)["smile_split_samples+token"] == "1e-3"
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"lr_grid": {"smile_split_samples+token": {"rates": {
        rate: {"val_last": loss} for rate, loss in earlier["smile_split_samples+token"].items()}}}}))  # fmt: skip
    assert driver.recorded_losses(results) == earlier and driver.recorded_losses(None) == {}


def test_kept_runs_come_from_the_index_of_the_reference_bases_not_from_every_archive(tmp_path):
    import io
    import tarfile

    raw = tmp_path / "raw"
    raw.mkdir()
    assert driver.kept_test_losses(raw) == set()
    with tarfile.open(raw / "s7_call3_arms.tgz", "w:gz") as tar:  # earlier bases: not paired with the reference
        info = tarfile.TarInfo("seeds/smile_session+token_seed0/evaluation/test_losses.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    assert driver.kept_test_losses(raw) == set()
    (raw / driver.KEPT_INDEX).write_text("grid/smile_last+token_lr5e-4\nseeds/smile_rising+token_seed3\n")
    assert driver.kept_test_losses(raw) == {"grid/smile_last+token_lr5e-4", "seeds/smile_rising+token_seed3"}


def test_a_kept_seed_is_not_run_again(tmp_path):
    jobs = plan(tmp_path, seeds_of=["smile_rising+token"], rates={"smile_rising+token": "2e-3"},
                kept={"seeds/smile_rising+token_seed3", "seeds/smile_session+token_seed1"})  # fmt: skip
    assert [j.name for j in jobs if j.name.startswith("seeds/")] == [
        f"seeds/smile_rising+token_seed{s}" for s in (0, 1, 2, 4)
    ]


def test_a_job_kind_is_its_corpus_and_arm_and_its_expected_seconds_the_longest_recorded(tmp_path):
    assert driver.job_kind("seeds/smile_session+turn_seed3") == "smile_session"
    assert driver.job_kind("grid/smile_split_samples+token_lr2e-3") == "smile_split_samples"
    assert driver.job_kind("check/cpsycoun_split_grouped+token_seed0") == "cpsycoun_split_grouped"
    assert driver.job_kind("base_eval/kdconv_seed1") == "base_eval/kdconv"
    assert driver.job_kind("pretrain/seed0") is None and driver.job_kind("data/smile") is None
    assert driver.job_kind(driver.EVALUATION_PROBE) == "cpsycoun_session"
    first, second = tmp_path / "s9_call3_arms.json", tmp_path / "s9_call4_arms.json"
    first.write_text(json.dumps({"job_seconds": {"seeds/smile_session+sample_seed0": [34, 260],
                                                 "seeds/smile_session+turn_seed1": [204, 471],  # stopped: >= 267
                                                 "seeds/cpsycoun_last+token_seed2": [20],  # still running
                                                 "grid/smile_split_samples+token_lr1e-4": [361, 563],  # stopped
                                                 "data/smile": [0, 34]},
                                 "jobs": {"seeds/smile_session+sample_seed0": "done",
                                          "seeds/smile_session+turn_seed1": "stopped (exit 143)",
                                          "seeds/cpsycoun_last+token_seed2": "running",
                                          "grid/smile_split_samples+token_lr1e-4": "stopped (exit 143)",
                                          "data/smile": "done"}}))  # fmt: skip
    second.write_text(json.dumps({"job_seconds": {"grid/cpsycoun_last+token_lr1e-4": [0, 185]},
                                  "jobs": {"grid/cpsycoun_last+token_lr1e-4": "done"}}))  # fmt: skip
    # smile_split_samples: stopped runs only, whose spans are lower bounds: no estimate
    assert driver.expected_seconds([first, second]) == {"smile_session": 267.0, "cpsycoun_last": 185.0}
    # ... nor the end of a stopped run resumed in a later call: its span is a part of the run
    third = tmp_path / "s9_call5_arms.json"
    third.write_text(json.dumps({"job_seconds": {"grid/smile_split_samples+token_lr1e-4": [0, 300]},
                                 "jobs": {"grid/smile_split_samples+token_lr1e-4": "done"},
                                 "resumed": ["grid/smile_split_samples+token_lr1e-4"]}))  # fmt: skip
    assert "smile_split_samples" not in driver.expected_seconds([first, second, third])
    third.unlink()
    # A kind measured only by its training time (calls before job_seconds): that of a completed run plus the most a
    # run of its corpus spent beyond training (a finished run: 226 s from start to end, 134 s of it training).
    older = tmp_path / "s8_call4_arms.json"
    older.write_text(json.dumps({"runs": {"seeds/smile_split_shuffled+token_seed2": {"train_seconds": 254.0,
                                                                                     "status": "completed"},
                                          "seeds/smile_split_shuffled+token_seed3": {"train_seconds": 201.0,
                                                                                     "status": "completed"},
                                          "seeds/smile_rising+token_seed4": {"train_seconds": 99.0,
                                                                             "status": "stopped"},
                                          "seeds/cpsycoun_rising+token_seed0": {"train_seconds": 40.0,
                                                                                "status": "completed"}}}))  # fmt: skip
    record = json.loads(first.read_text())
    record["runs"] = {"seeds/smile_session+sample_seed0": {"train_seconds": 134.0, "status": "completed"},
                      "seeds/smile_session+turn_seed1": {"train_seconds": 240.0, "status": "stopped"}}  # fmt: skip
    first.write_text(json.dumps(record))
    assert driver.expected_seconds([older, first, second]) == {
        "smile_session": 267.0,
        "cpsycoun_last": 185.0,
        "smile_split_shuffled": 254.0 + 92.0,
    }  # cpsycoun_rising: no finished CPsyCoun run says what a run spends beyond training; smile_rising: stopped


def test_with_fit_a_job_that_would_not_end_in_time_or_was_never_measured_waits_and_one_that_fits_starts(tmp_path):
    root = tmp_path / "root"
    complete = "import json, pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True); " \
               "(p / 'metrics.json').write_text(json.dumps({'status': 'completed'})); " \
               "(p / 'evaluation').mkdir(); (p / 'evaluation' / 'metrics.json').write_text('{}')"  # fmt: skip
    names = [
        "seeds/smile_session+token_seed1",
        "seeds/cpsycoun_session+token_seed1",
        "seeds/kdconv_session+token_seed1",
    ]
    jobs = [driver.Job(name, [sys.executable, "-c", complete, str(root / name)]) for name in names]
    # kdconv: never measured, so it does not start
    expected = driver.Durations({"smile_session": 100.0, "cpsycoun_session": 40.0})
    assert not driver.fits(jobs[0], root, 0.0, 120.0, expected)  # 1.25 x 100 > 120
    assert driver.fits(jobs[0], root, 0.0, 125.0, expected) and driver.fits(jobs[0], root, 0.0, 120.0, None)
    assert not driver.fits(jobs[2], root, 0.0, 10_000.0, expected) and driver.fits(jobs[2], root, 0.0, 120.0, None)
    assert driver.fits(driver.Job("pretrain/seed0", []), root, 119.0, 120.0, expected)  # no kind: it resumes
    begin = time.monotonic()
    driver.run(jobs, root, deadline=120, last_start=120, grace=5, at_once=1, memory=100, durations=expected)
    assert [job.status for job in jobs] == ["pending", "done", "pending"]
    assert time.monotonic() - begin < 30  # it did not wait for --last-start with nothing that could start


def test_with_fit_a_run_stopped_in_its_training_needs_its_steps_left_at_its_own_pace(tmp_path):
    root = tmp_path / "root"
    job = driver.Job("grid/smile_split_samples+token_lr1e-4", [], resumable=True)
    folder = root / job.name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    record = {"status": "stopped", "global_steps": 5_000, "planned_steps": 6_460, "train_seconds": 500.0}
    (folder / "metrics.json").write_text(json.dumps(record))
    # the kind never finished in one call (no duration), SMILE runs spend 60 s beyond training
    durations = driver.Durations({}, {"smile": 60.0})
    assert driver.needed_seconds(job, root, durations) == 1_460 * 0.1 + 60.0  # 206 s
    assert driver.fits(job, root, 0.0, 1.25 * 206.0, durations)
    assert not driver.fits(job, root, 1.0, 1.25 * 206.0, durations)
    # not resumable, or its checkpoint gone, or no run of its corpus finished: its kind's duration, here none
    assert driver.needed_seconds(driver.Job(job.name, []), root, durations) is None
    assert driver.needed_seconds(job, root, driver.Durations({}, {"cpsycoun": 60.0})) is None
    (folder / "checkpoints" / "last.ckpt").unlink()
    assert not driver.fits(job, root, 0.0, 10_000.0, durations)
    assert driver.needed_seconds(job, root, driver.Durations({"smile_split_samples": 700.0}, {"smile": 60.0})) == 700.0
    # a record of the time before planned_steps: its kind's duration too
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    del record["planned_steps"]
    (folder / "metrics.json").write_text(json.dumps(record))
    assert driver.needed_seconds(job, root, driver.Durations({"smile_split_samples": 700.0}, {"smile": 60.0})) == 700.0


def test_the_seconds_beyond_training_are_those_of_runs_finished_in_one_call(tmp_path):
    call = tmp_path / "s12_call3_arms.json"
    call.write_text(json.dumps({
        "job_seconds": {"seeds/smile_rising+token_seed2": [275, 498], "grid/smile_split_samples+token_lr1e-4": [0, 134],
                        "seeds/cpsycoun_last+token_seed1": [20, 167], "seeds/smile_rising+token_seed3": [498, 562]},
        "jobs": {"seeds/smile_rising+token_seed2": "done", "grid/smile_split_samples+token_lr1e-4": "done",
                 "seeds/cpsycoun_last+token_seed1": "done", "seeds/smile_rising+token_seed3": "stopped (exit 143)"},
        "resumed": ["grid/smile_split_samples+token_lr1e-4"],
        "runs": {"seeds/smile_rising+token_seed2": {"status": "completed", "train_seconds": 150.0},
                 "grid/smile_split_samples+token_lr1e-4": {"status": "completed", "train_seconds": 600.0},
                 "seeds/cpsycoun_last+token_seed1": {"status": "completed", "train_seconds": 47.0},
                 "seeds/smile_rising+token_seed3": {"status": "stopped", "train_seconds": 40.0}}}))  # fmt: skip
    assert driver.seconds_beyond_training([call]) == {"smile": 223.0 - 150.0, "cpsycoun": 147.0 - 47.0}


def test_a_grid_completed_in_a_call_plans_its_seeds_in_that_call(tmp_path):
    root = tmp_path / "root"
    trained = "import json, pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True); " \
              "(p / 'metrics.json').write_text(json.dumps({'status': 'completed', 'val_curve': [{'loss': 3.0}]})); " \
              "(p / 'evaluation').mkdir(); (p / 'evaluation' / 'metrics.json').write_text('{}')"  # fmt: skip

    def job(name: str) -> driver.Job:
        return driver.Job(name, [sys.executable, "-c", trained, str(root / name)])

    grid = job("grid/smile_split_samples+token_lr5e-3")
    asked: list[int] = []

    def replan() -> list[driver.Job]:  # what plan() gives once the grid's last rate completed
        asked.append(1)
        return [job(grid.name), job("seeds/smile_split_samples+token_seed1")]

    jobs = [grid]
    driver.run(jobs, root, deadline=60, last_start=60, grace=5, at_once=2, memory=100, replan=replan)
    assert [(j.name, j.status) for j in jobs] == [(grid.name, "done"), ("seeds/smile_split_samples+token_seed1", "done")]
    assert asked == [1]  # a seed that ends asks for nothing


def test_a_run_stopped_or_failed_in_its_test_evaluation_resumes_from_its_last_checkpoint(tmp_path):
    root = tmp_path / "root"
    job = driver.Job("seeds/smile_session+token_seed1", [sys.executable, "-c", "pass"], resumable=True)
    folder = root / job.name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    (folder / "metrics.json").write_text(json.dumps({"status": "completed"}))  # trained, not evaluated
    driver.start(job, root, 0.0)
    job.process.wait()
    assert job.process.args[-1] == f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}" and job.resumed
    # failed in its test evaluation (session 19: out of memory there): resumed to evaluate, not trained again
    (folder / "metrics.json").write_text(json.dumps({"status": "failed", "failed_after_training": True}))
    driver.start(job, root, 0.0)
    job.process.wait()
    assert job.process.args[-1] == f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}" and job.resumed
    (folder / "metrics.json").write_text(json.dumps({"status": "failed"}))  # failed in its training
    job.resumed = False
    driver.start(job, root, 0.0)  # anything else starts afresh
    job.process.wait()
    assert job.process.args == job.command and not (folder / "checkpoints").exists() and not job.resumed


def test_the_summary_names_the_software_versions_and_the_gpu():
    found = driver.software()
    assert set(found) == {*driver.SOFTWARE, "cuda", "gpu"}
    import torch

    assert found["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert found["gpu"] is None or isinstance(found["gpu"], str)


def test_records_merge_in_call_order_and_a_session_the_bases_were_carried_to_did_not_pretrain_them(tmp_path):
    names = ["s9_call4_arms.json", "s10_call7_arms.json", "call2_pretrain.json", "s10_call10_arms.json",
             "s9_call3_pretrain.json", "s2_call1_pretrain.json"]  # fmt: skip
    assert [p.name for p in aggregate.in_call_order([tmp_path / n for n in names])] == [
        "call2_pretrain.json",
        "s2_call1_pretrain.json",
        "s9_call3_pretrain.json",
        "s9_call4_arms.json",
        "s10_call7_arms.json",
        "s10_call10_arms.json",
    ]  # by name, s10 would come before s2 and its records be replaced by older ones
    base0, base1 = "39afcc51" + "0" * 56, "37acc0f2" + "0" * 56
    bases = {"pretrain/seed0": base0, "pretrain/seed1": base1}
    pretrained = {"status": "completed", "val_curve": [{"loss": 5.3}], "global_steps": 2064, "input_tokens": 1,
                  "train_seconds": 1.0, "tokens_per_second": 1.0}  # fmt: skip
    records = {
        "s9_call3_pretrain.json": {"bases": bases, "runs": {"pretrain/seed0": pretrained,
                                                            "seeds/x_seed1": {"status": "stopped"}}},
        "s10_call7_arms.json": {"bases": bases, "restored": {"pretrain/seed0": {}, "pretrain/seed1": {}},
                                "runs": {"seeds/x_seed1": {"status": "completed"}}},
    }  # fmt: skip
    for name, record in records.items():
        (tmp_path / name).write_text(json.dumps(record))
    merged = aggregate.merge(aggregate.in_call_order(list(tmp_path.glob("*.json"))))
    entry = merged["generations"]["39afcc51"]
    assert entry["sessions"] == ["s9"] and entry["carried_to"] == ["s10"]
    assert entry["runs"]["seeds/x_seed1"]["status"] == "completed"  # the later call's record
    table = aggregate.pretraining(entry["runs"], entry["bases"], entry["sessions"], entry["carried_to"])
    assert table["seed0"]["device_sessions"] == ["s9"] and table["seed0"]["carried_to"] == ["s10"]


def test_the_gate_on_the_reference_bases_compares_session_token_seed_0_with_base_0s_step_0():
    step0 = {aggregate.REFERENCE_BASES: {"smile": {"seed0": {"test_loss": 5.4}, "seed1": {"test_loss": 5.0}}}}
    reference = {"smile": {"arms": {"session+token": {"test_loss": {"per_seed": {0: 5.2, 1: 4.0}}}}}}
    gate = aggregate.gate_on_reference(step0, reference)
    assert gate["drop_nats"] == 0.2 and gate["passed"] is False  # seed 1 (from base 1) is not the pilot
    reference["smile"]["arms"]["session+token"]["test_loss"]["per_seed"][0] = 5.1
    assert aggregate.gate_on_reference(step0, reference)["passed"] is True  # 0.3 nats: the gate's bound
    assert aggregate.gate_on_reference({}, reference)["passed"] is None


def test_the_evaluation_probe_trains_cpsycoun_session_token_seed_0_again_and_needs_its_evaluation(tmp_path):
    jobs = plan(tmp_path, phases=["evaluation-probe"], rates={"cpsycoun_session+token": "2e-3"})
    probe = next(j for j in jobs if j.name == driver.EVALUATION_PROBE)
    kept = next(j for j in plan(tmp_path, seeds_of=["cpsycoun_session+token"], rates={"cpsycoun_session+token": "2e-3"})
                if j.name == "seeds/cpsycoun_session+token_seed0")  # fmt: skip
    assert probe.command[:-1] == kept.command[:-1] and probe.init == kept.init  # only hydra.run.dir differs
    assert probe.command[-1] == f"hydra.run.dir={tmp_path / 'root' / driver.EVALUATION_PROBE}"
    folder = tmp_path / "root" / driver.EVALUATION_PROBE
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"status": "completed"}))
    assert not driver.done(tmp_path / "root", probe)  # trained, not evaluated: not done
    (folder / "evaluation").mkdir()
    (folder / "evaluation" / "metrics.json").write_text("{}")
    assert driver.done(tmp_path / "root", probe)
    assert not [j for j in plan(tmp_path, phases=["evaluation-probe"]) if j.name == driver.EVALUATION_PROBE]


def test_the_evaluation_probe_is_set_beside_the_kept_seed_evaluated_compiled():
    def run(loss, turns, rouge1, seconds):
        official = {"rouge-1": rouge1, "rouge-2": 10.0, "rouge-l": 30.0, "bleu-4": 12.0}
        return {"val_curve": [{"loss": 2.6}, {"loss": 2.0}],
                "test": {"teacher_forced": {"loss": loss, "loss_by_turn": turns}, "chatglm2_official": official,
                         "seconds": {"generation": seconds, "teacher_forced": seconds / 2}}}  # fmt: skip

    compiled = {aggregate.EVALUATED_COMPILED: run(2.0, {"1": 1.5, "2": 2.5}, 35.0, 70.0)}
    probe = {"s11": {aggregate.EVALUATION_PROBE: run(2.0000004, {"1": 1.5000001, "2": 2.4999990}, 35.25, 14.0)}}
    found = aggregate.evaluation_probes(probe, compiled)["s11"]
    assert found["training_repeats"] is True
    assert found["test_loss_difference"] == pytest.approx(4e-7)
    assert found["largest_turn_loss_difference"] == pytest.approx(1e-6)
    assert found["official_difference"] == {"rouge-1": 0.25, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    probe["s11"][aggregate.EVALUATION_PROBE]["val_curve"][1]["loss"] = 2.1
    assert aggregate.evaluation_probes(probe, compiled)["s11"]["training_repeats"] is False
    assert aggregate.evaluation_probes(probe, {}) == {}


def test_grids_start_before_seeds(tmp_path):
    jobs = plan(tmp_path, arms=["smile_split_samples+token"], seeds_of=["cpsycoun_last+token"],
                rates={"cpsycoun_last+token": "5e-4"})  # fmt: skip
    runs = [j.name.split("/")[0] for j in jobs if not j.name.startswith("data/")]
    assert runs == ["grid"] * len(driver.GRID_RATES) + ["seeds"] * len(driver.SEEDS)


def test_the_arms_report_each_turn_position_and_the_contrasts_there():
    """Two complete arms on three test sessions of two turns: session+token loses 2.0 a token on turn 1 and 1.0 on
    turn 2, split_shuffled+token 1.5 and 1.0, in every seed: the contrast is +0.5 at turn 1 and 0 at turn 2,
    whatever the bootstrap draws."""
    order = ["a", "b", "c"]

    def losses(turn1: float) -> dict:
        return {s: {"1": [turn1 * 10, 10], "2": [1.0 * 30, 30]} for s in order}

    sessions = {"base_eval/smile_seed0": {"test_losses": losses(5.0)}}
    runs, lr_grid = {}, {}
    for arm, turn1 in (("session+token", 2.0), ("split_shuffled+token", 1.5)):
        lr_grid[f"smile_{arm}"] = {"chosen": "2e-3", "interior": True}
        for seed in range(5):
            job = f"seeds/smile_{arm}_seed{seed}"
            sessions[job] = {"test_losses": losses(turn1)}
            official = {k: 10.0 for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}
            runs[job] = {"status": "completed", "val_curve": [{"loss": 2.0}], "global_steps": 10, "input_tokens": 100,
                         "test": {"chatglm2_official": official,
                                  "rouge": {k: 10.0 for k in ("rouge1", "rouge2", "rougeL")}}}  # fmt: skip
    step0 = {"smile": {"seed0": {"test_loss": 5.0}}}
    found = aggregate.corpus_arms("smile", runs, sessions, lr_grid, step0)
    by_turn = found["arms"]["session+token"]["test_loss_by_turn"]
    assert list(by_turn) == ["1", "2"]  # no test turn beyond 2
    assert by_turn["1"]["point"] == pytest.approx(2.0) and by_turn["2"]["point"] == pytest.approx(1.0)
    contrast = found["contrasts_by_turn"]["session+token - split_shuffled+token"]
    assert contrast["1"]["diff"] == pytest.approx(0.5) and contrast["1"]["ci95"] == pytest.approx([0.5, 0.5])
    assert contrast["2"]["diff"] == pytest.approx(0.0) and contrast["2"]["ci95"] == pytest.approx([0.0, 0.0])
    # overall: (20 + 30) / 40 against (15 + 30) / 40 a session
    assert found["contrasts"]["session+token - split_shuffled+token"]["diff"] == pytest.approx(5 / 40)


def test_a_job_run_to_completion_in_two_calls_from_the_same_bases_is_a_rerun_and_says_how_far_apart(tmp_path):
    def run(loss, curve, status="completed"):
        return {"status": status, "val_curve": [{"loss": v} for v in curve],
                "test": {"teacher_forced": {"loss": loss}, "seconds": {"generation": 1.0}}}  # fmt: skip

    calls = {
        "s11_call7_arms": {"job_seconds": {"seeds/a_seed0": [0, 9], "seeds/b_seed0": [0, 9]},
                           "runs": {"seeds/a_seed0": run(3.1335, [3.59, 3.06]), "seeds/b_seed0": run(2.0, [2.5])}},
        # b_seed0 is in the archive of call 15 again but was not run there; c_seed0 stopped in call 15
        "s11_call15_arms": {"job_seconds": {"seeds/a_seed0": [0, 9], "seeds/c_seed0": [0, 9]},
                            "runs": {"seeds/a_seed0": run(3.1327, [3.59, 3.05]), "seeds/b_seed0": run(2.0, [2.5]),
                                     "seeds/c_seed0": run(1.0, [1.0], status="stopped")}},
        "s12_call1_arms": {"job_seconds": {"seeds/a_seed0": [0, 9]}, "runs": {"seeds/a_seed0": run(9.0, [9.0, 9.0])}},
    }  # fmt: skip
    paths = []
    for name, summary in calls.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(summary))
        paths.append(tmp_path / f"{name}.json")
    generation_of = {"s11": "39afcc51", "s12": "other"}  # s12's bases differ: its run is no rerun of s11's
    (found,) = aggregate.reruns(aggregate.in_call_order(paths), generation_of)
    assert found["job"] == "seeds/a_seed0" and found["calls"] == ["s11_call7_arms", "s11_call15_arms"]
    assert found["test_loss"] == [3.1335, 3.1327]
    assert found["test_loss_spread"] == pytest.approx(0.0008)
    assert found["val_curves_equal"] is False
    assert found["largest_val_difference"] == pytest.approx(0.01)


def test_a_call_record_saved_into_raw_keeps_its_finished_runs_from_the_reference_bases(tmp_path):
    raw, reference = tmp_path / "raw", tmp_path / "bases.json"
    raw.mkdir()
    reference.write_text(json.dumps({"bases": {"pretrain/seed0": "39afcc51", "pretrain/seed1": "37acc0f2"}}))
    evaluated = {"status": "completed", "test": {"teacher_forced": {"loss": 2.0}}}
    (raw / "s11_call7_arms.json").write_text(json.dumps({
        "bases": {"pretrain/seed0": "39afcc51"},
        "runs": {"seeds/cpsycoun_last+token_seed0": evaluated,
                 "grid/smile_split_shuffled+sample_lr2e-3": evaluated,
                 "seeds/smile_rising+token_seed2": {"status": "stopped"},  # a stopped run is not finished
                 "seeds/smile_rising+token_seed3": {"status": "completed"}},  # trained, not evaluated
        "base_eval": {"smile_seed0": {"teacher_forced": {"loss": 5.4}}},
    }))  # fmt: skip
    (raw / "s8_call3_arms.json").write_text(json.dumps({  # other bases: not paired with the reference
        "bases": {"pretrain/seed0": "45d3c334"}, "runs": {"seeds/smile_last+token_seed1": evaluated},
    }))  # fmt: skip
    kept = driver.kept_test_losses(raw, reference)
    assert kept == {"seeds/cpsycoun_last+token_seed0", "grid/smile_split_shuffled+sample_lr2e-3",
                    "base_eval/smile_seed0"}  # fmt: skip
    jobs = [j.name for j in plan(tmp_path, arms=["smile_split_shuffled+sample"], seeds_of=["cpsycoun_last+token"],
                                 rates={"cpsycoun_last+token": "5e-4"}, kept=kept)]  # fmt: skip
    assert "grid/smile_split_shuffled+sample_lr2e-3" not in jobs and "grid/smile_split_shuffled+sample_lr5e-3" in jobs
    assert "seeds/cpsycoun_last+token_seed0" not in jobs and "seeds/cpsycoun_last+token_seed1" in jobs
