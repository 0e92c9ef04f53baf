"""sd_notify speaks systemd's datagram protocol; outside systemd it is a no-op."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agent.service.health import SystemdNotifier


def test_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = SystemdNotifier()
    assert not n.enabled and n.notify("READY=1") is False


def test_ready_status_watchdog_datagrams(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "5000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        n = SystemdNotifier()
        assert n.watchdog_s == 5.0
        n.ready("waiting for controller")
        assert server.recv(256) == b"READY=1\nSTATUS=waiting for controller"
        n.watchdog()
        assert server.recv(256) == b"WATCHDOG=1"


def test_watchdog_meant_for_another_pid_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "5000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert SystemdNotifier().watchdog_s is None


def test_clock_watch_reports_steps_not_slewing() -> None:
    from agent.service.health import ClockWatch

    t = {"wall": 1_000_000.0, "mono": 50.0}
    watch = ClockWatch(step_s=2.0, wall=lambda: t["wall"], mono=lambda: t["mono"])
    t["wall"] += 1.0
    t["mono"] += 1.0
    assert watch.check() is None  # time passing is no step
    for _ in range(10):  # NTP slewing: 0.5 s in ten small moves
        t["wall"] += 1.05
        t["mono"] += 1.0
        assert watch.check() is None
    t["wall"] += 3600.0
    assert watch.check() == 3600.0
    assert watch.check() is None  # reported once
    t["wall"] -= 7200.0
    assert watch.check() == -7200.0
