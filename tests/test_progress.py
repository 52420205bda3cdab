"""Progress: a rich bar on a terminal, plain log lines elsewhere, with the step's loss, tokens/s and an ETA."""

from __future__ import annotations

import logging
import re

import pytest

from glm_session.config import compose_config
from glm_session.errors import ConfigError
from glm_session.train import train
from glm_session.training.progress import PlainProgress, RichBar, duration, progress_bar, track

LINE = re.compile(r"epoch (\d)/2  step (\d)/4 \((\d+)%\)  loss (\d+\.\d{4})  (tok/s [\d,]+  )?elapsed \d+:\d\d  ETA \d+:\d\d")


def test_durations():
    assert [duration(s) for s in (0, 59.4, 61, 3599, 3600, 3725)] == ["0:00", "0:59", "1:01", "59:59", "1:00:00",
                                                                       "1:02:05"]  # fmt: skip


def test_the_choice_follows_the_terminal():
    assert isinstance(progress_bar("auto", 5), PlainProgress)  # pytest captures stdout: not a terminal
    assert isinstance(progress_bar("plain", 5), PlainProgress)
    assert isinstance(progress_bar("rich", 5), RichBar)
    with pytest.raises(ConfigError, match="progress"):
        progress_bar("fancy", 5)


@pytest.mark.slow
def test_plain_progress_logs_steps_and_validations(tmp_path, cache_dir, caplog):
    overrides = ["model=chatglm2-tiny", "data.limit=8", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
                 "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "progress=plain",
                 f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="glm_session.training.progress"):
        metrics, _ = train(compose_config("train", overrides))
    lines = [r.getMessage() for r in caplog.records if r.name == "glm_session.training.progress"]
    steps = [LINE.fullmatch(line) for line in lines if line.startswith("epoch")]
    assert all(steps), lines
    assert [(m[1], m[2], m[3]) for m in steps] == [("1", "1", "25"), ("1", "2", "50"), ("2", "3", "75"),
                                                   ("2", "4", "100")]  # fmt: skip
    validations = [line for line in lines if line.startswith("validation")]
    assert validations == [f"validation after step {p['step']}: loss {p['loss']:.4f}" for p in metrics["val_curve"]]


def test_track_logs_every_tenth(caplog):
    with caplog.at_level(logging.INFO, logger="glm_session.training.progress"):
        assert list(track(range(20), 20, "generating 20 answers")) == list(range(20))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10
    assert lines[0].startswith("generating 20 answers: 2/20 (10%)  elapsed ")
    assert lines[-1].startswith("generating 20 answers: 20/20 (100%)  elapsed ") and lines[-1].endswith("ETA 0:00")
