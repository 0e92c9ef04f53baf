"""``sortgate status`` and the technician commands, as a technician uses them over SSH: against a
running simulated line, against an agent whose controller and broker are down, and with no agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from hw_sim.broker import Mosquitto
from hw_sim.console_load import ConsoleProcess, free_port
from hw_sim.harness import LineRun, RunSpec, run_line
from hw_sim.plan import Mix, make_plan

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "sortgate.example.toml"


def sortgate(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=timeout)


def _wait_for(path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


class Technician(threading.Thread):
    """What a technician does during the run, through the CLI only (subprocesses, as over SSH)."""

    def __init__(self, run: LineRun) -> None:
        super().__init__(name="technician", daemon=True)
        self.run_ = run
        self.out: dict[str, Any] = {}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return sortgate(*args, "--config", str(self.run_.config_path))

    def run(self) -> None:
        try:
            self._steps()
        except Exception as exc:  # noqa: BLE001 - reported by the test, not lost on this thread
            self.out["error"] = repr(exc)

    def _steps(self) -> None:
        _wait_for(self.run_.state_dir / "control.sock")
        deadline = time.monotonic() + 20
        while True:  # until parcels have been recorded
            st = self.cli("status", "--json")
            status = json.loads(st.stdout)
            if status["parcels"]["recent"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.out["status_json"] = (st.returncode, status)
        self.out["status_text"] = self.cli("status")
        self.out["fire_outside"] = self.cli("gate", "fire", "1", "--yes")
        self.out["no_confirm"] = self.cli("gate", "fire", "1")  # no terminal, no --yes: not fired
        self.out["on"] = self.cli("maintenance", "on")
        time.sleep(0.3)
        self.out["fire"] = self.cli("gate", "fire", "1", "--yes")
        self.out["fire_unknown"] = self.cli("gate", "fire", "9", "--yes")
        self.out["status_maint"] = json.loads(self.cli("status", "--json").stdout)
        self.out["off"] = self.cli("maintenance", "off")
        self.out["watch"] = self.cli("reader", "watch", "reader1", "--json", "--count", "3")
        self.out["watch_unknown"] = self.cli("reader", "watch", "nope")


async def test_status_and_technician_commands_on_a_running_line(broker: Mosquitto, line_name: str) -> None:
    plan = make_plan(150, 5, seed=71, speed_mps=3.0, readers=1, mix=Mix(reader_misread=0.0))
    spec = RunSpec(parcels=150, rate=5, seed=71, plan=plan, line=line_name)
    tech: list[Technician] = []

    def progress(run: LineRun) -> None:
        if not tech:
            tech.append(Technician(run))
            tech[0].start()

    run, m = await run_line(spec, broker=broker, on_progress=progress, keep=True)
    try:
        t = tech[0]
        t.join(30)
        out = t.out
        assert "error" not in out, out.get("error")
        rc, st = out["status_json"]
        assert rc == 0 and st["running"] is True
        assert st["controller"]["connected"] and st["controller"]["status"]["belt_mps"] == pytest.approx(3.0, abs=0.3)
        assert "BELT_RUNNING" in st["controller"]["status"]["bits"]
        assert st["mqtt"]["connected"] and st["line"]["healthy"]
        reader = st["readers"][0]
        assert reader["name"] == "reader1" and reader["open"] and reader["frames"] > 0
        assert reader["reads"] + reader["no_reads"] + reader["multi_reads"] == reader["frames"]
        assert reader["last"] and reader["last"][-1]["raw"]
        recent = st["parcels"]["recent"]
        assert recent and all(p["lane_class"] in ("release", "inspection") for p in recent)
        text = out["status_text"]
        assert text.returncode == 0 and "line        healthy" in text.stdout and "controller  connected" in text.stdout

        fire = out["fire_outside"]
        assert fire.returncode == 1 and "not in maintenance" in fire.stderr
        assert out["no_confirm"].returncode == 2 and "--yes" in out["no_confirm"].stderr
        assert out["on"].returncode == 0 and "mode maintenance" in out["on"].stdout
        assert out["fire"].returncode == 0, out["fire"].stderr
        assert [g for _, g in run.model.gate_fires] == [1]  # the simulator saw exactly the one test
        assert out["fire_unknown"].returncode == 1 and "config's gates" in out["fire_unknown"].stderr
        maint = out["status_maint"]
        assert maint["agent"]["mode"] == "maintenance" and maint["agent"]["mode_set_by"] == "local"
        assert "maintenance" in maint["line"]["problems"]
        assert out["off"].returncode == 0 and "mode normal" in out["off"].stdout

        watch = out["watch"]
        assert watch.returncode == 0, watch.stderr
        frames = [json.loads(line) for line in watch.stdout.splitlines()]
        assert len(frames) == 3 and all(f["reader"] == "reader1" and f["kind"] for f in frames)
        assert out["watch_unknown"].returncode == 1 and "no reader 'nope'" in out["watch_unknown"].stderr

        # every action reached central as an audit alarm; nothing went wrong on the line
        assert run.central is not None
        actions = [a for a in run.central.alarms if a.get("alarm") == "audit"]
        assert [a["action"] for a in actions] == ["set_mode", "fire_gate", "set_mode"]
        assert m["wrongly_released"] == 0 and m["records_published"] == m["parcels"]
    finally:
        run.cleanup()


def test_status_says_plainly_what_is_down_and_when_no_agent_runs(tmp_path: Path) -> None:
    state = tmp_path / "state"
    text = EXAMPLE.read_text()
    text = text.replace('host = "192.0.2.10"', 'host = "127.0.0.1"').replace("port = 502 ", f"port = {free_port()} ")
    text = text.replace('host = "mqtt.hub.example"', 'host = "127.0.0.1"').replace("port = 1883", f"port = {free_port()}")
    text = text.replace('state_dir = "/var/lib/sortgate"', f'state_dir = "{state}"')
    text = text.replace('"/dev/sortgate-reader-top"', f'"{tmp_path}/no-such-reader"')
    console_port = free_port()
    text += f"\n[console]\nport = {console_port}\n"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    assert sortgate("check-config", str(cfg)).returncode == 0
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(state / "control.sock")
        time.sleep(1.5)  # a connection attempt to each has failed
        r = sortgate("status", "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        assert "line        UNHEALTHY: controller_offline" in r.stdout
        assert "controller  OFFLINE modbus-tcp://127.0.0.1:" in r.stdout and "cannot connect" in r.stdout
        assert "mqtt        OFFLINE 127.0.0.1:" in r.stdout
        assert "OFFLINE (" in r.stdout and "no-such-reader" in r.stdout  # the reader, and why
        st = json.loads(sortgate("status", "--json", "--config", str(cfg)).stdout)
        assert st["controller"]["connected"] is False and st["mqtt"]["connected"] is False
        active = {a["alarm"] for a in st["alarms"]["active"]}
        assert {"controller_offline", "reader_offline", "mqtt_offline"} <= active
        # maintenance is taken on the agent's side even with the controller away; leaving needs it
        assert sortgate("maintenance", "on", "--config", str(cfg)).returncode == 0
        off = sortgate("maintenance", "off", "--config", str(cfg))
        assert off.returncode == 1 and "controller offline" in off.stderr
        # the console works with the broker (and the controller) down: it needs neither
        console = ConsoleProcess(cfg, console_port, tmp_path / "console.log")
        console.start()
        try:
            with urllib.request.urlopen(console.url + "api/status", timeout=10) as r:
                live = json.loads(r.read())
            assert live["ok"] and live["mqtt"]["connected"] is False and live["controller"]["connected"] is False
            with urllib.request.urlopen(console.url, timeout=10) as r:
                assert r.status == 200 and b"id=\"parcels\"" in r.read()
        finally:
            console.stop()
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
    r = sortgate("status", "--config", str(cfg))
    assert r.returncode == 3
    assert "agent       NOT RUNNING" in r.stdout
    assert "mode        maintenance (from mode.json)" in r.stdout
    assert "records waiting (from outbox.sqlite)" in r.stdout  # the alarms it could not send
    st = json.loads(sortgate("status", "--json", "--config", str(cfg)).stdout)
    assert st["running"] is False and st["mode"] == "maintenance" and st["outbox_pending"] >= 1
    assert not (state / "control.sock").exists()  # removed on a clean stop


def test_a_central_mode_is_not_lifted_at_the_box(tmp_path: Path) -> None:
    """Tightening is open, loosening is central's: a technician cannot end central's inspect_all,
    nor go into maintenance over it (whose 'off' would then loosen it)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "mode.json").write_text(json.dumps({"mode": "inspect_all", "seen": {}}))
    text = EXAMPLE.read_text().replace('state_dir = "/var/lib/sortgate"', f'state_dir = "{state}"')
    text = text.replace('host = "192.0.2.10"', 'host = "127.0.0.1"').replace("port = 502 ", f"port = {free_port()} ")
    text = text.replace('host = "mqtt.hub.example"', 'host = "127.0.0.1"').replace("port = 1883", f"port = {free_port()}")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(state / "control.sock")
        for state_word in ("on", "off"):
            r = sortgate("maintenance", state_word, "--config", str(cfg))
            assert r.returncode == 1 and "set by central" in r.stderr, r.stderr
        st = json.loads(sortgate("status", "--json", "--config", str(cfg)).stdout)
        assert st["agent"]["mode"] == "inspect_all"
    finally:
        os.kill(agent.pid, signal.SIGTERM)
        agent.wait(15)


def test_sim_prints_the_console_address_and_serves_it() -> None:
    """`make sim` (sortgate sim) starts the console beside the line and says where it is."""
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "sim", "--parcels", "40", "--rate", "5", "--plain"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        said = [proc.stderr.readline() for _ in range(1)]
        while not said[-1].startswith("console: ") and said[-1] and len(said) < 20:
            said.append(proc.stderr.readline())
        assert said[-1].startswith("console: http://127.0.0.1:"), said
        url = said[-1].split()[1]
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200 and b"sortgate" in page.read()
        _, rest = proc.communicate(timeout=120)
        assert proc.returncode == 0, rest[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
