"""The local console beside a simulated line: its process, and live clients for the benchmark
(``sortgate bench line --console-clients N``: N browsers' worth of requests, each holding the live
event stream open and loading the stats and a parcel search every few seconds, as an open Stats or
Parcels page would)."""

from __future__ import annotations

import contextlib
import http.client
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["ConsoleProcess", "LoadClients", "free_port"]

DEFAULT_PORT = 8470


def free_port(preferred: int | None = None) -> int:
    """``preferred`` if it is free on loopback, else any free port."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port on 127.0.0.1")


class ConsoleProcess:
    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self, timeout_s: float = 20.0) -> None:
        with open(self.log, "ab") as out:
            # at the priority systemd gives it (sortgate-console.service: Nice=10): the console waits,
            # the line does not
            # (nice execs the console: the pid stays the console's)
            self.proc = subprocess.Popen(
                ["nice", "-n", "10", sys.executable, "-m", "agent.cli", "console", "run", "--config", str(self.config)],
                stdout=out, stderr=out,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"console did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class LoadClients:
    """N clients, each on its own thread: one open /events stream, plus /api/stats?hours=1 and a
    parcel search every ``every_s``. Counts what they received."""

    def __init__(self, port: int, n: int, every_s: float = 5.0) -> None:
        self.port, self.n, self.every_s = port, n, every_s
        self.stop_ = threading.Event()
        self.events = 0
        self.pages = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.n):
            for target in (self._stream, self._pages):
                t = threading.Thread(target=target, name=f"console-client-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def stop(self) -> None:
        self.stop_.set()
        for t in self._threads:
            t.join(5)

    def _stream(self) -> None:
        while not self.stop_.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/events")
                resp = conn.getresponse()
                while not self.stop_.is_set():
                    line = resp.fp.readline()
                    if not line:
                        break
                    if line.startswith(b"data: "):
                        with self._lock:
                            self.events += 1
            except OSError as exc:
                with self._lock:
                    self.errors.append(f"events: {exc}")
                self.stop_.wait(1.0)
            finally:
                conn.close()

    def _pages(self) -> None:
        while not self.stop_.wait(self.every_s):
            for path in ("/api/stats?hours=1", "/parcels?q=SIM", "/"):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                try:
                    conn.request("GET", path)
                    resp = conn.getresponse()
                    resp.read()
                    with self._lock:
                        if resp.status == 200:
                            self.pages += 1
                        else:
                            self.errors.append(f"{path}: HTTP {resp.status}")
                except OSError as exc:
                    with self._lock:
                        self.errors.append(f"{path}: {exc}")
                finally:
                    conn.close()
