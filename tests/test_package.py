"""The package as a user installs it: a wheel carries the configs and the bundled data, and its tools start from any
folder (issue 14: `pip install .` gave a tool that could not find conf/)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_the_wheel_holds_the_configs_and_its_tools_run_from_elsewhere(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("glm_session-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"glm_session/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= names
    assert {"glm_session/resources/kdconv/train.jsonl", "glm_session/resources/tokenizer/tokenizer.model"} <= names

    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], capture_output=True, text=True)  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import glm_session.config as c; print(c.CONFIG_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)  # fmt: skip
    assert where.stdout.strip() == str(site / "glm_session" / "conf")
    stats = subprocess.run([sys.executable, "-m", "glm_session.data", "stats", "data.limit=5",
                            f"data.cache_dir={tmp_path / 'cache'}"], cwd=elsewhere, env=env, capture_output=True,
                           text=True)  # fmt: skip
    assert stats.returncode == 0, stats.stderr[-3000:]
    assert "sessions                    5" in stats.stdout
