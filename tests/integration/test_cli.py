"""The command line as a technician meets it: config errors stop start-up, naming file and key."""

from __future__ import annotations

import json
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


def test_check_config_checks_what_it_can_beyond_the_file(tmp_path: Path) -> None:
    """The OK line names the broker; a missing device is a warning (a udev name may appear later);
    no [mqtt], an unwritable state_dir or a model that does not load are problems (exit 2)."""
    good = tmp_path / "good.toml"
    text = EXAMPLE.read_text().replace('state_dir = "/var/lib/sortgate"', f'state_dir = "{tmp_path}/state"')
    good.write_text(text)
    r = sortgate("check-config", str(good))
    assert r.returncode == 0, r.stderr
    assert "broker mqtt.hub.example:1883" in r.stdout
    assert "warning: readers[0].device: /dev/sortgate-reader-top does not exist" in r.stderr
    assert not (tmp_path / "state").exists()  # checked, not created

    no_mqtt = tmp_path / "no-mqtt.toml"
    start, end = text.index("[mqtt]"), text.index("# [mqtt.tls]")
    no_mqtt.write_text(text[:start] + text[end:])
    r = sortgate("check-config", str(no_mqtt))
    assert r.returncode == 2 and "[mqtt] is missing" in r.stderr

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    stuck = tmp_path / "stuck.toml"
    stuck.write_text(text.replace(f'state_dir = "{tmp_path}/state"', f'state_dir = "{blocker}/state"'))
    r = sortgate("check-config", str(stuck))
    assert r.returncode == 2 and "storage.state_dir" in r.stderr

    broken = tmp_path / "model.tflite"
    broken.write_bytes(b"not a model")
    vision = tmp_path / "vision.toml"
    vision.write_text(text.replace('mode = "off"', 'mode = "required"', 1)
                      .replace('model = "xray_int8.tflite"', f'model = "{broken}"', 1))
    r = sortgate("check-config", str(vision))
    assert r.returncode == 2 and "vision.model" in r.stderr


def test_bench_sweep_writes_its_table_json_and_plot(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bench", "sweep", "--rates", "4,8", "--seconds", "3", "--idle-s", "1",
         "--json", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=110,
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert [row["rate"] for row in result["rows"]] == [4.0, 8.0]
    for row in result["rows"]:
        assert row["parcels"] == int(row["rate"] * 3) and row["records_missing"] == 0
        assert row["wrongly_released"] == 0 and row["cpu_pct"] is not None
    md = (tmp_path / "sweep.md").read_text()
    assert "| 4 | 3 |" in md and "| 8 | 3 |" in md
    png = (tmp_path / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_bench_sweep_refuses_bad_rates() -> None:
    r = sortgate("bench", "sweep", "--rates", "5,-1")
    assert r.returncode == 2 and "--rates" in r.stderr
