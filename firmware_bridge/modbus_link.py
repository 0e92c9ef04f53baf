"""The agent's Modbus transport to the line controller (pymodbus, TCP or RTU).

One ``ControllerLink`` owns one connection. Every request goes through one asyncio lock (a Modbus
link carries one transaction at a time; RTU also needs the inter-frame gap from config), so the
poll loop, the heartbeat and lane commands never interleave on the wire.

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
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType

from firmware_bridge import contract as c
from firmware_bridge.errors import ContractMismatch, FunctionUnsupported, LinkError
from firmware_bridge.serial_line import SerialLine

__all__ = ["ControllerLink", "LinkSettings"]

ILLEGAL_FUNCTION = 0x01  # Modbus exception code: the function is not implemented


def _honour_cancel() -> None:
    """pymodbus awaits with ``asyncio.wait_for``, which on Python 3.11 can lose a cancellation that
    arrives with the response; the task's cancel request is still counted. Honour it, or a stopping
    agent would keep polling forever (a TaskGroup waits for every child)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


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


class ControllerLink:
    def __init__(self, settings: LinkSettings, recorder_frames: int = 64) -> None:
        self.settings = settings
        self._lock = asyncio.Lock()  # one transaction at a time on the link
        self._mailbox = asyncio.Lock()  # one lane command at a time, with its acknowledgement
        self._frames: deque[tuple[float, bool, bytes]] = deque(maxlen=recorder_frames)
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self.identity: c.Identity | None = None
        self.requests = 0
        self.fc23: bool | None = None  # function 23 answered (True), refused (False), not yet tried

    # --- flight recorder ----------------------------------------------------------------
    def _trace(self, sending: bool, data: bytes) -> bytes:
        self._frames.append((time.monotonic(), sending, data))  # formatted only when dumped
        return data

    def dump_frames(self) -> list[str]:
        now = time.monotonic()
        return [f"{t - now:+.3f}s {'tx' if tx else 'rx'} {data.hex(' ')}" for t, tx, data in self._frames]

    # --- connection ---------------------------------------------------------------------
    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        s = self.settings
        if s.transport == "tcp":
            return AsyncModbusTcpClient(
                s.host or "127.0.0.1",
                port=s.port,
                timeout=s.timeout_s,
                retries=0,
                reconnect_delay=0,
                trace_packet=self._trace,
            )
        return AsyncModbusSerialClient(
            s.device or "",
            framer=FramerType.RTU,
            baudrate=s.serial.baudrate,
            bytesize=s.serial.bytesize,
            parity=s.serial.parity,
            stopbits=s.serial.stopbits,
            timeout=s.timeout_s,
            retries=0,
            reconnect_delay=0,
            trace_packet=self._trace,
        )

    async def connect(self) -> c.Identity:
        """Connect and check the identity block. Raises LinkError or ContractMismatch."""
        self.close()
        client = self._make_client()
        try:
            ok = await client.connect()
        except (OSError, ModbusException) as exc:
            raise LinkError(f"{self.settings.describe()}: cannot connect: {exc}") from exc
        if not ok:
            client.close()
            raise LinkError(f"{self.settings.describe()}: cannot connect")
        self._client = client
        self.fc23 = None  # a new connection may be a new controller
        regs = await self.read(c.ID_BASE, c.ID_LEN)
        identity = c.Identity.decode(regs)
        problems = identity.problems()
        if problems:
            self.close()
            raise ContractMismatch(f"{self.settings.describe()}: " + "; ".join(problems))
        self.identity = identity
        return identity

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    # --- requests -----------------------------------------------------------------------
    async def _transact(self, what: str, request: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run one request under the link lock; any failure becomes a LinkError."""
        async with self._lock:
            client = self._require()
            try:
                rr = await request(client)
            except (TimeoutError, ModbusException, OSError) as exc:
                _honour_cancel()
                raise LinkError(f"{what}: {exc}") from exc
            finally:
                await self._gap()
            _honour_cancel()
            if rr.isError():
                if rr.exception_code == ILLEGAL_FUNCTION:
                    raise FunctionUnsupported(f"{what}: exception response {rr}")
                raise LinkError(f"{what}: exception response {rr}")
            self.requests += 1
            return rr

    async def read(self, address: int, count: int) -> list[int]:
        unit = self.settings.unit_id
        rr = await self._transact(
            f"read {address}+{count}",
            lambda cl: cl.read_holding_registers(address, count=count, device_id=unit),
        )
        return list(rr.registers)

    async def write(self, address: int, values: Sequence[int]) -> None:
        unit, regs = self.settings.unit_id, list(values)
        await self._transact(
            f"write {address}={regs}", lambda cl: cl.write_registers(address, regs, device_id=unit)
        )

    async def read_write(self, write_address: int, values: Sequence[int], read_address: int, count: int) -> list[int]:
        """Function 23: write, then read, in one transaction (the controller writes first)."""
        unit, regs = self.settings.unit_id, list(values)
        rr = await self._transact(
            f"write {write_address}={regs} + read {read_address}+{count}",
            lambda cl: cl.readwrite_registers(
                read_address=read_address, read_count=count, write_address=write_address,
                values=regs, device_id=unit,
            ),
        )
        return list(rr.registers)

    async def _combined(
        self, write_address: int, values: Sequence[int], read_address: int, count: int
    ) -> list[int] | None:
        """``read_write`` where the controller implements function 23; None where it does not
        (the caller then writes and reads separately)."""
        if self.fc23 is False:
            return None
        try:
            regs = await self.read_write(write_address, values, read_address, count)
        except FunctionUnsupported:
            self.fc23 = False
            return None
        self.fc23 = True
        return regs

    def _require(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        if self._client is None or not self._client.connected:
            raise LinkError(f"{self.settings.describe()}: not connected")
        return self._client

    async def _gap(self) -> None:
        if self.settings.inter_frame_gap_s:
            await asyncio.sleep(self.settings.inter_frame_gap_s)

    # --- contract operations ------------------------------------------------------------
    async def poll(self) -> c.Status:
        return c.Status.decode(await self.read(c.POLL_BASE, c.POLL_LEN))

    async def heartbeat_poll(self, value: int) -> c.Status:
        """Write the agent heartbeat and poll the status block: one function-23 transaction
        where the controller has it, else a write and a read. The status shows the new value."""
        regs = await self._combined(c.REG_AGENT_HEARTBEAT, [value & 0xFFFF], c.POLL_BASE, c.POLL_LEN)
        if regs is None:
            await self.heartbeat(value)
            return await self.poll()
        return c.Status.decode(regs)

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

    async def read_results(self, rseqs: Sequence[int]) -> dict[int, c.ResultEntry]:
        return await self._read_ring(rseqs, c.ResultEntry)

    async def _read_ring(self, seqs: Sequence[int], kind: Any) -> dict[int, Any]:
        """Read only the slots needed, in as few requests as possible. Keyed by the seq asked
        for; an entry whose own sequence field differs is not yet (or no longer) that seq."""
        out: dict[int, Any] = {}
        for address, count in c.slot_ranges(seqs, kind.RING_BASE, kind.ENTRY_LEN, kind.RING_LEN):
            regs = await self.read(address, count)
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

