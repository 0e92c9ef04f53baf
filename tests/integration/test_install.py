"""tools/install.py end to end, without systemd (--no-system): the previous release (0.1.0, built
from git) installed, then upgrades to this tree's version that fail their health check and roll
back, one that succeeds, and a rollback asked for. Config, verdict store and outbox must come
through every step intact (issue 14)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import agent

ROOT = Path(__file__).resolve().parents[2]
PREVIOUS = ("0.1.0", "76a4686")  # the last commit of 0.1.0, the version before the installer

pytestmark = pytest.mark.integration


def _wheel(src: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                   check=True, capture_output=True, timeout=240)
    return next(out.glob("sortgate-*.whl"))


def _install(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(ROOT / "tools" / "install.py"), "--no-system",
           "--prefix", str(tmp / "opt"), "--etc", str(tmp / "etc"), "--state", str(tmp / "state"),
           "--unit-dir", str(tmp / "units"), "--udev-dir", str(tmp / "udev"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _rows(state: Path) -> dict[str, set[str]]:
    """Every row of every table of each store: what must survive."""
    out = {}
    for name in ("outbox.sqlite", "verdicts.sqlite"):
        conn = sqlite3.connect(state / name)
        for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"):
            out[f"{name}:{t}"] = {repr(row) for row in conn.execute(f"SELECT * FROM {t}")}
        conn.close()
    return out


def _kept(before: dict[str, set[str]], after: dict[str, set[str]]) -> list[str]:
    """Rows of ``before`` missing or changed in ``after`` (new rows, the agent's own alarms, are fine)."""
    return [f"{t}: {row}" for t, rows in before.items() for row in rows - after.get(t, set())]


FILL = """
import asyncio, datetime as dt, sys
from pathlib import Path
from agent.central.messages import VerdictItem
from agent.central.outbox import Outbox
from agent.central.verdicts import VerdictStore
state = Path(sys.argv[1])
async def main():
    o = Outbox(state / "outbox.sqlite")
    for i in range(25):
        await o.add(f"rec-{i}", "sortgate/HKG/L1/parcels", b'{"n": %d}' % i)
    await o.set_cursors({"result_rseq": 77, "controller_boot": 3})
    await o.save_decision("3:77", b"decision")
    o.close()
    v = VerdictStore(state / "verdicts.sqlite", 3600)
    now = dt.datetime.now(dt.UTC)
    await v.store([VerdictItem(waybill=f"EE{i:09d}CN", verdict="release", verdict_id=f"v{i}", issued_at=now)
                   for i in range(40)])
    v.close()
asyncio.run(main())
"""


@pytest.mark.timeout(900)
def test_install_upgrade_failed_upgrade_and_rollback_keep_config_and_state(tmp_path: Path) -> None:
    version = agent.__version__
    assert version != PREVIOUS[0]
    prev_src = tmp_path / "prev-src"
    prev_src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS[1]], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(prev_src)], input=archive.stdout, check=True)
    new_src = tmp_path / "new-src"
    shutil.copytree(ROOT, new_src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "dist"))
    prev_wheel = _wheel(prev_src, tmp_path / "w-prev")
    new_wheel = _wheel(new_src, tmp_path / "w-new")
    etc, state, opt = tmp_path / "etc", tmp_path / "state", tmp_path / "opt"

    # a new box with the previous release: the example config, which the technician then edits
    r = _install(tmp_path, "install", "--wheel", str(prev_wheel))
    assert r.returncode == 0, r.stderr
    assert (opt / "current").resolve() == opt / PREVIOUS[0]
    cfg = etc / "sortgate.toml"
    assert cfg.exists()
    # the box's config as 0.1.0 had it: its example (the installer's own is this tree's), edited
    text = (prev_src / "config" / "sortgate.example.toml").read_text()
    assert 'model = "/opt/sortgate/models/xray_int8.tflite"' in text  # 0.1.0's default
    cfg.write_text(text.replace('state_dir = "/var/lib/sortgate"', f'state_dir = "{state}"')
                   .replace('site = "', 'site = "HKG" # was "', 1))
    edited = cfg.read_bytes()
    unit = (tmp_path / "units" / "sortgate.service").read_text()
    assert f"ExecStart={opt}/current/bin/sortgate run" in unit
    assert (tmp_path / "udev" / "99-sortgate.rules").exists()
    assert (opt / "install.py").read_bytes() == (ROOT / "tools" / "install.py").read_bytes()
    subprocess.run([str(opt / "current" / "bin" / "python"), "-c", FILL, str(state)], check=True, timeout=60)
    before = _rows(state)

    # an upgrade whose new version fails its health check: rolled back by itself
    r = _install(tmp_path, "install", "--wheel", str(new_wheel), "--health", "false")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"rolling back to {PREVIOUS[0]}" in r.stdout
    assert (opt / "current").resolve() == opt / PREVIOUS[0]
    assert cfg.read_bytes() == edited  # the migrated config was put back
    assert _rows(state) == before
    assert not (opt / version).exists()
    status = json.loads(_install(tmp_path, "status").stdout)
    assert status["current"] == PREVIOUS[0] and status["record"]["failed"] == version

    # an upgrade that passes: the new version runs against the old state (3 s, then SIGTERM: a clean stop)
    health = 'timeout -s TERM 3 "$SORTGATE" run --config "$SORTGATE_CONFIG"; test $? -eq 124'
    r = _install(tmp_path, "install", "--wheel", str(new_wheel), "--health", health)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (opt / "current").resolve() == opt / version
    migrated = cfg.read_text()
    assert 'model = "xray_int8.tflite"' in migrated and "vision.model" in r.stdout
    assert migrated == edited.decode().replace("/opt/sortgate/models/xray_int8.tflite", "xray_int8.tflite")
    after = _rows(state)
    assert _kept(before, after) == []  # nothing lost or changed
    added = [row for t, rows in after.items() for row in rows - before[t]]
    assert added and all("sortgate/HKG/L1/alarms" in row for row in added)  # its own alarms: no controller
    assert _rows(state) == after
    assert sqlite3.connect(state / "outbox.sqlite").execute("PRAGMA user_version").fetchone()[0] == 1
    backups = list((state / "backups").iterdir())
    assert any((b / "outbox.sqlite").exists() for b in backups)
    assert subprocess.run([str(opt / "current" / "bin" / "sortgate"), "--version"],
                          capture_output=True, text=True).stdout.strip() == f"sortgate {version}"

    # a rollback asked for: the previous version, its config; the same-schema stores stay as they are
    r = _install(tmp_path, "rollback")
    assert r.returncode == 0, r.stderr
    assert (opt / "current").resolve() == opt / PREVIOUS[0]
    assert cfg.read_bytes() == edited
    assert _rows(state) == after  # records written by the newer version stay
    assert "stores kept as they are" in r.stdout

    # uninstall keeps config and state
    r = _install(tmp_path, "uninstall")
    assert r.returncode == 0 and not opt.exists()
    assert cfg.read_bytes() == edited and _rows(state) == after


def _installer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sortgate_install", ROOT / "tools" / "install.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_a_rollback_across_a_schema_change_restores_the_stores_and_keeps_the_newer_aside(tmp_path: Path) -> None:
    inst = _installer()
    lay = inst.Layout(tmp_path / "opt", tmp_path / "etc", tmp_path / "state", tmp_path / "u", tmp_path / "d")
    for d in (lay.prefix / "1.0", lay.etc, lay.state):
        d.mkdir(parents=True)
    conn = sqlite3.connect(lay.state / "outbox.sqlite")
    conn.execute("CREATE TABLE outbox (id INTEGER)")
    conn.execute("INSERT INTO outbox VALUES (1)")
    conn.commit()
    conn.close()
    copy = inst.backup_state(lay, "1.0")
    assert json.loads((copy / "schemas.json").read_text()) == {"outbox.sqlite": 1}
    conn = sqlite3.connect(lay.state / "outbox.sqlite")  # the new version migrates to schema 2
    conn.execute("ALTER TABLE outbox ADD COLUMN x TEXT")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    inst.restore(lay, "1.0", None, str(copy), "test")
    assert inst.schema_version(lay.state / "outbox.sqlite") == 1
    (aside,) = (lay.state / "backups").glob("rolled-back-*")
    assert inst.schema_version(aside / "outbox.sqlite") == 2  # kept for a person, never deleted
    assert (lay.prefix / "current").resolve() == lay.prefix / "1.0"
