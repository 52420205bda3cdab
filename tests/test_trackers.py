"""The ecosystem's loggers, sweeper and launcher as config choices (issue 24): each composes; TensorBoard and MLflow
write a real run offline on the CPU; Optuna's sweeper drives real trials; a missing extra or a sweep over an unknown
key is one line and exit code 2."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from glm_session.config import CONFIG_DIR, compose_config
from glm_session.errors import UserError
from glm_session.train import train
from glm_session.training.loggers import build_loggers

TINY = ["model=chatglm2-tiny", "data.limit=8", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false"]  # fmt: skip


def compose_with_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    ("choice", "targets"),
    [
        ("default", {"csv": "lightning.pytorch.loggers.CSVLogger"}),
        ("tensorboard", {"csv": "lightning.pytorch.loggers.CSVLogger",
                         "tensorboard": "lightning.pytorch.loggers.TensorBoardLogger"}),
        ("wandb", {"csv": "lightning.pytorch.loggers.CSVLogger", "wandb": "lightning.pytorch.loggers.WandbLogger"}),
        ("mlflow", {"csv": "lightning.pytorch.loggers.CSVLogger", "mlflow": "lightning.pytorch.loggers.MLFlowLogger"}),
    ],
)  # fmt: skip
def test_each_logger_choice_composes(choice, targets):
    cfg = compose_config("train", [f"logger={choice}", "output_dir=/tmp/run"])
    assert {key: node["_target_"] for key, node in cfg.logger.items()} == targets


def test_wandb_is_offline_unless_a_key_is_set(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert compose_config("train", ["logger=wandb", "output_dir=/o/session/s1"]).logger.wandb.offline is True
    monkeypatch.setenv("WANDB_API_KEY", "k")
    cfg = compose_config("train", ["logger=wandb", "output_dir=/o/session/s1"])
    assert cfg.logger.wandb.offline is False
    assert cfg.logger.wandb.name == "session/s1"


def test_mlflow_store_is_local_unless_a_server_is_named(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert compose_config("train", ["logger=mlflow"]).logger.mlflow.tracking_uri == "sqlite:///outputs/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert compose_config("train", ["logger=mlflow"]).logger.mlflow.tracking_uri == "http://tracking:5000"


@pytest.mark.parametrize(("choice", "module", "extra"), [("tensorboard", "tensorboard", "tensorboard"),
                                                         ("wandb", "wandb", "wandb"), ("mlflow", "mlflow", "mlflow")])  # fmt: skip
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, choice, module, extra):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in (module, "tensorboardX") else found(name, *a))  # fmt: skip
    cfg = compose_config("train", [f"logger={choice}", "output_dir=/tmp/run"])
    with pytest.raises(UserError) as error:
        build_loggers(cfg.logger)
    assert str(error.value) == (f"logger.{choice} ({cfg.logger[choice]._target_}) needs the {module} package: "
                                f"pip install 'glm_session[{extra}]'")  # fmt: skip


def test_a_missing_extra_ends_the_command_with_one_line(tmp_path):
    code = ("import importlib.util, sys; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda n, *a: None if n == 'wandb' else real(n, *a); "
            "sys.argv = ['train', 'logger=wandb', 'model=chatglm2-tiny', 'data.limit=8', "
            f"'data.cache_dir={tmp_path / 'cache'}', 'hydra.run.dir={tmp_path / 'run'}']; "
            "from glm_session.train import main; main()")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert not (tmp_path / "cache").exists()  # it ended before building the samples (a cold cache prints progress)
    assert result.stderr.strip().splitlines() == [
        "error: logger.wandb (lightning.pytorch.loggers.WandbLogger) needs the wandb package: "
        "pip install 'glm_session[wandb]'"
    ]


@pytest.mark.slow
def test_tensorboard_writes_a_real_run(tmp_path, cache_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    metrics, _ = train(compose_config("train", [*TINY, "logger=tensorboard", f"output_dir={run}",
                                                f"data.cache_dir={cache_dir}"]))  # fmt: skip
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    # Lightning's step axis counts from 0: the validation after optimizer step 2 is at its step 1
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [
        (p["step"] - 1, pytest.approx(p["loss"], rel=1e-6)) for p in metrics["val_curve"]
    ]
    hparams = yaml.safe_load((run / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["optimizer.lr"] == 0.001 and hparams["model.preset"] == "chatglm2-tiny"


@pytest.mark.slow
def test_mlflow_writes_a_real_run(tmp_path, cache_dir, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the local store is outputs/mlruns/ of the working folder
    run = tmp_path / "outputs" / "runs" / "session" / "stamp"
    metrics, _ = train(compose_config("train", [*TINY, "logger=mlflow", f"output_dir={run}",
                                                f"data.cache_dir={cache_dir}"]))  # fmt: skip
    mlflow.set_tracking_uri("sqlite:///outputs/mlruns/mlflow.db")
    (found,) = mlflow.search_runs(experiment_names=["glm_session"], output_format="list")
    assert found.info.run_name == "session/stamp" and found.info.status == "FINISHED"
    assert found.data.params["optimizer.lr"] == "0.001" and found.data.params["strategy._target_"].endswith("SessionStrategy")
    history = mlflow.MlflowClient().get_metric_history(found.info.run_id, "val/loss")
    assert [(m.step, m.value) for m in history] == [(p["step"] - 1, pytest.approx(p["loss"], rel=1e-6))
                                                    for p in metrics["val_curve"]]  # fmt: skip


def test_the_optuna_sweep_and_the_slurm_launcher_compose():
    cfg = compose_with_hydra(["+sweep=lr_optuna"])
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert cfg.hydra.sweeper.direction == "minimize" and cfg.hydra.sweeper.n_trials == 12
    assert cfg.hydra.sweeper.params == {"optimizer.lr": "tag(log, interval(1.0e-5, 1.0e-2))"}
    for overrides in (["+launcher=slurm"], ["hydra/launcher=submitit_slurm"]):
        cfg = compose_with_hydra(overrides)
        assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert compose_with_hydra(["+launcher=slurm"]).hydra.launcher.gpus_per_node == 1


@pytest.mark.slow
def test_optuna_sweeps_real_trials(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "glm_session.train", "-m", "+sweep=lr_optuna", "hydra.sweeper.n_trials=2",
               *TINY, f"data.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    finals = {}
    for job in ("0", "1"):
        lr = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())[0]
        assert lr.startswith("optimizer.lr=")
        finals[float(lr.split("=")[1])] = yaml.safe_load((sweep / job / "config.yaml").read_text())
    assert best["best_params"]["optimizer.lr"] in finals  # the trial the sweeper chose is one that ran
    assert 1e-5 <= min(finals) and max(finals) <= 1e-2


def test_a_sweep_over_an_unknown_key_is_one_line(tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "mine.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      optimizer.lrr: 1e-3,2e-3\n"
    )
    command = [sys.executable, "-m", "glm_session.train", "-m", "+sweep=mine", f"hydra.searchpath=[file://{tmp_path}]",
               "model=chatglm2-tiny", f"hydra.sweep.dir={tmp_path / 'out'}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Could not override 'optimizer.lrr'")
    assert not Path(tmp_path / "out" / "0").exists()  # no job started


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed (the [wandb] extra)")
def test_wandb_writes_an_offline_run(tmp_path, cache_dir, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    train(compose_config("train", [*TINY, "logger=wandb", f"output_dir={run}", f"data.cache_dir={cache_dir}"]))
    (offline,) = (run / "wandb").glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")
    assert records.stat().st_size > 0


@pytest.mark.parametrize(("missing", "extra"), [("hydra/sweeper/optuna", "sweep"),
                                                ("hydra/launcher/submitit_slurm", "slurm")])  # fmt: skip
def test_a_missing_hydra_plugin_names_its_extra(missing, extra):
    from hydra.errors import MissingConfigException

    from glm_session.errors import user_message

    group = missing.rsplit("/", 1)[0]
    error = MissingConfigException(  # what Hydra 1.3 raises when the plugin's config is not there
        f"In 'hydra/config': Could not find '{missing}'\n\nAvailable options in '{group}':\n\tbasic\n"
        "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf", missing, ["basic"]
    )
    plugin = "optuna" if extra == "sweep" else "submitit"
    assert user_message(error) == (f"In 'hydra/config': Could not find '{missing}': Hydra's {plugin} plugin is not "
                                   f"installed; pip install 'glm_session[{extra}]'")  # fmt: skip
