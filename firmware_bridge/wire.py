"""Blocking Modbus transports for the link's I/O thread: TCP on a socket, RTU on a serial port.

The frames are pymodbus's own: requests and responses are pymodbus PDUs, framed and checked by
pymodbus's socket and RTU framers (MBAP header and transaction id; device address and CRC). Only
the waiting is ours. An asyncio client wakes the event loop twice per transaction (its timer and
its response) and runs pymodbus's transaction manager each time; here one thread sleeps until the
next poll and blocks on the response, which costs about half the CPU per poll on the development
machine (docs/performance.md). One ``Wire`` carries one transaction at a time and is used by one
thread only, except ``abort``.

Any failure — a time-out, a closed connection, a frame that does not decode — raises
``LinkError``. A failed status poll ends the session and the link connects again; after another
request timed out (a lane command, say) the connection stays, and its late answer is never taken
for the next one: in TCP it carries another transaction id and is skipped, in RTU the input is
drained before every request.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import serial
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ModbusPDU

from firmware_bridge.errors import LinkError
from firmware_bridge.serial_line import SerialLine

__all__ = ["Repeated", "RtuWire", "TcpWire", "Wire", "registers_bytes", "registers_list"]

Trace = Callable[[bool, bytes], object]


class Wire:
    """One connection; ``transact`` sends a request PDU and returns the response PDU."""

    def __init__(self, unit_id: int, timeout_s: float, trace: Trace) -> None:
        self.unit_id = unit_id
        self.timeout_s = timeout_s
        self._trace = trace
        self._buf = b""

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """From any thread: the link is closing; end a blocked read early where that is safe."""

    def _send(self, data: bytes | bytearray) -> None:
        raise NotImplementedError

    def _wait_readable(self, timeout_s: float) -> bool:
        raise NotImplementedError

    def _recv(self) -> bytes:
        raise NotImplementedError

    def _tid(self) -> int:
        return 0

    def _framer(self) -> FramerSocket | FramerRTU:
        raise NotImplementedError

    def _send_request(self, request: ModbusPDU) -> int:
        request.dev_id = self.unit_id
        request.transaction_id = tid = self._tid()
        frame = self._framer().buildFrame(request)
        self._send(frame)
        self._trace(True, frame)
        return tid

    def transact(self, request: ModbusPDU) -> ModbusPDU:
        tid = self._send_request(request)
        return self._receive(tid, time.monotonic() + self.timeout_s)

    def transact_registers(self, request: ModbusPDU, count: int) -> bytes | ModbusPDU:
        """A register read (function 3 or 23): the ``count`` registers as the big-endian bytes of
        the response, or the response PDU when it is anything else (an exception response)."""
        response = self.transact(request)
        if response.isError():
            return response
        return registers_bytes(response.registers)

    def transact_repeated(self, repeated: Repeated, value: int | None = None) -> bytes | ModbusPDU:
        """``transact_registers`` for a request sent again and again; ``value``: the one register
        it writes (function 23), this time."""
        if value is not None:
            repeated.request.write_registers = [value]
        return self.transact_registers(repeated.request, repeated.count)

    def _receive(self, tid: int, deadline: float) -> ModbusPDU:
        framer = self._framer()
        buf = self._buf
        try:
            while True:
                if buf:
                    used, response = framer.handleFrame(buf, self.unit_id, tid)
                    buf = buf[used:]
                    # pymodbus lets an answer with transaction id 0 through; ours is never 0
                    if response is not None and response.transaction_id == tid:
                        # one request at a time: whatever follows its answer answers nothing
                        buf = b""
                        return response
                left = deadline - time.monotonic()
                if left <= 0 or not self._wait_readable(left):
                    raise LinkError(f"no response within {self.timeout_s * 1000:.0f} ms")
                data = self._recv()
                self._trace(False, data)
                buf += data
        except ModbusException as exc:
            raise LinkError(f"undecodable response: {exc}") from exc
        finally:
            self._buf = buf


class Repeated:
    """A register read sent again and again, the same but for the transaction id and at most
    one written register (the status poll fifty times a second, with the heartbeat on it)."""

    def __init__(self, request: Any, count: int) -> None:
        self.request, self.count = request, count  # a pymodbus request PDU (function 3 or 23)
        self.frame: bytearray | None = None  # a wire's own framing of it, where it keeps one


def registers_bytes(registers: Sequence[int]) -> bytes:
    return struct.pack(f">{len(registers)}H", *registers)


def registers_list(raw: bytes) -> list[int]:
    """The registers of big-endian register bytes (``registers_bytes`` the other way)."""
    return list(struct.unpack(f">{len(raw) // 2}H", raw))


class TcpWire(Wire):
    def __init__(self, host: str, port: int, unit_id: int, timeout_s: float, trace: Trace) -> None:
        super().__init__(unit_id, timeout_s, trace)
        self.host, self.port = host, port
        self._sock: socket.socket | None = None
        self._next_tid = 0
        self._socket_framer = FramerSocket(DecodePDU(False))

    def open(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # blocking: a read waits in the kernel, at most timeout_s (one system call, not two)
        sock.settimeout(None)
        seconds = int(self.timeout_s)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", seconds, int((self.timeout_s - seconds) * 1_000_000)))
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def abort(self) -> None:
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _framer(self) -> FramerSocket:
        return self._socket_framer

    def _tid(self) -> int:
        self._next_tid = self._next_tid % 0xFFFF + 1  # 1..65535: 0 would switch off the check
        return self._next_tid

    def transact_registers(self, request: ModbusPDU, count: int) -> bytes | ModbusPDU:
        deadline = time.monotonic() + self.timeout_s
        tid = self._send_request(request)
        return self._registers_answer(tid, request.function_code, count, deadline)

    def transact_repeated(self, repeated: Repeated, value: int | None = None) -> bytes | ModbusPDU:
        """As ``Wire.transact_repeated``, with the frame pymodbus built once: only the transaction
        id and the written register (the frame's last two bytes in Modbus TCP) are put in."""
        deadline = time.monotonic() + self.timeout_s
        frame = repeated.frame
        if frame is None:
            request = repeated.request
            request.dev_id, request.transaction_id = self.unit_id, 0
            if value is not None:
                request.write_registers = [0]
            frame = repeated.frame = bytearray(self._socket_framer.buildFrame(request))
        tid = self._tid()
        _U16.pack_into(frame, 0, tid)
        if value is not None:
            _U16.pack_into(frame, len(frame) - 2, value)
        self._send(frame)
        self._trace(True, bytes(frame))
        return self._registers_answer(tid, repeated.request.function_code, count=repeated.count, deadline=deadline)

    def _registers_answer(self, tid: int, function_code: int, count: int, deadline: float) -> bytes | ModbusPDU:
        """The answer to a register read almost always arrives as one segment holding exactly the
        expected frame: its header is checked field by field (transaction id, protocol 0, length,
        unit, function, byte count) and the registers are taken as they are, without building a
        response PDU. Anything else — a split or merged segment, an exception response, another
        transaction's answer — goes through pymodbus's framer as every other response does."""
        if not self._buf:
            data = self._recv()  # blocks up to timeout_s (SO_RCVTIMEO)
            self._trace(False, data)
            size = 2 * count
            if (len(data) == 9 + size and data[7] == function_code and data[8] == size
                    and data[6] == self.unit_id and data[:6] == _mbap(tid, size + 3)):
                return data[9:]  # the whole segment is the answer: nothing is left over
            self._buf = data
        response = self._receive(tid, deadline)
        return response if response.isError() else registers_bytes(response.registers)

    def _sock_or_fail(self) -> socket.socket:
        if self._sock is None:
            raise LinkError("not connected")
        return self._sock

    def _send(self, data: bytes | bytearray) -> None:
        try:
            self._sock_or_fail().sendall(data)
        except OSError as exc:
            raise LinkError(f"send failed: {exc}") from exc

    def _wait_readable(self, timeout_s: float) -> bool:
        return bool(select.select([self._sock_or_fail()], [], [], timeout_s)[0])

    def _recv(self) -> bytes:
        try:
            data = self._sock_or_fail().recv(1024)
        except BlockingIOError as exc:  # SO_RCVTIMEO ran out
            raise LinkError(f"no response within {self.timeout_s * 1000:.0f} ms") from exc
        except OSError as exc:
            raise LinkError(f"receive failed: {exc}") from exc
        if not data:
            raise LinkError("connection closed by the controller")
        return data


_U16 = struct.Struct(">H")


def _mbap(tid: int, length: int) -> bytes:
    """MBAP header of a response: transaction id, protocol 0, length (unit + PDU)."""
    return struct.pack(">HHH", tid, 0, length)


class RtuWire(Wire):
    """Modbus RTU: a request after at least 3.5 character times of silence (the frame gap), the
    input drained first (nothing that came before a request can answer it)."""

    def __init__(self, device: str, line: SerialLine, unit_id: int, timeout_s: float, trace: Trace) -> None:
        super().__init__(unit_id, timeout_s, trace)
        self.device, self.line = device, line
        self._port: serial.Serial | None = None
        self._rtu_framer = FramerRTU(DecodePDU(False))
        bits = 1 + line.bytesize + (0 if line.parity == "N" else 1) + line.stopbits
        # 3.5 characters, and at least 1.75 ms above 19200 baud (Modbus over serial line, 2.5.1.1)
        self.frame_gap_s = max(3.5 * bits / line.baudrate, 0.00175)
        self._quiet_since = 0.0

    def open(self) -> None:
        try:
            self._port = serial.Serial(
                self.device, baudrate=self.line.baudrate, bytesize=self.line.bytesize,
                parity=self.line.parity, stopbits=self.line.stopbits, timeout=0,
            )
        except (serial.SerialException, ValueError) as exc:
            raise OSError(str(exc)) from exc
        self._quiet_since = time.monotonic()

    def close(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None

    def abort(self) -> None:
        """Nothing to interrupt safely: a read waits in ``select`` at most ``timeout_s`` (closing
        the descriptor under it from another thread could hand the number to a new file)."""

    def _framer(self) -> FramerRTU:
        return self._rtu_framer

    def _port_or_fail(self) -> serial.Serial:
        if self._port is None:
            raise LinkError("not connected")
        return self._port

    def _send(self, data: bytes | bytearray) -> None:
        port = self._port_or_fail()
        if (wait := self._quiet_since + self.frame_gap_s - time.monotonic()) > 0:
            time.sleep(wait)
        try:
            port.reset_input_buffer()
            self._buf = b""
            port.write(data)
        except (OSError, serial.SerialException) as exc:
            raise LinkError(f"write failed: {exc}") from exc

    def _wait_readable(self, timeout_s: float) -> bool:
        return bool(select.select([self._port_or_fail().fileno()], [], [], timeout_s)[0])

    def _recv(self) -> bytes:
        try:
            data = os.read(self._port_or_fail().fileno(), 512)
        except OSError as exc:
            raise LinkError(f"read failed: {exc}") from exc
        if not data:
            raise LinkError("serial port closed")
        self._quiet_since = time.monotonic()
        return data
