"""Barcode readers on pseudo-terminals.

Each ``SimReader`` owns a pty pair: the simulator writes frames to the master side, and the agent
opens the slave path (``/dev/pts/N``) exactly as it would open ``/dev/ttyUSB0`` on the floor. The
slave is put in raw mode so the line discipline passes CR, LF, STX and ETX through untouched.

``NullModem`` bridges two ptys (what tty0tty or ``socat pty,raw pty,raw`` do), so two programs
that each open a serial device by path — pymodbus's RTU server and client — can talk.
"""

from __future__ import annotations

import asyncio
import os
import time
import tty
from pathlib import Path

from firmware_bridge.reader_codec import CounterFormat, encode_frame

#: the counter our simulated readers prefix when they send one: 4 digits, wrapping at 10000
SIM_COUNTER = CounterFormat("prefix", ":", 4, 10_000)


def _raw_pty() -> tuple[int, int, str]:
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


class SimReader:
    def __init__(
        self, name: str, prefix: bytes = b"", suffix: bytes = b"\r\n", noread: str = "NoRead",
        delimiter: str = ";", counter: CounterFormat | None = None, link: Path | None = None,
    ) -> None:
        """``link``: a stable name for the device (as udev's /dev/serial/by-id/... is), which
        disappears while the reader is unplugged; the agent is then configured with it."""
        self.name = name
        self.prefix, self.suffix, self.noread, self.delimiter = prefix, suffix, noread, delimiter
        self.counter_format = counter
        self.counter = 0  # the reader's trigger counter: one step per read cycle, 0 after power-up
        self.link = link
        self.plug()

    def plug(self) -> None:
        """A (new) USB-serial device appears: a new pty, and the stable name points at it."""
        self._master, self._slave, self.tty = _raw_pty()
        self.plugged = True
        if self.link is not None:
            tmp = self.link.with_suffix(".new")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.tty)
            tmp.replace(self.link)

    def unplug(self) -> None:
        """The device is pulled: its node disappears and the agent's open port fails."""
        self.plugged = False
        if self.link is not None:
            self.link.unlink(missing_ok=True)
        self.close()

    @property
    def path(self) -> str:
        return str(self.link) if self.link is not None else self.tty

    def send_raw(self, data: bytes) -> float:
        """Write bytes to the wire; returns the monotonic time they were written (nothing is
        written while unplugged)."""
        if not self.plugged:
            return time.monotonic()
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._master, view)
            except BlockingIOError:
                time.sleep(0.001)  # the agent is not draining; a real UART would drop bytes
                continue
            view = view[n:]
        return time.monotonic()

    def next_cycle(self) -> int:
        """A read cycle starts: the counter moves on (whether or not a frame follows)."""
        self.counter = (self.counter + 1) % (self.counter_format.modulus if self.counter_format else 1 << 32)
        return self.counter

    def send(self, codes: list[str] | None, counter: int | None = None) -> float:
        if self.counter_format is None:
            counter = None
        return self.send_raw(
            encode_frame(codes, self.prefix, self.suffix, self.noread, self.delimiter, counter, self.counter_format)
        )

    def drain(self) -> bytes:
        """Read whatever the agent sent towards the reader (nothing, normally)."""
        try:
            return os.read(self._master, 4096)
        except (BlockingIOError, OSError):
            return b""

    def close(self) -> None:
        self.plugged = False  # frames still scheduled go nowhere, as on a pulled cable
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass


class NullModem:
    """Two ptys with their masters cross-connected. ``a`` and ``b`` are the device paths."""

    def __init__(self) -> None:
        self._ma, self._sa, self.a = _raw_pty()
        self._mb, self._sb, self.b = _raw_pty()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self._ma, self._pump, self._ma, self._mb)
        loop.add_reader(self._mb, self._pump, self._mb, self._ma)

    @staticmethod
    def _pump(src: int, dst: int) -> None:
        try:
            data = os.read(src, 4096)
        except (BlockingIOError, OSError):
            return
        try:
            os.write(dst, data)
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        loop = asyncio.get_event_loop()
        for fd in (self._ma, self._mb):
            try:
                loop.remove_reader(fd)
            except (ValueError, OSError):
                pass
        for fd in (self._ma, self._sa, self._mb, self._sb):
            try:
                os.close(fd)
            except OSError:
                pass
