"""The sortgate controller contract, version 1.3: register map and codec (no I/O).

Every register is a Modbus holding register (read with FC3, written with FC6/FC16), addressed
from 0 on the wire (``40001`` in 1-based PLC notation is address 0). 32-bit values take two
registers, high word first. Sequence numbers are u16 that wrap from 65535 to 1; 0 means
"empty". The full rules, with timing, are in ``docs/controller-contract.md``; keep both in step
(``tests/unit/test_contract.py`` pins the addresses to the document).

Areas::

    0..15     identity        controller-owned, read-only
    16..31    status          controller-owned, read-only
    32..35    agent area      agent-owned (heartbeat, mode request, maintenance gate fire)
    40..42    lane mailbox    agent-owned, written in one FC16 request: counter, seq, lane
    100..163  trigger ring    controller-owned, 16 entries x 4 registers
    164..179  previous pass   controller-owned (1.3): per trigger-ring slot, the SEQ of the same
                              parcel's previous pass round the recirculation loop (0: first pass)
    200..711  result ring     controller-owned, 64 entries x 8 registers
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

CONTRACT_MAJOR = 1
#: 1.1 adds CTRL_BOOT (28), a 1.0 controller reads 0 there; 1.2: optional function 23 and the
#: newest trigger (36..39); 1.3: a full lane defaults only the parcels commanded to it, the
#: recirculation loop (previous-pass SEQs, disposition RECIRCULATED)
CONTRACT_MINOR = 3
#: from this minor on, LANE_FULL is not a line problem (only the full lane's parcels default)
PER_LANE_FULL_MINOR = 3
MAGIC = 0x5347  # "SG"

# --- identity (read-only) ---------------------------------------------------------------
ID_BASE = 0
ID_LEN = 16
REG_MAGIC = 0
REG_CONTRACT_MAJOR = 1
REG_CONTRACT_MINOR = 2
REG_FW_MAJOR = 3
REG_FW_MINOR = 4
REG_FW_PATCH = 5
REG_COUNTS_PER_METRE = 6  # u32
REG_GATE_COUNT = 8
REG_LANE_COUNT = 9
REG_WATCHDOG_MS = 10
REG_TRIGGER_RING_LEN = 11
REG_RESULT_RING_LEN = 12
REG_DECISION_DISTANCE = 13  # u32, encoder counts from trigger to the decision point
REG_DEFAULT_LANE = 15

# --- status (read-only) -----------------------------------------------------------------
STATUS_BASE = 16
STATUS_LEN = 16
REG_CTRL_HEARTBEAT = 16
REG_STATUS_BITS = 17
REG_ENCODER = 18  # u32
REG_TRIGGER_HEAD = 20
REG_RESULT_HEAD = 21
REG_ACK_COUNTER = 22
REG_ACK_SEQ = 23
REG_ACK_CODE = 24
REG_LANE_FULL_BITS = 25
REG_WATCHDOG_TRIPS = 26
REG_DEFAULTED_COUNT = 27
REG_CTRL_BOOT = 28  # 1.1: changes at every start of the controller program; 0 = not provided
REG_NEWEST_PREV_SEQ = 29  # 1.3: the previous-pass SEQ of the newest trigger (with 36..39)

# --- agent area (writable) --------------------------------------------------------------
AGENT_BASE = 32
AGENT_LEN = 4
REG_AGENT_HEARTBEAT = 32
REG_MODE_REQUEST = 33
REG_MAINT_FIRE_GATE = 34

# --- lane mailbox (writable, one FC16 request) ------------------------------------------
# 1.2, optional: a copy of the trigger-ring entry of TRIGGER_HEAD, inside the status poll (36..39,
# no area before 1.2, so it reads 0 from a controller without it: the agent then reads the ring)
NEWEST_TRIGGER_BASE = 36

MAILBOX_BASE = 40
MAILBOX_LEN = 3
REG_CMD_COUNTER = 40
REG_CMD_SEQ = 41
REG_CMD_LANE = 42

# --- rings (read-only) ------------------------------------------------------------------
TRIGGER_RING_BASE = 100
TRIGGER_ENTRY_LEN = 4
TRIGGER_RING_LEN = 16
#: 1.3: PREV_SEQ of trigger seq s at PREV_SEQ_BASE + (s mod 16), written before the entry's SEQ
PREV_SEQ_BASE = TRIGGER_RING_BASE + TRIGGER_RING_LEN * TRIGGER_ENTRY_LEN
RESULT_RING_BASE = 200
RESULT_ENTRY_LEN = 8
#: Results are kept longer than triggers: an agent that restarts (a few seconds at 10 parcels/s)
#: must still find the results of every parcel that left the belt while it was down.
RESULT_RING_LEN = 64

#: Highest address the controller must map (inclusive); addresses in between that belong to
#: no area read as 0 and refuse writes.
LAST_ADDRESS = RESULT_RING_BASE + RESULT_RING_LEN * RESULT_ENTRY_LEN - 1
#: Largest read the agent issues (registers); ring reads are split into chunks of whole entries.
MAX_READ = 120

#: The status poll reads status, agent area and mailbox in one request.
POLL_BASE = STATUS_BASE
POLL_LEN = MAILBOX_BASE + MAILBOX_LEN - STATUS_BASE
_POLL_STRUCT = struct.Struct(f">{POLL_LEN}H")


class StatusBit(enum.IntFlag):
    BELT_RUNNING = 1 << 0
    ESTOP = 1 << 1
    JAM = 1 << 2
    LANE_FULL = 1 << 3
    WATCHDOG_TRIPPED = 1 << 4
    MAINTENANCE = 1 << 5
    FAULT = 1 << 6


class AckCode(enum.IntEnum):
    NONE = 0
    ACCEPTED = 1
    LATE = 2  # parcel already past the decision point (or gone)
    UNKNOWN_SEQ = 3  # no parcel with that sequence is being tracked
    BAD_LANE = 4  # lane number out of range
    WATCHDOG = 5  # agent watchdog tripped, or the parcel was triggered while it was
    MAINTENANCE = 6  # controller in maintenance mode: commands refused


class Disposition(enum.IntEnum):
    SORTED = 1  # reached the lane the controller steered it to, as commanded
    DEFAULTED_NO_COMMAND = 2  # no accepted command by the decision point: default lane
    DEFAULTED_WATCHDOG = 3  # agent watchdog tripped: default lane
    DEFAULTED_FAULT = 4  # e-stop, jam, lane full or maintenance: default lane
    MISSORTED = 5  # lane photo-eye saw it in a lane other than the one steered to
    LOST = 6  # no lane photo-eye saw it in time
    JAMMED = 7
    RECIRCULATED = 8  # 1.3: steered into the recirculation loop as commanded; it comes back as a new trigger


DISPOSITIONS = frozenset(int(d) for d in Disposition)


class ModeRequest(enum.IntEnum):
    NORMAL = 0
    MAINTENANCE = 1


# --- codec ------------------------------------------------------------------------------


def u32(regs: Sequence[int], offset: int) -> int:
    """Decode a u32 at ``offset`` (high word first)."""
    return ((regs[offset] & 0xFFFF) << 16) | (regs[offset + 1] & 0xFFFF)


def split_u32(value: int) -> list[int]:
    """Encode a u32 as two registers, high word first."""
    value &= 0xFFFFFFFF
    return [value >> 16, value & 0xFFFF]


def next_seq(seq: int) -> int:
    """Next sequence number: 1..65535, wrapping to 1 (0 is never used)."""
    return 1 if seq >= 0xFFFF else seq + 1


def seq_distance(old: int, new: int) -> int:
    """How many steps ``new`` is ahead of ``old`` in the 1..65535 wrapping sequence."""
    if old == 0:
        return new  # nothing seen yet
    return (new - old) % 0xFFFF


def seq_went_back(old: int, new: int) -> bool:
    """A head that moved backwards: only a controller restart does that (heads never decrease
    otherwise; a forward step of more than half the sequence space is read as a step back)."""
    if old == 0 or new == old:
        return False
    return new == 0 or seq_distance(old, new) > 0x7FFF


def encoder_delta(old: int, new: int) -> int:
    """Signed difference new - old of two u32 encoder counts, allowing for wrap."""
    d = (new - old) & 0xFFFFFFFF
    return d - (1 << 32) if d >= (1 << 31) else d


@dataclass(frozen=True, slots=True)
class Identity:
    magic: int
    contract_major: int
    contract_minor: int
    firmware: tuple[int, int, int]
    counts_per_metre: int
    gate_count: int
    lane_count: int
    watchdog_ms: int
    trigger_ring_len: int
    result_ring_len: int
    decision_distance_counts: int
    default_lane: int

    @classmethod
    def decode(cls, regs: Sequence[int]) -> Identity:
        r = regs
        return cls(
            magic=r[REG_MAGIC],
            contract_major=r[REG_CONTRACT_MAJOR],
            contract_minor=r[REG_CONTRACT_MINOR],
            firmware=(r[REG_FW_MAJOR], r[REG_FW_MINOR], r[REG_FW_PATCH]),
            counts_per_metre=u32(r, REG_COUNTS_PER_METRE),
            gate_count=r[REG_GATE_COUNT],
            lane_count=r[REG_LANE_COUNT],
            watchdog_ms=r[REG_WATCHDOG_MS],
            trigger_ring_len=r[REG_TRIGGER_RING_LEN],
            result_ring_len=r[REG_RESULT_RING_LEN],
            decision_distance_counts=u32(r, REG_DECISION_DISTANCE),
            default_lane=r[REG_DEFAULT_LANE],
        )

    def encode(self) -> list[int]:
        regs = [0] * ID_LEN
        regs[REG_MAGIC] = self.magic
        regs[REG_CONTRACT_MAJOR] = self.contract_major
        regs[REG_CONTRACT_MINOR] = self.contract_minor
        regs[REG_FW_MAJOR : REG_FW_PATCH + 1] = list(self.firmware)
        regs[REG_COUNTS_PER_METRE : REG_COUNTS_PER_METRE + 2] = split_u32(self.counts_per_metre)
        regs[REG_GATE_COUNT] = self.gate_count
        regs[REG_LANE_COUNT] = self.lane_count
        regs[REG_WATCHDOG_MS] = self.watchdog_ms
        regs[REG_TRIGGER_RING_LEN] = self.trigger_ring_len
        regs[REG_RESULT_RING_LEN] = self.result_ring_len
        regs[REG_DECISION_DISTANCE : REG_DECISION_DISTANCE + 2] = split_u32(
            self.decision_distance_counts
        )
        regs[REG_DEFAULT_LANE] = self.default_lane
        return regs

    def problems(self) -> list[str]:
        """What makes this identity unusable by this agent (empty list: compatible)."""
        out = []
        if self.magic != MAGIC:
            out.append(f"magic {self.magic:#06x} != {MAGIC:#06x}: not a sortgate controller")
            return out
        if self.contract_major != CONTRACT_MAJOR:
            out.append(
                f"contract version {self.contract_major}.{self.contract_minor} is not supported "
                f"(agent speaks {CONTRACT_MAJOR}.x)"
            )
        if self.trigger_ring_len != TRIGGER_RING_LEN or self.result_ring_len != RESULT_RING_LEN:
            out.append(
                f"ring lengths {self.trigger_ring_len}/{self.result_ring_len} != "
                f"{TRIGGER_RING_LEN}/{RESULT_RING_LEN}"
            )
        if self.counts_per_metre == 0:
            out.append("encoder counts per metre is 0")
        if self.watchdog_ms == 0:
            out.append("watchdog timeout is 0 ms")
        return out


@dataclass(frozen=True, slots=True)
class Status:
    """One status poll: registers 16..42 (status, agent area echo, mailbox echo)."""

    ctrl_heartbeat: int
    bits: StatusBit
    encoder: int
    trigger_head: int
    result_head: int
    ack_counter: int
    ack_seq: int
    ack_code: int
    lane_full_bits: int
    watchdog_trips: int
    defaulted_count: int
    agent_heartbeat: int  # echo of the agent area, so a restarted agent continues the count
    boot: int = 0  # CTRL_BOOT (contract 1.1); 0 from a 1.0 controller
    newest_trigger: TriggerEntry | None = None  # NEWEST_TRIGGER (1.2) with its PREV_SEQ (1.3); None where SEQ reads 0

    @classmethod
    def from_bytes(cls, raw: bytes) -> Status:
        """From the status block as it comes off the wire (big-endian registers)."""
        return cls.decode(_POLL_STRUCT.unpack(raw))

    @classmethod
    def decode(cls, regs: Sequence[int]) -> Status:
        def at(addr: int) -> int:
            return regs[addr - POLL_BASE]

        return cls(
            ctrl_heartbeat=at(REG_CTRL_HEARTBEAT),
            bits=StatusBit(at(REG_STATUS_BITS) & 0x7F),
            encoder=u32(regs, REG_ENCODER - POLL_BASE),
            trigger_head=at(REG_TRIGGER_HEAD),
            result_head=at(REG_RESULT_HEAD),
            ack_counter=at(REG_ACK_COUNTER),
            ack_seq=at(REG_ACK_SEQ),
            ack_code=at(REG_ACK_CODE),
            lane_full_bits=at(REG_LANE_FULL_BITS),
            watchdog_trips=at(REG_WATCHDOG_TRIPS),
            defaulted_count=at(REG_DEFAULTED_COUNT),
            agent_heartbeat=at(REG_AGENT_HEARTBEAT),
            boot=at(REG_CTRL_BOOT),
            newest_trigger=TriggerEntry.decode(regs, NEWEST_TRIGGER_BASE - POLL_BASE, at(REG_NEWEST_PREV_SEQ))
            if at(NEWEST_TRIGGER_BASE) else None,
        )

    def problems(self, default_lane: int | None = None) -> tuple[str, ...]:
        """Line-health problems this status shows (empty: healthy). ``default_lane``: given for a
        controller of contract 1.3 or later, where a full lane defaults only its own parcels, so
        LANE_FULL is a line problem only when the default lane itself is full."""
        out = []
        if not self.bits & StatusBit.BELT_RUNNING:
            out.append("belt_stopped")
        for bit, name in (
            (StatusBit.ESTOP, "estop"),
            (StatusBit.JAM, "jam"),
            (StatusBit.LANE_FULL, "lane_full"),
            (StatusBit.WATCHDOG_TRIPPED, "watchdog_tripped"),
            (StatusBit.MAINTENANCE, "maintenance"),
            (StatusBit.FAULT, "controller_fault"),
        ):
            if self.bits & bit:
                out.append(name)
        if default_lane is not None and "lane_full" in out and not self.lane_full_bits >> (default_lane - 1) & 1:
            out.remove("lane_full")
        return tuple(out)


class _RingEntry:
    """Where entry ``n`` of a ring lives: RING_BASE + (n mod RING_LEN) * ENTRY_LEN."""

    __slots__ = ()
    RING_BASE: ClassVar[int]
    ENTRY_LEN: ClassVar[int]
    RING_LEN: ClassVar[int]

    @classmethod
    def slot(cls, n: int) -> int:
        return cls.RING_BASE + (n % cls.RING_LEN) * cls.ENTRY_LEN


@dataclass(frozen=True, slots=True)
class TriggerEntry(_RingEntry):
    seq: int
    encoder: int
    length_mm: int
    prev_seq: int = 0  # 1.3: its previous pass round the loop (164..179, or 29 for the newest); not in the entry

    RING_BASE = TRIGGER_RING_BASE
    ENTRY_LEN = TRIGGER_ENTRY_LEN
    RING_LEN = TRIGGER_RING_LEN

    @classmethod
    def decode(cls, regs: Sequence[int], offset: int = 0, prev_seq: int = 0) -> TriggerEntry:
        return cls(regs[offset], u32(regs, offset + 1), regs[offset + 3], prev_seq)

    def encode(self) -> list[int]:
        return [self.seq, *split_u32(self.encoder), self.length_mm]


@dataclass(frozen=True, slots=True)
class ResultEntry(_RingEntry):
    rseq: int
    seq: int
    encoder: int  # the trigger's captured encoder count: with seq, the parcel's identity
    lane_commanded: int
    lane_reached: int
    disposition: int
    flags: int = 0

    RING_BASE = RESULT_RING_BASE
    ENTRY_LEN = RESULT_ENTRY_LEN
    RING_LEN = RESULT_RING_LEN

    @classmethod
    def decode(cls, regs: Sequence[int], offset: int = 0) -> ResultEntry:
        r = regs
        return cls(r[offset], r[offset + 1], u32(r, offset + 2), *r[offset + 4 : offset + 8])

    def encode(self) -> list[int]:
        return [
            self.rseq, self.seq, *split_u32(self.encoder), self.lane_commanded, self.lane_reached,
            self.disposition, self.flags,
        ]

    @property
    def disposition_name(self) -> str:
        try:
            return Disposition(self.disposition).name.lower()
        except ValueError:
            return f"unknown_{self.disposition}"


def ring_entries_between(old_head: int, new_head: int, ring_len: int) -> list[int]:
    """Sequence numbers after ``old_head`` up to and including ``new_head``, oldest first.

    At most ``ring_len`` are returned: older ones have been overwritten and are lost to us.
    """
    n = seq_distance(old_head, new_head)
    seqs = []
    s = new_head
    for _ in range(min(n, ring_len)):
        seqs.append(s)
        s = s - 1 if s > 1 else 0xFFFF
    return list(reversed(seqs))


def slot_ranges(seqs: Sequence[int], ring_base: int, entry_len: int, ring_len: int) -> list[tuple[int, int]]:
    """Contiguous (address, count) reads that cover the ring slots of ``seqs`` (oldest first).

    Consecutive sequence numbers sit in consecutive slots until the ring wraps; each read stays
    within MAX_READ registers.
    """
    per_read = max(1, MAX_READ // entry_len)
    ranges: list[tuple[int, int]] = []
    start_slot = prev_slot = None
    count = 0
    for s in seqs:
        slot = s % ring_len
        if start_slot is not None and slot == (prev_slot or 0) + 1 and count < per_read:
            count += 1
        else:
            if start_slot is not None:
                ranges.append((ring_base + start_slot * entry_len, count * entry_len))
            start_slot, count = slot, 1
        prev_slot = slot
    if start_slot is not None:
        ranges.append((ring_base + start_slot * entry_len, count * entry_len))
    return ranges
