"""The agent's Modbus transport to the line controller (TCP or RTU, pymodbus frames).

One ``ControllerLink`` owns one connection, and one I/O thread owns its wire
(``firmware_bridge.wire``): every request from the event loop is handed to that thread and its
answer comes back as a future, so the poll, the heartbeat and lane commands never interleave on the
wire (a Modbus link carries one transaction at a time; RTU also needs its frame gap and the
configured inter-frame gap). Between requests the thread runs the status poll itself
(``firmware_bridge.poller``) and wakes the event loop only for a poll it has a use for: an idle
belt costs a thread wake-up fifty times a second, not an event-loop turn and an asyncio
transaction (docs/performance.md).

At connect the link reads the identity block and refuses a controller whose contract version it
does not speak (``ContractMismatch``) — the same rule as Klipper's host reading the MCU's
dictionary. Reconnecting is the caller's job (``agent.service.controller``), so that a mismatch is never
retried and a lost link is visible as state, not hidden in a library.

Function 23 (read/write multiple registers) is optional for a controller (contract 1.2): the link
tries it for the heartbeat with the status poll, and for a lane command with its acknowledgement,
and falls back to separate writes and reads for the rest of the connection if the controller
answers exception 01.

A flight recorder keeps the last frames on the wire; ``dump_frames()`` gives them to the log when
something fails.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadWriteMultipleRegistersRequest,
    WriteMultipleRegistersRequest,
)

from firmware_bridge import contract as c
from firmware_bridge.errors import ContractMismatch, FunctionUnsupported, LinkError
from firmware_bridge.poller import Poll, Poller
from firmware_bridge.serial_line import SerialLine
from firmware_bridge.wire import Repeated, RtuWire, TcpWire, Wire, registers_list

__all__ = ["ControllerLink", "LinkSettings"]

ILLEGAL_FUNCTION = 0x01  # Modbus exception code: the function is not implemented

_STOP, _WAKE, _SOON = object(), object(), object()  # I/O thread signals


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """Connection settings for one controller link (one dataclass, after pymodbus)."""

    transport: str = "tcp"  # "tcp" | "rtu"
    host: str | None = "127.0.0.1"
    port: int = 502
    device: str | None = None
    serial: SerialLine = SerialLine(19200, 8, "E", 1)  # transport = "rtu"
    unit_id: int = 1
    timeout_s: float = 0.25
    inter_frame_gap_s: float = 0.0

    def describe(self) -> str:
        if self.transport == "tcp":
            return f"modbus-tcp://{self.host}:{self.port}/unit{self.unit_id}"
        s = self.serial
        return f"modbus-rtu://{self.device}@{s.baudrate}{s.parity}{s.stopbits}/unit{self.unit_id}"


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class _IoThread(threading.Thread):
    """Runs the link's requests one at a time, and the status poll between them."""

    def __init__(self, link: ControllerLink, wire: Wire, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(name="controller-io", daemon=True)
        self.link, self.wire, self.loop = link, wire, loop
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.poller: Poller | None = None
        self._on_poll: Callable[[Poll | Exception], object] | None = None
        self.stopping = False
        self.asked_at = 0.0  # the last poll_at (event loop side)
        # the idle poll's two requests, framed once for this connection
        self.status_poll = Repeated(ReadHoldingRegistersRequest(address=c.POLL_BASE, count=c.POLL_LEN), c.POLL_LEN)
        self.heartbeat_poll = Repeated(ReadWriteMultipleRegistersRequest(
            read_address=c.POLL_BASE, read_count=c.POLL_LEN, write_address=c.REG_AGENT_HEARTBEAT, write_registers=[0],
        ), c.POLL_LEN)

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        fut = self.loop.create_future()
        self.jobs.put((fn, args, fut))
        return fut

    def to_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    def start_polling(self, poller: Poller, on_poll: Callable[[Poll | Exception], object]) -> None:
        self._on_poll = on_poll
        poller.deliver = lambda poll: self.to_loop(on_poll, poll)
        self.poller = poller
        self.jobs.put(_WAKE)

    def stop(self) -> None:
        self.stopping = True
        self.jobs.put(_STOP)
        self.wire.abort()

    def run(self) -> None:
        try:
            while not self.stopping:
                poller = self.poller
                timeout = None if poller is None else max(poller.next_at - time.monotonic(), 0.0)
                try:
                    job = self.jobs.get(timeout=timeout)
                except queue.Empty:
                    job = None
                if job is _STOP:
                    break
                if job is None or job is _WAKE:
                    pass
                elif job[0] is _SOON:
                    if poller is not None:
                        poller.want(job[1])
                else:
                    fn, args, fut = job
                    try:
                        result, error = fn(*args), None
                    except Exception as exc:  # noqa: BLE001 - the caller gets it, as from a plain call
                        result, error = None, exc
                    self.to_loop(_settle, fut, result, error)
                    continue
                if poller is not None and time.monotonic() >= poller.next_at:
                    self._poll(poller)
        finally:
            self.wire.close()
            while True:  # whoever still waits learns that the link is gone
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if isinstance(job, tuple) and len(job) == 3:
                    self.to_loop(_settle, job[2], None, LinkError(f"{self.link.settings.describe()}: link closed"))

    def _poll(self, poller: Poller) -> None:
        sent = time.monotonic()
        try:
            if poller.wants_heartbeat(sent, self.link.fc23):
                raw = self.link.t_heartbeat_poll_raw(poller.next_heartbeat(sent))
            else:
                raw = self.link.t_poll_raw()
            poller.turn(raw, sent, time.monotonic())
        except Exception as exc:  # noqa: BLE001 - handed to the loop, which ends the session with it
            # a LinkError: the loop closes the link and connects again; anything else is a fault
            # of this program, and ends the controller task (and the agent) as it would in the loop
            self.poller = None
            if self._on_poll is not None:
                self.to_loop(self._on_poll, exc)


class ControllerLink:
    def __init__(self, settings: LinkSettings, recorder_frames: int = 64) -> None:
        self.settings = settings
        self._mailbox = asyncio.Lock()  # one lane command at a time, with its acknowledgement
        self._frames: deque[tuple[float, bool, bytes]] = deque(maxlen=recorder_frames)
        self._io: _IoThread | None = None
        self.identity: c.Identity | None = None
        self.requests = 0
        self.fc23: bool | None = None  # function 23 answered (True), refused (False), not yet tried

    # --- flight recorder ----------------------------------------------------------------
    def _trace(self, sending: bool, data: bytes) -> None:
        self._frames.append((time.monotonic(), sending, data))  # formatted only when dumped

    def dump_frames(self) -> list[str]:
        now = time.monotonic()
        return [f"{t - now:+.3f}s {'tx' if tx else 'rx'} {data.hex(' ')}" for t, tx, data in list(self._frames)]

    # --- connection ---------------------------------------------------------------------
    def _make_wire(self) -> Wire:
        s = self.settings
        if s.transport == "tcp":
            return TcpWire(s.host or "127.0.0.1", s.port, s.unit_id, s.timeout_s, self._trace)
        return RtuWire(s.device or "", s.serial, s.unit_id, s.timeout_s, self._trace)

    async def connect(self) -> c.Identity:
        """Connect and check the identity block. Raises LinkError or ContractMismatch."""
        self.close()
        io = _IoThread(self, self._make_wire(), asyncio.get_running_loop())
        io.start()
        self._io = io
        self.fc23 = None  # a new connection may be a new controller
        try:
            await io.call(self._t_open)
        except LinkError:
            self.close()
            raise
        regs = await self.read(c.ID_BASE, c.ID_LEN)
        identity = c.Identity.decode(regs)
        problems = identity.problems()
        if problems:
            self.close()
            raise ContractMismatch(f"{self.settings.describe()}: " + "; ".join(problems))
        self.identity = identity
        return identity

    def _t_open(self) -> None:
        io = self._io_thread()
        try:
            io.wire.open()
        except OSError as exc:
            raise LinkError(f"{self.settings.describe()}: cannot connect: {exc}") from exc

    def close(self) -> None:
        if self._io is not None:
            self._io.stop()
            self._io = None

    @property
    def connected(self) -> bool:
        return self._io is not None and self._io.is_alive() and not self._io.stopping

    # --- the status poll on the I/O thread ----------------------------------------------
    def start_polling(self, poller: Poller, on_poll: Callable[[Poll | Exception], object]) -> None:
        """Poll on the I/O thread until the link closes or a poll fails; ``on_poll`` is called
        on the event loop with each poll the loop has a use for, or once with the error that
        ended the polling (a LinkError when the link failed)."""
        self._require().start_polling(poller, on_poll)

    def poll_at(self, at: float) -> None:
        """An input waits to learn which triggers exist: the first poll sent at or after ``at``
        (monotonic) is handed over; it is sent then (or as soon as ``min_gap_s`` allows) if the
        regular poll would come later."""
        io = self._io
        if io is not None and at != io.asked_at:  # the same poll is asked for again and again
            io.asked_at = at
            io.jobs.put((_SOON, at))

    # --- requests -----------------------------------------------------------------------
    def _require(self) -> _IoThread:
        if self._io is None or self._io.stopping:
            raise LinkError(f"{self.settings.describe()}: not connected")
        return self._io

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._require().call(fn, *args)

    @staticmethod
    def _io_thread() -> _IoThread:
        io = threading.current_thread()
        if not isinstance(io, _IoThread):
            raise RuntimeError("Modbus requests run on the link's I/O thread")
        return io

    def _t_transact(
        self, what: str, request: ModbusPDU | Repeated, count: int | None = None, value: int | None = None,
    ) -> Any:
        """I/O thread: one request; any failure becomes a LinkError. ``count``: a register read,
        whose registers come back as big-endian bytes (as for a ``Repeated`` request)."""
        io = self._io_thread()
        try:
            if isinstance(request, Repeated):
                count = request.count
                rr = io.wire.transact_repeated(request, value)
            elif count is None:
                rr = io.wire.transact(request)
            else:
                rr = io.wire.transact_registers(request, count)
        except LinkError as exc:
            raise LinkError(f"{what}: {exc}") from exc
        finally:
            if self.settings.inter_frame_gap_s:
                time.sleep(self.settings.inter_frame_gap_s)
        if isinstance(rr, bytes):
            if len(rr) != 2 * (count or 0):
                raise LinkError(f"{what}: {len(rr) // 2} registers in the response")
        elif rr.isError():
            if rr.exception_code == ILLEGAL_FUNCTION:
                raise FunctionUnsupported(f"{what}: exception response {rr}")
            raise LinkError(f"{what}: exception response {rr}")
        self.requests += 1
        return rr

    def _t_read_raw(self, address: int, count: int) -> bytes:
        request = ReadHoldingRegistersRequest(address=address, count=count)
        return self._t_transact(f"read {address}+{count}", request, count)  # type: ignore[no-any-return]

    def _t_read(self, address: int, count: int) -> list[int]:
        return registers_list(self._t_read_raw(address, count))

    def _t_write(self, address: int, values: Sequence[int]) -> None:
        regs = list(values)
        self._t_transact(f"write {address}={regs}", WriteMultipleRegistersRequest(address=address, registers=regs))

    def _t_read_write_raw(self, write_address: int, values: Sequence[int], read_address: int, count: int) -> bytes:
        regs = list(values)
        request = ReadWriteMultipleRegistersRequest(
            read_address=read_address, read_count=count, write_address=write_address, write_registers=regs,
        )
        return self._t_transact(f"write {write_address}={regs} + read {read_address}+{count}", request, count)  # type: ignore[no-any-return]

    def _t_read_write(self, write_address: int, values: Sequence[int], read_address: int, count: int) -> list[int]:
        return registers_list(self._t_read_write_raw(write_address, values, read_address, count))

    def _t_fc23(self, transact: Callable[[], bytes]) -> bytes | None:
        """A function-23 transaction where the controller implements it (the registers read, as
        bytes); None where it answers exception 01, and from then on without asking again (the
        caller writes and reads separately)."""
        if self.fc23 is False:
            return None
        try:
            raw = transact()
        except FunctionUnsupported:
            self.fc23 = False
            return None
        self.fc23 = True
        return raw

    def _t_combined(self, write_address: int, values: Sequence[int], read_address: int, count: int) -> bytes | None:
        return self._t_fc23(lambda: self._t_read_write_raw(write_address, values, read_address, count))

    def t_poll_raw(self) -> bytes:
        """The status block (POLL_BASE, POLL_LEN) as big-endian bytes."""
        return self._t_transact("status poll", self._io_thread().status_poll)  # type: ignore[no-any-return]

    def t_heartbeat_poll_raw(self, value: int) -> bytes:
        """Write the agent heartbeat, then read the status block: one function-23 transaction
        where the controller has it, else a write and a read."""
        request = self._io_thread().heartbeat_poll
        raw = self._t_fc23(lambda: self._t_transact("heartbeat + status poll", request, value=value & 0xFFFF))
        if raw is not None:
            return raw
        self._t_write(c.REG_AGENT_HEARTBEAT, [value & 0xFFFF])
        return self.t_poll_raw()

    def t_poll(self) -> c.Status:
        return c.Status.from_bytes(self.t_poll_raw())

    def t_heartbeat_poll(self, value: int) -> c.Status:
        return c.Status.from_bytes(self.t_heartbeat_poll_raw(value))

    async def read(self, address: int, count: int) -> list[int]:
        return await self._call(self._t_read, address, count)  # type: ignore[no-any-return]

    async def write(self, address: int, values: Sequence[int]) -> None:
        await self._call(self._t_write, address, values)

    async def read_write(self, write_address: int, values: Sequence[int], read_address: int, count: int) -> list[int]:
        """Function 23: write, then read, in one transaction (the controller writes first)."""
        return await self._call(self._t_read_write, write_address, values, read_address, count)  # type: ignore[no-any-return]

    async def _combined(
        self, write_address: int, values: Sequence[int], read_address: int, count: int
    ) -> list[int] | None:
        raw = await self._call(self._t_combined, write_address, values, read_address, count)
        return None if raw is None else registers_list(raw)

    # --- contract operations ------------------------------------------------------------
    async def poll(self) -> c.Status:
        return await self._call(self.t_poll)  # type: ignore[no-any-return]

    async def heartbeat_poll(self, value: int) -> c.Status:
        """Write the agent heartbeat and poll the status block: one function-23 transaction
        where the controller has it, else a write and a read. The status shows the new value."""
        return await self._call(self.t_heartbeat_poll, value)  # type: ignore[no-any-return]

    async def read_triggers(self, seqs: Sequence[int], prev: bool = False) -> dict[int, c.TriggerEntry]:
        """Read the trigger-ring slots of ``seqs``; returns slot contents keyed by slot seq.
        ``prev`` (contract 1.3, a line with a recirculation loop): each with its PREV_SEQ, read in
        the same request (from the first entry through the last one's PREV_SEQ, at most 80 registers)."""
        if not prev:
            return await self._read_ring(seqs, c.TriggerEntry)
        out: dict[int, c.TriggerEntry] = {}
        for address, count in c.slot_ranges(seqs, c.TRIGGER_RING_BASE, c.TRIGGER_ENTRY_LEN, c.TRIGGER_RING_LEN):
            first = (address - c.TRIGGER_RING_BASE) // c.TRIGGER_ENTRY_LEN
            last = first + count // c.TRIGGER_ENTRY_LEN - 1
            regs = await self.read(address, c.PREV_SEQ_BASE + last + 1 - address)
            for slot in range(first, last + 1):
                i = (slot - first) * c.TRIGGER_ENTRY_LEN
                entry = c.TriggerEntry.decode(regs, i, regs[c.PREV_SEQ_BASE + slot - address])
                out[entry.seq] = entry
        return {s: out[s] for s in seqs if s in out}

    def t_read_results(self, rseqs: Sequence[int]) -> dict[int, c.ResultEntry]:
        """I/O thread: ``read_results``."""
        return self._t_read_ring(rseqs, c.ResultEntry)

    async def _read_ring(self, seqs: Sequence[int], kind: Any) -> dict[int, Any]:
        return await self._call(self._t_read_ring, seqs, kind)  # type: ignore[no-any-return]

    def _t_read_ring(self, seqs: Sequence[int], kind: Any) -> dict[int, Any]:
        """Read only the slots needed, in as few requests as possible. Keyed by the seq asked
        for; an entry whose own sequence field differs is not yet (or no longer) that seq."""
        out: dict[int, Any] = {}
        for address, count in c.slot_ranges(seqs, kind.RING_BASE, kind.ENTRY_LEN, kind.RING_LEN):
            regs = self._t_read(address, count)
            for i in range(0, count, kind.ENTRY_LEN):
                entry = kind.decode(regs, i)
                out[entry.seq if kind is c.TriggerEntry else entry.rseq] = entry
        return {s: out[s] for s in seqs if s in out}

    async def heartbeat(self, value: int) -> None:
        await self.write(c.REG_AGENT_HEARTBEAT, [value & 0xFFFF])

    async def command(self, counter: int, seq: int, lane: int, ack_timeout_s: float) -> c.AckCode:
        """Write one lane command and wait for its acknowledgement.

        Returns the controller's AckCode, or AckCode.NONE if no acknowledgement arrived in time
        (the controller will then apply the default lane: safe). The mailbox holds one command:
        commands go through it one at a time, each with its acknowledgement, or a second command
        would overwrite the first's acknowledgement before it is read.
        """
        async with self._mailbox:
            # with function 23 the acknowledgement comes back at once from a controller that
            # takes the command while it answers; one that takes it in its next scan shows the
            # previous acknowledgement, and the reads below wait for the new one
            command = [counter, seq, lane]
            regs = await self._combined(c.MAILBOX_BASE, command, c.REG_ACK_COUNTER, 3)
            if regs is None:
                await self.write(c.MAILBOX_BASE, command)
            deadline = time.monotonic() + ack_timeout_s
            while True:
                if regs is None:
                    regs = await self.read(c.REG_ACK_COUNTER, 3)
                if regs[0] == counter and regs[1] == seq:
                    try:
                        return c.AckCode(regs[2])
                    except ValueError:
                        return c.AckCode.NONE
                if time.monotonic() >= deadline:
                    return c.AckCode.NONE
                regs = None
                await asyncio.sleep(0.002)

    async def request_mode(self, mode: c.ModeRequest) -> None:
        await self.write(c.REG_MODE_REQUEST, [int(mode)])

