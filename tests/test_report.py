"""``glm_session.report``: hand-written run folders with known numbers, and a real multirun of ``train``."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from glm_session.report import main, mean_curve, seed_summary, write_report

T_975_DF2 = 4.302652729749464  # Student t, 97.5th percentile, 2 degrees of freedom (printed tables: 4.303)


def make_run(
    folder: Path,
    overrides: list[str],
    config: dict,
    record: dict | None,
    choices: dict | None = None,
) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    hydra = {
        "hydra": {
            "runtime": {"choices": {"model": "chatglm2-small", "hydra/launcher": "basic", **(choices or {})}}
        }
    }
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))  # not a run folder by itself
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if record is not None:
        (folder / "metrics.json").write_text(json.dumps(record))


def completed(val_losses: list[float], train_loss: float) -> dict:
    curve = [{"step": 10 * (i + 1), "loss": loss} for i, loss in enumerate(val_losses)]
    return {"status": "completed", "val_curve": curve, "train_loss": train_loss}


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Six runs: lr 0.001 with seeds 0-2 (last validation losses 2.0, 2.2, 2.4; best 2.0, 2.1, 2.4), lr 0.003 with seed 0 completed,
    seed 1 failed, seed 2 killed before it wrote a record. Job 10 sorts after job 9."""
    config = {"seed": 0, "optimizer": {"lr": 0.001}, "output_dir": "x"}
    make_run(tmp_path / "0", ["seed=0", "output_dir=/a"], config, completed([2.5, 2.0], 3.0))
    make_run(tmp_path / "1", ["seed=1", "optimizer.lr=1e-3"], config, completed([2.1, 2.2], 3.2))
    make_run(
        tmp_path / "9", ["seed=2", "optimizer.lr=0.001", "hydra.verbose=true"], config, completed([2.5, 2.4], 3.4)
    )
    make_run(tmp_path / "10", ["seed=0", "optimizer.lr=0.003", "model=chatglm2-tiny"], config,
             completed([1.7, 1.5], 2.0), {"model": "chatglm2-tiny"})  # fmt: skip
    make_run(tmp_path / "11", ["seed=1", "optimizer.lr=0.003", "model=chatglm2-tiny"], config,
             {"status": "failed", "error": "data.path: no such file"}, {"model": "chatglm2-tiny"})  # fmt: skip
    make_run(tmp_path / "12", ["seed=2", "optimizer.lr=0.003", "model=chatglm2-tiny"], config, None,
             {"model": "chatglm2-tiny"})  # fmt: skip
    return tmp_path


def rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_seed_summary_is_the_student_t_interval():
    summary = seed_summary([2.0, 2.2, 2.4])
    half = T_975_DF2 * 0.2 / math.sqrt(3)
    assert summary["mean"] == pytest.approx(2.2, abs=1e-12)
    assert summary["std"] == pytest.approx(0.2, abs=1e-12)
    assert summary["ci95"] == pytest.approx([2.2 - half, 2.2 + half], abs=1e-12)
    assert seed_summary([1.5]) == {"mean": 1.5, "std": 0.0, "n": 1, "ci95": None}


def test_groups_over_seeds_with_the_differing_overrides(sweep):
    written = write_report(sweep)
    assert sorted(p.name for p in written.values()) == ["report.csv", "report.md", "runs.csv", "val_curves.png"]
    groups = rows(sweep / "report" / "report.csv")
    # seed, optimizer.lr and model differ; output_dir and hydra.* are left out; seed is what groups are taken over
    assert list(groups[0])[:4] == ["optimizer.lr", "model", "completed", "runs"]
    assert [(g["optimizer.lr"], g["model"], g["completed"], g["runs"]) for g in groups] == [
        ("0.001", "chatglm2-small", "3", "3"),  # run 0 did not override the rate: its config's value
        ("0.003", "chatglm2-tiny", "1", "3"),
    ]
    half = T_975_DF2 * 0.2 / math.sqrt(3)
    first = {k: float(v) for k, v in groups[0].items() if k.startswith(("val_loss", "train_loss"))}
    assert first["val_loss_mean"] == pytest.approx(2.2, abs=1e-12)
    assert first["val_loss_std"] == pytest.approx(0.2, abs=1e-12)
    assert first["val_loss_ci95_low"] == pytest.approx(2.2 - half, abs=1e-12)
    assert first["val_loss_ci95_high"] == pytest.approx(2.2 + half, abs=1e-12)
    assert first["train_loss_mean"] == pytest.approx(3.2, abs=1e-12)
    assert float(groups[0]["best_val_loss_mean"]) == pytest.approx((2.0 + 2.1 + 2.4) / 3, abs=1e-12)
    assert float(groups[1]["val_loss_mean"]) == 1.5
    assert groups[1]["val_loss_ci95_low"] == ""  # one completed run: no interval
    assert "tokens_per_second_mean" not in groups[0]  # no run has it


def test_runs_table_and_markdown(sweep):
    write_report(sweep, sweep / "out")
    runs = rows(sweep / "out" / "runs.csv")
    assert [(r["run"], r["seed"], r["optimizer.lr"], r["status"]) for r in runs] == [
        ("0", "0", "0.001", "completed"), ("1", "1", "0.001", "completed"), ("9", "2", "0.001", "completed"),
        ("10", "0", "0.003", "completed"), ("11", "1", "0.003", "failed"), ("12", "2", "0.003", "no record"),
    ]  # fmt: skip
    text = (sweep / "out" / "report.md").read_text()
    assert "| optimizer.lr | model | seeds | val_loss | best_val_loss | train_loss |" in text
    assert f"| 0.001 | chatglm2-small | 3/3 | 2.2000 ± 0.2000 [{2.2 - T_975_DF2 * 0.2 / 3**0.5:.4f}, " in text
    assert "| 0.003 | chatglm2-tiny | 1/3 | 1.5000 ± 0.0000 |" in text
    assert "- 11: failed (data.path: no such file)" in text
    assert "- 12: no record" in text


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_a_folder_without_runs_is_one_line(tmp_path, capsys, make):
    folder = tmp_path / "runs"
    if make == "empty":
        (folder / "a").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {folder}: ")


@pytest.mark.parametrize(
    "damage, message",
    [  # each was a traceback (AttributeError, TypeError, KeyError, UnicodeDecodeError)
        ({".hydra/hydra.yaml": "- a\n- b\n"}, ".hydra/hydra.yaml: holds a YAML list, not a dict"),
        ({"config.yaml": b"lr: caf\xe9\n"}, "config.yaml: not UTF-8 text (invalid continuation byte at byte 7)"),
        ({"metrics.json": '{"val_curve": [1.0, 2.0]}'}, "metrics.json: val_curve holds 1.0, not a point with a "),
        ({"metrics.json": '{"val_curve": [{"loss": 2.0}]}'}, "metrics.json: val_curve holds {'loss': 2.0}, not a point"),
        ({"metrics.json": '{"val_curve": [{"step": 1, "loss": "high"}]}'}, "val_curve holds {'step': 1, 'loss': 'high'}"),
        # session 18's audit: listed as "no record", averaged (NaN, true as 1.0), dropped ("8.7"), printed (a list)
        ({"metrics.json": '{"status": "completed", "val_cu'}, "metrics.json: not a run record (not JSON of an object"),
        ({"metrics.json": '{"status": "completed", "train_loss": NaN, "val_curve": []}'},
         "metrics.json: train_loss holds nan, not a finite number"),
        ({"metrics.json": '{"status": "completed", "val_curve": [{"step": 1, "loss": NaN}]}'},
         "metrics.json: val_curve holds {'step': 1, 'loss': nan}: a completed run's losses are finite numbers"),
        ({"metrics.json": '{"status": "completed", "tokens_per_second": true}'}, "tokens_per_second holds True, not"),
        ({"metrics.json": '{"status": "completed", "train_loss": "8.7"}'}, "train_loss holds '8.7', not a finite"),
        ({"metrics.json": '{"status": ["completed"]}'}, "metrics.json: status holds ['completed'], not a run's status"),
    ],
)  # fmt: skip
def test_a_damaged_run_folder_is_named_in_one_line(tmp_path, capsys, damage, message):
    make_run(tmp_path / "runs" / "0", ["seed=0"], {"seed": 0}, completed([2.0], 3.0))
    for name, content in damage.items():
        path = tmp_path / "runs" / "0" / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'runs' / '0'}/") and message in err, err


@pytest.mark.slow
def test_reports_a_real_multirun(tmp_path, cache_dir):
    sweep = tmp_path / "multirun"
    command = [sys.executable, "-m", "glm_session.train", "-m", "model=chatglm2-tiny", "data.limit=8",
               "trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
               "trainer.enable_progress_bar=false", f"data.cache_dir={cache_dir}", "seed=0,1",
               f"hydra.sweep.dir={sweep}"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    result = subprocess.run(
        [sys.executable, "-m", "glm_session.report", str(sweep)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "2 runs, 2 completed, in 1 groups" in result.stdout
    (group,) = rows(sweep / "report" / "report.csv")
    assert group["completed"] == "2"
    last = [json.loads((sweep / job / "metrics.json").read_text())["val_curve"][-1]["loss"] for job in ("0", "1")]
    assert float(group["val_loss_mean"]) == pytest.approx(sum(last) / 2, abs=1e-12)
    assert (sweep / "report" / "val_curves.png").stat().st_size > 0


def test_mean_curve_at_shared_points_and_validation_by_validation():
    shared = [
        [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.0}],
        [{"step": 10, "loss": 4.0}, {"step": 20, "loss": 3.0}],
    ]
    assert mean_curve(shared) == ([10.0, 20.0], [3.0, 2.0], [math.sqrt(2), math.sqrt(2)])
    # two seeds whose validations fall at other steps (batches by token count): averaged validation by validation
    apart = [
        [{"step": 42, "loss": 2.0}, {"step": 84, "loss": 1.0}],
        [{"step": 41, "loss": 4.0}, {"step": 83, "loss": 1.0}],
    ]
    assert mean_curve(apart) == ([41.5, 83.5], [3.0, 1.0], [math.sqrt(2), 0.0])
    # a curve cut short: the points every curve has
    short = [[{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.0}], [{"step": 10, "loss": 4.0}]]
    assert mean_curve(short) == ([10.0], [3.0], [math.sqrt(2)])
    assert mean_curve([]) == ([], [], [])


def test_out_that_is_a_file_is_named(sweep, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit):
        main([str(sweep), "--out", str(tmp_path / "a_file")])
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'a_file'}: a folder to write the report into; " \
                                      f"{tmp_path / 'a_file'} is a file\n"  # fmt: skip


def test_a_job_that_failed_before_its_config_is_listed(sweep, capsys):
    """A sweep job refused by a check (optimizer.lr=abc) leaves metrics.json and .hydra/ but no config.yaml: the
    report said "5 runs" and left it out."""
    job = sweep / "13"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["seed=0", "optimizer.lr=abc"]))
    (job / "metrics.json").write_text(json.dumps({"status": "failed", "error": "optimizer.lr='abc': must be"}))
    main([str(sweep)])
    markdown = (sweep / "report" / "report.md").read_text()
    assert "13" in markdown and "failed" in markdown and "optimizer.lr='abc'" in markdown, markdown
