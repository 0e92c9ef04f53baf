"""What a wheel carries: every package folder, and the shipped models where the agent finds them."""

from __future__ import annotations

import tomllib
from pathlib import Path

from agent.vision.check import resolve_model, shipped_models

ROOT = Path(__file__).resolve().parents[2]


def test_the_listed_packages_are_exactly_the_package_folders() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("agent", "firmware_bridge", "hw_sim")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert listed == found | {"sortgate_models"}
    assert tool["package-dir"] == {"sortgate_models": "models"}
    assert (ROOT / "models" / "__init__.py").exists()


def test_a_bare_model_name_is_a_shipped_model_and_a_path_is_a_path() -> None:
    assert resolve_model("xray_int8.tflite") == shipped_models() / "xray_int8.tflite"
    assert resolve_model("xray_int8.tflite").is_file()
    assert resolve_model("/srv/models/mine.tflite") == Path("/srv/models/mine.tflite")
    assert resolve_model("models/mine.tflite") == Path("models/mine.tflite")
