"""The command line as a technician meets it: config errors stop start-up, naming file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "sortgate.example.toml"


def sortgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_example_config_is_valid() -> None:
    r = sortgate("check-config", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_run_refuses_an_invalid_config_naming_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    text = EXAMPLE.read_text()
    text = text.replace("poll_interval_ms = 5 ", "poll_interval_ms = 0 ")
    text = text.replace('parity = "N"', 'parity = "X"').replace("[decision]", "[decision]\nsafety_margin = 5")
    bad.write_text(text)
    r = sortgate("run", "--config", str(bad))
    assert r.returncode == 2
    assert "refusing to start" in r.stderr
    assert f"{bad}: controller.poll_interval_ms:" in r.stderr and "(got 0)" in r.stderr
    assert f"{bad}: readers[0].parity:" in r.stderr and "(got 'X')" in r.stderr
    assert f"{bad}: decision.safety_margin: unknown key" in r.stderr
    r = sortgate("check-config", str(bad))
    assert r.returncode == 2 and "3 problem(s)" in r.stderr


def test_cross_field_rules_are_checked(tmp_path: Path) -> None:
    bad = tmp_path / "lanes.toml"
    bad.write_text(EXAMPLE.read_text().replace("gate = 1\n", ""))
    r = sortgate("check-config", str(bad))
    assert r.returncode == 2
    assert "release lane 2 has no gate" in r.stderr


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "syntax.toml"
    bad.write_text("[line\nsite = 1\n")
    r = sortgate("check-config", str(bad))
    assert r.returncode == 2 and "TOML syntax error" in r.stderr and str(bad) in r.stderr
    r = sortgate("run", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_unusable_state_dir_stops_start_up_with_the_key(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state folder should be")
    cfg = tmp_path / "state.toml"
    cfg.write_text(EXAMPLE.read_text().replace('state_dir = "/var/lib/sortgate"', f'state_dir = "{blocker}/state"'))
    r = sortgate("run", "--config", str(cfg))
    assert r.returncode == 2
    assert "storage.state_dir" in r.stderr and str(blocker) in r.stderr
