"""Serial transport for barcode readers: pyserial on the asyncio loop.

The port is opened non-blocking and watched with ``loop.add_reader`` on its file descriptor, so
bytes are handed to the frame decoder the moment they arrive (no polling thread, no added
latency). A port that fails (USB reader unplugged, device missing) is closed and reopened with a
jittered doubling delay up to a cap (``backoff.Backoff``); the failure is reported once and the recovery once.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import serial

from firmware_bridge.backoff import Backoff
from firmware_bridge.errors import SerialPortError
from firmware_bridge.reader_codec import Event, FrameDecoder
from firmware_bridge.serial_line import SerialLine

__all__ = ["ReaderPort"]

READER_DEFAULT = SerialLine()  # 9600 8N1, the usual reader setting

#: bytes taken per read (a reader frame is tens of bytes; more wait for the next read)
READ_SIZE = 4096

_PARITY = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}


class ReaderPort:
    def __init__(
        self,
        name: str,
        device: str,
        decoder: FrameDecoder,
        on_event: Callable[[str, Event, float], None],
        on_state: Callable[[str, bool, str], None],
        line: SerialLine = READER_DEFAULT,
        reopen_max_s: float = 5.0,
    ) -> None:
        self.name = name
        self.device = device
        self.decoder = decoder
        self._on_event = on_event
        self._on_state = on_state
        self._params = {
            "baudrate": line.baudrate,
            "bytesize": line.bytesize,
            "parity": _PARITY[line.parity],
            "stopbits": line.stopbits,
        }
        self._reopen_max_s = reopen_max_s
        self._port: serial.Serial | None = None
        self._failed: asyncio.Event | None = None
        self.bytes_in = 0

    def open(self) -> None:
        try:
            port = serial.Serial(self.device, timeout=0, exclusive=True, **self._params)
            # Bytes buffered before we opened belong to parcels this agent never saw (sent while it
            # was down): drop them rather than let them look like fresh frames.
            port.reset_input_buffer()
        except (serial.SerialException, OSError, ValueError) as exc:
            raise SerialPortError(f"reader {self.name}: cannot open {self.device}: {exc}") from exc
        self._port = port

    async def run(self) -> None:
        """Read until cancelled; reopen on failure with capped, jittered doubling delay."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(0.1, max(0.1, self._reopen_max_s))
        while True:
            try:
                if self._port is None:
                    self.open()
                assert self._port is not None
                self._failed = asyncio.Event()
                loop.add_reader(self._port.fileno(), self._readable)
                self._on_state(self.name, True, f"open {self.device}")
                backoff.reset()
                try:
                    await self._failed.wait()
                finally:
                    self._close(loop)
            except SerialPortError as exc:
                self._on_state(self.name, False, str(exc))
            delay = backoff.next()
            self._on_state(self.name, False, f"reopening {self.device} in {delay:.1f}s")
            await asyncio.sleep(delay)

    def _readable(self) -> None:
        port = self._port
        if port is None:
            return
        try:
            # the descriptor is non-blocking (pyserial opens it so) and ready: one read, without
            # pyserial's select and size query around it
            data = os.read(port.fileno(), READ_SIZE)
        except BlockingIOError:
            return
        except (serial.SerialException, OSError) as exc:
            self._fail(f"read failed: {exc}")
            return
        if not data:  # ready but nothing to read: the device went away
            self._fail("read failed: the device reports data but returns none (disconnected?)")
            return
        now = time.monotonic()
        self.bytes_in += len(data)
        for event in self.decoder.feed(data):
            self._on_event(self.name, event, now)

    def _fail(self, why: str) -> None:
        self._on_state(self.name, False, why)
        if self._failed:
            self._failed.set()

    def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._port is not None:
            try:
                loop.remove_reader(self._port.fileno())
            except (ValueError, OSError):
                pass
            try:
                self._port.close()
            except (serial.SerialException, OSError):
                pass
            self._port = None
