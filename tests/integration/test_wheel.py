"""A wheel built from the repository runs on its own: the models travel inside it (issue 14)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_a_wheel_carries_the_models_and_runs_the_image_check_outside_the_repository(tmp_path: Path) -> None:
    # from a copy: setuptools builds in the source tree, and the repository stays free of build output
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=240)
    (wheel,) = (tmp_path / "dist").glob("sortgate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("sortgate_models/xray_int8.tflite", "sortgate_models/xray_f32.tflite", "sortgate_models/xray.json",
                   "agent/data/s10_countries.txt", "hw_sim/sweep.py", "agent/data/alarms.md",
                   "agent/console/templates/base.html", "agent/console/static/console.js",
                   "agent/console/static/vendor/htmx.min.js", "agent/console/static/vendor/uPlot.iife.min.js"):
        assert needed in names
    assert not [n for n in names if n.startswith("tests/")]
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import agent, sortgate_models; print(agent.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(target))  # the installed copy, not the repository
    r = subprocess.run([sys.executable, "-m", "agent.cli", "model", "eval", "--images", "30", "--json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == 30 and report["model"].startswith("xray-cnn-")
