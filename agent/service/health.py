"""Health: systemd integration, and the vital tasks' progress that decides whether to feed it.

sd_notify (READY, STATUS, WATCHDOG, STOPPING) without a dependency:

The notify protocol is one datagram to ``$NOTIFY_SOCKET`` (a path, or ``@`` for the abstract
namespace). When the unit has ``WatchdogSec=``, systemd sets ``$WATCHDOG_USEC`` and restarts the
service if no ``WATCHDOG=1`` arrives in time; we ping at a quarter of that period from the event loop, so a
stuck loop stops the pings. Outside systemd every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("sortgate.health")


class SystemdNotifier:
    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET")
        self._addr: str | None = None
        if addr:
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_s: float | None = None
        if usec and (not pid or int(pid) == os.getpid()):
            self.watchdog_s = int(usec) / 1_000_000

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def notify(self, *fields: str) -> bool:
        if not self._addr:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(fields).encode(), self._addr)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")


class VitalTaskStalled(Exception):
    """A vital task died or stopped making progress."""


class Vitals:
    """Which vital tasks show no progress. While any is stuck (``stalled``), neither the
    controller's watchdog nor systemd's is fed, so the controller sends every parcel to inspection;
    after ``exit_s`` ``check`` raises ``VitalTaskStalled``, ending the agent non-zero so that
    systemd restarts it."""

    def __init__(self, stall_s: float, exit_s: float) -> None:
        self.stall_s, self.exit_s = stall_s, exit_s
        self._turns: dict[str, tuple[Callable[[], float], float]] = {}
        self._alive: dict[str, Callable[[], bool]] = {}
        self.stalled: list[str] = []
        self._since: float | None = None

    def watch(self, name: str, last_turn: Callable[[], float], slack_s: float = 0.0) -> None:
        """A loop that marks each turn (monotonic time): stuck when silent for stall_s + slack_s."""
        self._turns[name] = (last_turn, slack_s)

    def require(self, name: str, alive: Callable[[], bool]) -> None:
        """A thread or resource that must be alive."""
        self._alive[name] = alive

    def check(self, now: float) -> None:
        stalled = [n for n, (turn, slack) in self._turns.items() if now - turn() > self.stall_s + slack]
        stalled += [n for n, alive in self._alive.items() if not alive()]
        if stalled and not self.stalled:
            log.error("vital task stalled; heartbeats stop", tasks=stalled)
            self._since = now
        elif not stalled and self.stalled:
            log.info("vital tasks running again", tasks=self.stalled)
            self._since = None
        self.stalled = stalled
        if self._since is not None and now - self._since > self.exit_s:
            raise VitalTaskStalled(f"vital task(s) {', '.join(stalled)} stalled for {self.exit_s:.0f} s")


class ClockWatch:
    """Notices the wall clock stepping — NTP setting the clock of a box without a real-time clock
    after boot, a manual change — as a jump in the offset between wall and monotonic time. Durations
    in the agent are monotonic; the wall clock only stamps records and judges verdict validity, so
    a step is reported, not corrected. Slow NTP slewing is no step: the offset is followed."""

    def __init__(
        self, step_s: float = 2.0, wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic
    ) -> None:
        self.step_s, self._wall, self._mono = step_s, wall, mono
        self._offset = wall() - mono()

    def check(self) -> float | None:
        """The step since the last check in seconds (+ forward), or None."""
        offset = self._wall() - self._mono()
        step, self._offset = offset - self._offset, offset
        return step if abs(step) > self.step_s else None
