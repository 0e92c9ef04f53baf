"""The simulated line controller: the PLC side of the contract, as a pymodbus server.

``ControllerModel`` is the PLC program: it owns the register image and applies the contract's
rules (docs/controller-contract.md) — capture the encoder at each trigger into the trigger ring,
accept or refuse lane commands by encoder position, trip the agent watchdog when the heartbeat
stops, fire the gate at the decision point only for an accepted command, and write what the
lane photo-eyes saw into the result ring. Lanes have capacities that fill and drain (LANE_FULL_BITS);
from contract 1.3 a full lane defaults only the parcels commanded to it, and the recirculation lane
gives RECIRCULATED (the harness brings the parcel back to the scan point with its PREV_SEQ). Time
is injected (``clock``) so tests can drive it.

``serve_tcp`` / ``serve_rtu`` put the model behind pymodbus's SimDevice: on every request the
``action`` hook copies the model's registers out (reads) or hands the written values to the model
(writes), which refuses writes outside the agent-owned areas with ILLEGAL_ADDRESS, as a PLC would.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from firmware_bridge import contract as c

WRITABLE = set(range(c.AGENT_BASE, c.AGENT_BASE + c.AGENT_LEN)) | set(
    range(c.MAILBOX_BASE, c.MAILBOX_BASE + c.MAILBOX_LEN)
)


@dataclass
class Tracked:
    """A parcel the controller is tracking from trigger to lane photo-eye."""

    seq: int
    encoder: int
    length_mm: int
    t_trigger: float
    during_watchdog: bool
    cmd_lane: int = 0
    t_cmd: float | None = None  # first command received for this seq (any ack)
    t_cmd_accepted: float | None = None
    t_seen: float | None = None  # the first status read that showed the agent its trigger
    decided: bool = False
    steered_lane: int = 0
    lane_reached: int = 0
    disposition: int = 0


@dataclass
class ControllerParams:
    speed_mps: float = 3.0
    counts_per_metre: int = 1000
    decision_distance_m: float = 1.5
    exit_distance_m: float = 0.6
    watchdog_ms: int = 500
    gate_for_lane: dict[int, int] = field(default_factory=lambda: {2: 1})  # lane -> gate
    default_lane: int = 1
    lane_count: int = 2
    firmware: tuple[int, int, int] = (1, 0, 0)
    contract_major: int = c.CONTRACT_MAJOR
    fc23: bool = True  # implements function 23 (read/write multiple registers), optional since 1.2
    newest_trigger: bool = True  # mirrors the newest trigger entry at 36..39, optional since 1.2
    contract_minor: int = c.CONTRACT_MINOR  # below 3: a full lane defaults every parcel (1.0-1.2)
    # lane physics: lane -> (capacity in parcels, parcels emptied per second); a lane at capacity
    # is full (its LANE_FULL_BITS bit) until it has drained to 80 % of it
    lane_capacity: dict[int, tuple[int, float]] = field(default_factory=dict)
    recirculation_lane: int | None = None  # 1.3: a parcel steered here comes back (RECIRCULATED)
    # a read answers this long after the registers were taken (when the request came in): a busy
    # network or a controller that answers late; the answer's values are those of the request
    answer_delay_ms: float = 0.0


class ControllerModel:
    def __init__(self, params: ControllerParams, clock: Callable[[], float] = time.monotonic) -> None:
        self.p = params
        self.clock = clock
        ident = c.Identity(
            magic=c.MAGIC,
            contract_major=params.contract_major,
            contract_minor=params.contract_minor,
            firmware=params.firmware,
            counts_per_metre=params.counts_per_metre,
            gate_count=len(params.gate_for_lane),
            lane_count=params.lane_count,
            watchdog_ms=params.watchdog_ms,
            trigger_ring_len=c.TRIGGER_RING_LEN,
            result_ring_len=c.RESULT_RING_LEN,
            decision_distance_counts=round(params.decision_distance_m * params.counts_per_metre),
            default_lane=params.default_lane,
        )
        self.identity = ident
        self.max_hb_gap_s = 0.0  # the longest time between two agent heartbeats (watchdog not tripped)
        self.gate_fires: list[tuple[float, int]] = []  # maintenance fires (t, gate)
        self.faults: set[str] = set()  # e.g. {"gate_stuck"}
        self.on_command: Callable[[Tracked, c.AckCode], None] | None = None
        # far-side faults: a halted program (Modbus still answers, frozen registers), exception
        # answers, answers that come too late
        self.halted = False
        self.answer: str = "normal"  # "normal" | "exception" | "slow"
        self.slow_s = 0.0
        self.boot = 0
        self.fill: dict[int, float] = dict.fromkeys(params.lane_capacity, 0.0)  # parcels in each lane
        self.full_bits = 0
        self.lane_full_events = 0  # a lane became full
        self._drained_at = clock()
        self.power_up()

    def power_up(self) -> list[Tracked]:
        """The documented power-up state (docs/controller-contract.md, 4.6): registers 0 but the
        identity and a new CTRL_BOOT, heads 0 and sequences from 1, the mailbox and the agent area
        0, WATCHDOG_TRIPPED set, the encoder from 0, tracking empty. Returns the parcels it forgot."""
        forgotten = list(self.tracked.values()) if hasattr(self, "tracked") else []
        self.t0 = self.clock()
        self.regs = [0] * (c.LAST_ADDRESS + 1)
        self.regs[c.ID_BASE : c.ID_BASE + c.ID_LEN] = self.identity.encode()
        self.boot = c.next_seq(self.boot or random.randrange(1, 0xFFFF))
        self.status = c.StatusBit.BELT_RUNNING | c.StatusBit.WATCHDOG_TRIPPED  # no agent yet
        self.tracked: dict[int, Tracked] = {}
        self.trigger_seq = 0
        self._shown_head = 0  # the highest trigger head a read has returned
        self.result_seq = 0
        self._last_hb_value = 0  # the register's power-on value; the agent starts at 1
        self._last_hb_change = self.clock()
        self._last_cmd_counter = 0
        self.watchdog_trips = 0
        self.defaulted = 0
        self.halted = False
        self.answer = "normal"
        self._write_status(self.clock())
        return forgotten

    # --- physics ------------------------------------------------------------------------
    def encoder_at(self, t: float) -> int:
        return int((t - self.t0) * self.p.speed_mps * self.p.counts_per_metre) & 0xFFFFFFFF

    def decision_delay_s(self) -> float:
        return self.p.decision_distance_m / self.p.speed_mps

    def exit_delay_s(self) -> float:
        return (self.p.decision_distance_m + self.p.exit_distance_m) / self.p.speed_mps

    # --- controller cycle ---------------------------------------------------------------
    def tick(self) -> None:
        """One scan cycle: heartbeat, watchdog, status registers."""
        if self.halted:
            return  # the program does not run: every register keeps its last value
        now = self.clock()
        self._drain(now)
        hb = self.regs[c.REG_AGENT_HEARTBEAT]
        if hb != self._last_hb_value:
            # any change is a heartbeat; it clears a trip (parcels triggered while tripped
            # keep going to the default lane: see Tracked.during_watchdog)
            if not self.status & c.StatusBit.WATCHDOG_TRIPPED:  # gaps while an agent runs
                self.max_hb_gap_s = max(self.max_hb_gap_s, now - self._last_hb_change)
            self._last_hb_value = hb
            self._last_hb_change = now
            self.status &= ~c.StatusBit.WATCHDOG_TRIPPED
        elif (now - self._last_hb_change) * 1000 > self.p.watchdog_ms:
            if not self.status & c.StatusBit.WATCHDOG_TRIPPED:
                self.watchdog_trips += 1
            self.status |= c.StatusBit.WATCHDOG_TRIPPED
        mode = self.regs[c.REG_MODE_REQUEST]
        if mode == c.ModeRequest.MAINTENANCE:
            self.status |= c.StatusBit.MAINTENANCE
        else:
            self.status &= ~c.StatusBit.MAINTENANCE
        gate = self.regs[c.REG_MAINT_FIRE_GATE]
        if gate:
            if self.status & c.StatusBit.MAINTENANCE and 1 <= gate <= len(self.p.gate_for_lane):
                self.gate_fires.append((now, gate))
            self.regs[c.REG_MAINT_FIRE_GATE] = 0
        self._write_status(now)

    def _drain(self, now: float) -> None:
        """Lanes empty at their rate; LANE_FULL_BITS and LANE_FULL follow (with hysteresis)."""
        dt, self._drained_at = now - self._drained_at, now
        bits = self.full_bits
        for lane, (capacity, drain) in self.p.lane_capacity.items():
            self.fill[lane] = max(0.0, self.fill[lane] - drain * dt)
            bit = 1 << (lane - 1)
            if self.fill[lane] >= capacity and not bits & bit:
                bits |= bit
                self.lane_full_events += 1
            elif self.fill[lane] <= 0.8 * capacity:
                bits &= ~bit
        self.full_bits = bits
        if bits:
            self.status |= c.StatusBit.LANE_FULL
        else:
            self.status &= ~c.StatusBit.LANE_FULL

    def _write_status(self, now: float) -> None:
        r = self.regs
        r[c.REG_LANE_FULL_BITS] = self.full_bits
        r[c.REG_CTRL_HEARTBEAT] = int((now - self.t0) * 10) & 0xFFFF
        r[c.REG_STATUS_BITS] = int(self.status)
        r[c.REG_ENCODER : c.REG_ENCODER + 2] = c.split_u32(self.encoder_at(now))
        r[c.REG_TRIGGER_HEAD] = self.trigger_seq
        r[c.REG_RESULT_HEAD] = self.result_seq
        r[c.REG_WATCHDOG_TRIPS] = self.watchdog_trips & 0xFFFF
        r[c.REG_DEFAULTED_COUNT] = self.defaulted & 0xFFFF
        r[c.REG_CTRL_BOOT] = self.boot

    def set_fault_bits(self, bits: c.StatusBit, on: bool) -> None:
        self.status = (self.status | bits) if on else (self.status & ~bits)
        self._write_status(self.clock())

    # --- photo-eye at the scan point ----------------------------------------------------
    def trigger(self, length_mm: int, prev_seq: int = 0) -> Tracked | None:
        """The scan-point photo-eye: track the parcel (None: the program is not running, and the
        parcel, never tracked, takes the default lane through the unpowered gates)."""
        if self.halted:
            return None
        now = self.clock()
        self.tick()
        self.trigger_seq = c.next_seq(self.trigger_seq)
        entry = c.TriggerEntry(self.trigger_seq, self.encoder_at(now), length_mm)
        slot = c.TriggerEntry.slot(entry.seq)
        self.regs[c.PREV_SEQ_BASE + entry.seq % c.TRIGGER_RING_LEN] = prev_seq  # 1.3, before the entry's SEQ
        self.regs[slot : slot + c.TRIGGER_ENTRY_LEN] = entry.encode()
        tracked = Tracked(
            entry.seq, entry.encoder, length_mm, now,
            during_watchdog=bool(self.status & c.StatusBit.WATCHDOG_TRIPPED),
        )
        self.tracked[entry.seq] = tracked
        if self.p.newest_trigger:  # contract 1.2, optional: the same entry inside the status block
            self.regs[c.REG_NEWEST_PREV_SEQ] = prev_seq
            self.regs[c.NEWEST_TRIGGER_BASE : c.NEWEST_TRIGGER_BASE + c.TRIGGER_ENTRY_LEN] = entry.encode()
        self.regs[c.REG_TRIGGER_HEAD] = self.trigger_seq
        return tracked

    # --- mailbox ------------------------------------------------------------------------
    def on_write(self, address: int, values: list[int]) -> ExcCodes | None:
        span = range(address, address + len(values))
        if any(a not in WRITABLE for a in span):
            return ExcCodes.ILLEGAL_ADDRESS  # refused whole: nothing of the request is written
        if c.REG_MODE_REQUEST in span and values[c.REG_MODE_REQUEST - address] not in (0, 1):
            return ExcCodes.ILLEGAL_VALUE
        for a, v in zip(span, values, strict=True):
            self.regs[a] = v & 0xFFFF
        if c.REG_AGENT_HEARTBEAT in span or c.REG_MODE_REQUEST in span or c.REG_MAINT_FIRE_GATE in span:
            self.tick()
        if c.REG_CMD_COUNTER in span and not self.halted:
            self._mailbox()
        return None

    def _mailbox(self) -> None:
        counter = self.regs[c.REG_CMD_COUNTER]
        if counter == self._last_cmd_counter or counter == 0:
            return
        self._last_cmd_counter = counter
        now = self.clock()
        self.tick()
        seq, lane = self.regs[c.REG_CMD_SEQ], self.regs[c.REG_CMD_LANE]
        tracked = self.tracked.get(seq)
        if tracked is None:
            ack = c.AckCode.UNKNOWN_SEQ
        else:
            if tracked.t_cmd is None:
                tracked.t_cmd = now
            travelled = c.encoder_delta(tracked.encoder, self.encoder_at(now))
            if tracked.decided or travelled >= self.identity.decision_distance_counts:
                ack = c.AckCode.LATE
            elif self.status & c.StatusBit.MAINTENANCE:
                ack = c.AckCode.MAINTENANCE
            elif self.status & c.StatusBit.WATCHDOG_TRIPPED or tracked.during_watchdog:
                ack = c.AckCode.WATCHDOG
            elif not 1 <= lane <= self.p.lane_count:
                ack = c.AckCode.BAD_LANE
            else:
                ack = c.AckCode.ACCEPTED
                tracked.cmd_lane = lane
                tracked.t_cmd_accepted = now
        self.regs[c.REG_ACK_COUNTER] = counter
        self.regs[c.REG_ACK_SEQ] = seq
        self.regs[c.REG_ACK_CODE] = int(ack)
        if tracked is not None and self.on_command:
            self.on_command(tracked, ack)

    # --- decision point and lane photo-eyes ---------------------------------------------
    def halt(self, halted: bool) -> None:
        """The program stops (registers freeze, nothing is tracked or steered) or runs again;
        running again, its watchdog timer starts afresh, as a PLC's timers do."""
        self.halted = halted
        if not halted:
            self._last_hb_change = self.clock()
            self._last_hb_value = self.regs[c.REG_AGENT_HEARTBEAT]

    def _forget(self, t: Tracked) -> None:
        """A halted program missed this parcel's moment: once it runs again it cannot know where
        the parcel is, so it stops tracking it (no result will come for it)."""
        if self.tracked.get(t.seq) is t:
            del self.tracked[t.seq]

    def _shown(self, head: int) -> None:
        """A read returned TRIGGER_HEAD = ``head``: the triggers up to it are now visible to the
        agent (for ``trigger_seen_ms``, measured on this side of the wire)."""
        if head == self._shown_head:
            return
        now = self.clock()
        seq = self._shown_head
        while seq != head:
            seq = c.next_seq(seq)
            t = self.tracked.get(seq)
            if t is not None and t.t_seen is None:
                t.t_seen = now
        self._shown_head = head

    def knows(self, t: Tracked) -> bool:
        """Still tracked (a restart forgets every parcel; a halted program steers none)."""
        return not self.halted and self.tracked.get(t.seq) is t

    def decision_point(self, t: Tracked) -> Tracked:
        """The parcel reaches the gates: steer it. Returns the tracked parcel."""
        if not self.knows(t):  # forgotten: no gate fires for it, it takes the default lane
            self._forget(t)
            if not t.decided:
                t.lane_reached = self.p.default_lane
            return t
        self.tick()
        t.decided = True
        per_lane = self.p.contract_minor >= c.PER_LANE_FULL_MINOR
        faults = c.StatusBit.ESTOP | c.StatusBit.JAM | c.StatusBit.MAINTENANCE | c.StatusBit.FAULT
        if not per_lane or self.full_bits >> (self.p.default_lane - 1) & 1:
            faults |= c.StatusBit.LANE_FULL  # 1.0-1.2, or the default lane itself full: the whole line
        if t.during_watchdog or self.status & c.StatusBit.WATCHDOG_TRIPPED:
            t.steered_lane, t.disposition = self.p.default_lane, c.Disposition.DEFAULTED_WATCHDOG
        elif self.status & faults:
            t.steered_lane, t.disposition = self.p.default_lane, c.Disposition.DEFAULTED_FAULT
        elif not t.cmd_lane:
            t.steered_lane, t.disposition = self.p.default_lane, c.Disposition.DEFAULTED_NO_COMMAND
        elif self.full_bits >> (t.cmd_lane - 1) & 1:  # 1.3: its lane filled after the command
            t.steered_lane, t.disposition = self.p.default_lane, c.Disposition.DEFAULTED_FAULT
        else:
            t.steered_lane, t.disposition = t.cmd_lane, c.Disposition.SORTED
        if t.disposition != c.Disposition.SORTED:
            self.defaulted += 1
        gate = self.p.gate_for_lane.get(t.steered_lane)
        # physics: the parcel goes where the fired gate (or no gate) sends it
        if gate is not None and "gate_stuck" in self.faults:
            t.lane_reached = self.p.default_lane
        else:
            t.lane_reached = t.steered_lane
        return t

    def lane_exit(self, t: Tracked) -> c.ResultEntry | None:
        """The lane photo-eye sees the parcel: write the result ring (None: a parcel the
        controller forgot gets no result)."""
        if not self.knows(t):
            self._forget(t)
            return None
        self.tick()
        seq = t.seq
        del self.tracked[seq]
        disposition = t.disposition
        if t.lane_reached in self.fill:
            self.fill[t.lane_reached] += 1
            self._drain(self.clock())
        if disposition == c.Disposition.SORTED and t.steered_lane == self.p.recirculation_lane:
            disposition = c.Disposition.RECIRCULATED
        if t.lane_reached != t.steered_lane:
            disposition = c.Disposition.MISSORTED
        if "lost" in self.faults:
            t.lane_reached, disposition = 0, c.Disposition.LOST
        t.disposition = disposition
        self.result_seq = c.next_seq(self.result_seq)
        entry = c.ResultEntry(
            self.result_seq, seq, t.encoder, t.cmd_lane, t.lane_reached, int(disposition)
        )
        slot = c.ResultEntry.slot(entry.rseq)
        self.regs[slot : slot + c.RESULT_ENTRY_LEN] = entry.encode()
        self.regs[c.REG_RESULT_HEAD] = self.result_seq
        return entry

    # --- Modbus glue --------------------------------------------------------------------
    def sim_device(self, unit_id: int = 1) -> SimDevice:
        async def action(
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            current: list[int],
            set_values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            if self.answer == "exception":
                return ExcCodes.DEVICE_FAILURE
            if function_code == 23 and not self.p.fc23:
                return ExcCodes.ILLEGAL_FUNCTION
            if self.answer == "slow":
                await asyncio.sleep(self.slow_s)
            if set_values is not None:
                return self.on_write(address, [int(v) for v in set_values])
            self.tick()
            off = address - start_address
            current[off : off + count] = self.regs[address : address + count]
            if address <= c.REG_TRIGGER_HEAD < address + count:
                self._shown(self.regs[c.REG_TRIGGER_HEAD])
            if self.p.answer_delay_ms:
                await asyncio.sleep(self.p.answer_delay_ms / 1000)
            return None

        return SimDevice(
            id=unit_id,
            simdata=[SimData(0, count=c.LAST_ADDRESS + 1, values=0, datatype=DataType.REGISTERS)],
            action=action,
        )


async def serve_tcp(
    model: ControllerModel, host: str = "127.0.0.1", port: int = 0, unit_id: int = 1
) -> tuple[ModbusTcpServer, int]:
    """Start a Modbus TCP server for ``model``; returns (server, bound port)."""
    server = ModbusTcpServer(model.sim_device(unit_id), address=(host, port))
    await server.listen()
    bound = server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return server, bound


async def serve_rtu(
    model: ControllerModel, device: str, baudrate: int = 19200, parity: str = "E", unit_id: int = 1
) -> ModbusSerialServer:
    server = ModbusSerialServer(
        model.sim_device(unit_id), framer=FramerType.RTU, port=device, baudrate=baudrate,
        parity=parity, bytesize=8, stopbits=1,
    )
    await server.listen()
    return server


async def run_cycle(model: ControllerModel, period_s: float = 0.01) -> None:
    """The PLC scan cycle: tick the model forever (cancel to stop)."""
    while True:
        model.tick()
        await asyncio.sleep(period_s)
