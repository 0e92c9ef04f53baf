"""Faults on the far side of every wire, for ``sortgate bench line --chaos`` and the tests.

Each fault is injected where it happens on a real floor — in the simulated controller, the pty of a
reader, the broker, the filesystem under the agent's state folder — never inside the agent. A fault
names the alarm the agent must raise for it; ``report`` reads central's alarm stream and says, per
fault, whether that alarm was raised and cleared, and how many seconds after the fault ended the
agent had recovered (its clearing alarm's own timestamp minus the moment the fault was removed).

The faults, and what each does:
  agent-kill            SIGKILL the agent; start it again 1 s later (systemd's RestartSec)
  broker-restart        stop mosquitto, start it 2 s later
  verdict-flood         forged signed verdict batches (about 950 KB)
  controller-drop       the controller closes the agent's TCP connection mid-command
  controller-exceptions the controller answers every request with exception 04 for 2 s
  controller-slow       the controller answers 0.4 s late (beyond the agent's time-out) for 2 s
  controller-restart    power cycle: off for 2 s, then the documented power-up state
  controller-freeze     the controller program halts for 3 s while Modbus still answers
  reader-unplug         reader1's device node disappears for 2 s and comes back as a new device
  serial-noise          1 s of random bytes on reader1's line
  broker-auth           the broker refuses the agent's credentials for 4 s
  broker-down-at-start  the agent is restarted while the broker is down; the broker returns 3 s later
  disk-full             the filesystem under state_dir is full for 11 s (a tmpfs: needs root)
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hw_sim.harness import LineRun

Action = Callable[["LineRun"], Awaitable[None]]


@dataclass(frozen=True)
class Fault:
    name: str
    run: Action  # injects the fault and removes it again (returns when it is removed)
    alarm: str | None  # the alarm condition the agent must raise for it, and clear on recovery
    event: str | None = None  # an alarm event it must (also) publish
    # another condition that answers it as well: a full disk stops whichever store must grow first
    # (a steady outbox reuses its WAL pages and may never fail; a verdict batch needs new pages)
    or_alarm: str | None = None
    needs: str = ""  # what the run must set up for it: "auth" (broker passwords), "tmpfs"


async def _agent_kill(run: LineRun) -> None:
    await asyncio.to_thread(run.kill_agent, True)
    await asyncio.sleep(1.0)
    run.start_agent()


async def _broker_restart(run: LineRun) -> None:
    assert run.broker is not None
    await asyncio.to_thread(run.broker.stop)
    await asyncio.sleep(2.0)
    await asyncio.to_thread(run.broker.start)


async def _verdict_flood(run: LineRun) -> None:
    from hw_sim.harness import verdict_flood

    await asyncio.to_thread(verdict_flood, run)


async def _controller_drop(run: LineRun) -> None:
    """Close the agent's connection right after the next lane command arrives (before its
    acknowledgement is read): the worst moment for the agent."""
    done = asyncio.get_running_loop().create_future()

    def on_command(*_: Any) -> None:
        run.model.on_command = None
        if not done.done():
            asyncio.get_running_loop().call_soon(run.drop_controller_connections)
            done.set_result(None)

    run.model.on_command = on_command
    try:
        await asyncio.wait_for(done, 5.0)
    except TimeoutError:
        run.model.on_command = None
        run.drop_controller_connections()


async def _controller_answer(run: LineRun, how: str, seconds: float) -> None:
    run.model.slow_s = 0.4
    run.model.answer = how
    await asyncio.sleep(seconds)
    run.model.answer = "normal"


async def _controller_exceptions(run: LineRun) -> None:
    await _controller_answer(run, "exception", 2.0)


async def _controller_slow(run: LineRun) -> None:
    await _controller_answer(run, "slow", 2.0)


async def _controller_restart(run: LineRun) -> None:
    await run.controller_power_cycle(off_s=2.0)


async def _controller_freeze(run: LineRun) -> None:
    run.model.halt(True)
    await asyncio.sleep(3.0)
    run.model.halt(False)


async def _reader_unplug(run: LineRun) -> None:
    reader = run.readers[0]
    reader.unplug()
    await asyncio.sleep(2.0)
    reader.plug()


async def _serial_noise(run: LineRun) -> None:
    rng = random.Random(run.spec.seed + 99)
    reader = run.readers[0]
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        reader.send_raw(bytes(rng.randrange(256) for _ in range(rng.randrange(8, 200))))
        await asyncio.sleep(0.02)


async def _broker_auth(run: LineRun) -> None:
    broker = run.broker
    assert broker is not None
    await asyncio.to_thread(broker.set_password, run.mqtt_user, "not-the-agent's")
    await asyncio.to_thread(broker.restart)  # every client reconnects; the agent is refused
    await asyncio.sleep(4.0)
    await asyncio.to_thread(broker.set_password, run.mqtt_user, run.mqtt_password)
    await asyncio.to_thread(broker.reload)  # accepted again at its next retry


async def _broker_down_at_start(run: LineRun) -> None:
    assert run.broker is not None
    await asyncio.to_thread(run.broker.stop)
    await asyncio.to_thread(run.kill_agent, True)
    run.start_agent()
    await asyncio.sleep(3.0)
    await asyncio.to_thread(run.broker.start)


async def _disk_full(run: LineRun) -> None:
    ballast = run.state_dir / "ballast"
    await asyncio.to_thread(fill, ballast)
    await asyncio.sleep(11.0)  # long enough for a verdict batch (every 10 s at 10/s) to need new pages
    ballast.unlink()


def fill(path: Path) -> None:
    """Write zeros until the filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 512):
            block = bytes(size)
            while True:
                try:
                    os.write(fd, block)
                except OSError:
                    break
    finally:
        os.close(fd)


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("agent-kill", _agent_kill, None),
    Fault("broker-restart", _broker_restart, "mqtt_offline"),
    Fault("verdict-flood", _verdict_flood, None),
    Fault("controller-drop", _controller_drop, "controller_offline"),
    Fault("controller-exceptions", _controller_exceptions, "controller_offline"),
    Fault("controller-slow", _controller_slow, "controller_offline"),
    Fault("controller-restart", _controller_restart, "controller_offline", event="controller_restarted"),
    Fault("controller-freeze", _controller_freeze, "controller_frozen"),
    Fault("reader-unplug", _reader_unplug, "reader_offline"),
    Fault("serial-noise", _serial_noise, None, event="reader_framing_error"),
    Fault("broker-auth", _broker_auth, "mqtt_offline", needs="auth"),
    Fault("broker-down-at-start", _broker_down_at_start, "mqtt_offline"),
    Fault("disk-full", _disk_full, "outbox_full", or_alarm="verdict_store_failed", needs="tmpfs"),
)}


def parse(names: str) -> list[Fault]:
    """``a,b,c`` or ``all``; raises ValueError naming what is unknown."""
    wanted = list(FAULTS) if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in FAULTS]
    if unknown:
        raise ValueError(f"unknown chaos {', '.join(unknown)}; known: {', '.join(FAULTS)}, or all")
    return [FAULTS[n] for n in wanted]


def schedule(faults: list[Fault], duration_s: float) -> list[tuple[float, Fault]]:
    """Spread the faults evenly over the middle of the run (10 % .. 90 %), in the order given,
    so that each one's recovery is seen before the next begins."""
    if not faults:
        return []
    span = 0.8 * duration_s / len(faults)
    return [(0.1 * duration_s + i * span, f) for i, f in enumerate(faults)]


@dataclass
class Injected:
    fault: Fault
    at_s: float  # seconds after the first parcel
    start_wall: float  # time.time() when injected
    end_wall: float | None = None  # time.time() when removed


def report(injected: list[Injected], alarms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fault: its alarm, whether the agent raised and cleared it, and the seconds from the
    fault's removal to the clearing alarm (the agent's own timestamp): its recovery."""
    out = []
    for n, inj in enumerate(injected):
        f = inj.fault
        until = injected[n + 1].start_wall if n + 1 < len(injected) else float("inf")
        seen = [(a, _wall(a)) for a in alarms if inj.start_wall - 0.5 <= _wall(a) < until]
        entry: dict[str, Any] = {"fault": f.name, "at_s": round(inj.at_s, 1)}
        if f.alarm is not None:
            kind = f.alarm
            if f.or_alarm and not any(a.get("alarm") == kind for a, _ in seen):
                kind = f.or_alarm
            raised = [t for a, t in seen if a.get("alarm") == kind and a.get("active")]
            cleared = [t for a, t in seen if a.get("alarm") == kind and not a.get("active")
                       and raised and t >= raised[0]]
            entry.update(alarm=kind, raised=bool(raised), cleared=bool(cleared))
            if cleared:
                entry["recovery_s"] = round(max(0.0, cleared[0] - (inj.end_wall or inj.start_wall)), 2)
        if f.event is not None:
            entry["event"] = f.event
            entry["event_raised"] = any(a.get("alarm") == f.event for a, _ in seen)
        out.append(entry)
    return out


def _wall(alarm: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(alarm.get("at"))).timestamp()
    except ValueError:
        return 0.0


class Tmpfs:
    """A small tmpfs mounted over a folder, so that it can be filled (root only)."""

    def __init__(self, path: Path, size_mb: int = 64) -> None:
        self.path, self.size_mb = path, size_mb
        self.mounted = False

    def mount(self) -> None:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            raise RuntimeError("disk-full mounts a small tmpfs under state_dir: run as root")
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs", str(self.path)], check=True)
        self.mounted = True

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)
            self.mounted = False
