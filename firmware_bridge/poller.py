"""The status poll, run on the link's I/O thread, and what it tells the event loop.

A parcel's trigger must be seen within ``idle_poll_ms`` of its capture, so the status block is read
fifty times a second whether parcels pass or not. Most of those polls show nothing new: the
encoder has moved and the controller's heartbeat has ticked. The poller reads them on the link's
own thread and wakes the event loop only for a poll it has a use for (``Poll``):

* something the line's decisions depend on changed: the status bits, the trigger head, the lane-full
  bits, CTRL_BOOT, or the controller's program froze or runs again;
* results are due: ``RESULT_BATCH`` of them have gathered, or the first has waited
  ``RESULT_DELAY_S`` (a record, not a decision: read in batches). The thread reads them itself
  (``read_results``) and hands them over with the poll, so a batch of results costs the loop one
  wake-up;
* the loop asked for it: an input waits to learn which triggers exist (``want``: the first poll
  sent at or after a given moment, brought forward to then, but at most once per ``min_gap_s``);
* a parcel's trailing edge has passed the photo-eye (``follow``: the encoder counts to watch) and
  the reader windows that start at it have closed (``edge_close``, the loop's rule), without a poll
  handed over for another reason meanwhile: the poll handed over then lets the loop close them.
  Each poll handed over
  carries the polls since the one before (``Poll.history``: when each was sent and answered, and
  its encoder), so the loop places every edge between the two polls around it however late it
  learns of it; the reader frame that follows an edge usually brings the poll that tells it.

The agent heartbeat rides on every poll (function 23, contract 1.2; otherwise a write every
``heartbeat_s``) while the event loop holds a **lease**: the loop renews it at each of its
housekeeping turns while every vital task runs (``renew``), for two turns. A stalled loop or a
stuck task stops the heartbeat within the lease (0.4 s), and the controller's watchdog then sends
every parcel to inspection — as with a heartbeat written by the loop itself, whose health was
judged at the same turns.

Thread rules: ``Poller`` is driven by the I/O thread (``turn``, ``want``); the loop calls
``renew`` and ``follow``, which only assign single attributes. What the thread hands
over goes through ``deliver``, which the link sets to a ``call_soon_threadsafe``.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from firmware_bridge import contract as c

__all__ = ["FROZEN_S", "RESULT_BATCH", "RESULT_DELAY_S", "Poll", "Poller", "SpeedEstimator"]

#: results waiting in the ring are read once this many have gathered, or this long after the
#: first of them was seen (the ring holds RESULT_RING_LEN = 64)
RESULT_BATCH = 16
RESULT_DELAY_S = 0.5

#: polls kept for the loop between two handovers (at 20 ms: 5 s; a passed edge asks for a
#: handover when its windows close, so an edge's polls are always among them)
HISTORY = 256
#: an encoder count this far behind the belt is not an edge to come but one from before a
#: controller restart (the loop forgets it)
EDGE_PAST_MAX = 1 << 30

#: CTRL_HEARTBEAT changes at least every 100 ms while the controller program runs (contract 3.2);
#: unchanged this long, the program has halted although Modbus still answers.
FROZEN_S = 1.0


def _at(address: int) -> int:
    """Byte offset of a status register in the status block."""
    return 2 * (address - c.POLL_BASE)


#: the controller heartbeat and the encoder: read from every poll
_QUICK = struct.Struct(">H2xI")
assert _at(c.REG_CTRL_HEARTBEAT) == 0 and _at(c.REG_ENCODER) == 4, "the status block's layout moved"
_U16 = struct.Struct(">H")
_RESULT_HEAD = _at(c.REG_RESULT_HEAD)


def _reg(address: int) -> slice:
    return slice(_at(address), _at(address) + 2)


#: a poll that changes one of these is handed over (what the line's decisions depend on)
_BITS, _TRIGGER_HEAD = _reg(c.REG_STATUS_BITS), _reg(c.REG_TRIGGER_HEAD)
_LANE_FULL, _BOOT = _reg(c.REG_LANE_FULL_BITS), _reg(c.REG_CTRL_BOOT)


class SpeedEstimator:
    """Belt speed in encoder counts per second, from successive (time, encoder) samples."""

    def __init__(self, min_span_s: float = 0.05) -> None:
        self.min_span_s = min_span_s
        self._ref: tuple[float, int] | None = None
        self.cps = 0.0

    def update(self, t: float, encoder: int) -> float:
        if self._ref is None:
            self._ref = (t, encoder)
            return self.cps
        t0, e0 = self._ref
        if t - t0 >= self.min_span_s:
            sample = c.encoder_delta(e0, encoder) / (t - t0)
            # conservative: a faster belt means an earlier deadline, so take rises at once
            self.cps = sample if sample > self.cps else 0.7 * self.cps + 0.3 * sample
            self._ref = (t, encoder)
        return self.cps


@dataclass(frozen=True, slots=True)
class Poll:
    """One status poll handed to the loop: sent at ``sent``, answered at ``seen``; the poll before
    it (which showed none of this poll's new triggers) was sent at ``prev_sent``. ``results``: the
    result-ring entries read after it (keyed by RSEQ; read from the first not yet handed over up to
    the poll's RESULT_HEAD), when results were due; else None. ``history``: (sent, seen,
    encoder) of the poll handed over before this one, of every poll since, and of this one."""

    status: c.Status
    sent: float
    seen: float
    prev_sent: float
    cps: float
    frozen: bool
    results: dict[int, c.ResultEntry] | None = None
    history: tuple[tuple[float, float, int], ...] = ()


class Poller:
    def __init__(
        self,
        *,
        idle_s: float,
        min_gap_s: float,
        heartbeat_s: float,
        heartbeat: int,
        speed: SpeedEstimator,
        results_read: int,
        prev_sent: float,
        read_results: Callable[[Sequence[int]], dict[int, c.ResultEntry]],
        edge_close: Callable[[float, float, int, float], float] | None = None,
        deliver: Callable[[Poll], object] = lambda poll: None,
    ) -> None:
        """``results_read``: the RESULT_HEAD the loop has already taken; ``read_results``: reads the
        result-ring slots of the given RSEQs (on the I/O thread, like ``turn``); ``edge_close``:
        when the windows that start at a passed trailing edge close, from the poll that first
        shows it passed (answered at, the previous poll sent at, counts past, counts per second;
        a pure function: it runs on the I/O thread); None: a passed edge is handed over at once."""
        self.idle_s, self.min_gap_s, self.heartbeat_s = idle_s, min_gap_s, heartbeat_s
        self.heartbeat = heartbeat  # the last value written (continued from the register)
        self.speed = speed
        self.deliver = deliver  # the link sets it: hands a poll to the event loop
        self.read_results = read_results
        self.results_read = results_read  # the I/O thread's: results up to here are handed over
        # set by the loop (single assignments)
        self.lease_until = 0.0
        self.targets: tuple[int, ...] = ()  # trailing edges to watch for (encoder counts)
        self.edge_close = edge_close
        # the I/O thread's own
        self.next_at = 0.0  # the next poll is due
        self.prev_sent = prev_sent
        self.turned_at = time.monotonic()  # the last poll (liveness)
        self._latest: tuple[bytes, float] | None = None  # the last poll's block, and when
        self._next_hb = 0.0
        self._wanted: float | None = None  # deliver the first poll sent at or after this
        self._key: tuple[object, ...] | None = None  # what the loop last saw changing
        self._hb_seen = (-1, 0.0)  # CTRL_HEARTBEAT and when it last changed
        self._results_from: tuple[int, float] | None = None  # (results_read, first seen waiting)
        # polls since the last one handed over (that one first): the loop places edges from them
        self._history: deque[tuple[float, float, int]] = deque(maxlen=HISTORY)
        self._noticed: set[int] = set()  # watched edges seen passed (each asks for a handover once)
        self._noticed_in: tuple[int, ...] = ()  # the targets ``_noticed`` was last pruned to
        self._edge_due: float | None = None  # hand over the first poll sent at or after this

    # --- the loop's side ----------------------------------------------------------------
    def renew(self, until: float) -> None:
        """The loop runs and every vital task with it: heartbeats until ``until``."""
        self.lease_until = until

    def follow(self, targets: tuple[int, ...]) -> None:
        """After the loop has taken a poll: the trailing edges still to watch for."""
        self.targets = targets

    # --- the I/O thread's side ----------------------------------------------------------
    def want(self, at: float) -> None:
        """An input waits to learn which triggers exist: hand over the first poll sent at or
        after ``at``, and send it then if the next poll would come later (but not sooner than
        ``min_gap_s`` after the last)."""
        self._wanted = at if self._wanted is None else min(self._wanted, at)
        self.next_at = min(self.next_at, max(at, self.prev_sent + self.min_gap_s))

    def wants_heartbeat(self, now: float, fc23: bool | None) -> bool:
        """Write a heartbeat with this poll: under the lease, on every poll where function 23
        carries it at no cost, otherwise every heartbeat interval."""
        return now < self.lease_until and (fc23 is not False or now >= self._next_hb)

    def next_heartbeat(self, sent: float) -> int:
        self.heartbeat = c.next_seq(self.heartbeat)
        self._next_hb = sent + self.heartbeat_s
        return self.heartbeat

    @property
    def latest_at(self) -> float | None:
        """When the last status was polled (None: not yet)."""
        last = self._latest
        return last[1] if last else None

    @property
    def latest(self) -> tuple[c.Status, float] | None:
        """The last status polled and when (decoded on demand: ``sortgate status``)."""
        last = self._latest
        return (c.Status.from_bytes(last[0]), last[1]) if last else None

    def turn(self, raw: bytes, sent: float, seen: float) -> None:
        """One poll's answer (the status block's bytes): hand it to the loop if it has a use for
        it; schedule the next. Decided on the bytes themselves: only a poll handed over is decoded
        (an idle belt's polls differ only in the encoder and the heartbeats)."""
        self.turned_at = seen
        self._latest = (raw, seen)
        ctrl_heartbeat, encoder = _QUICK.unpack_from(raw)
        cps = self.speed.update(seen, encoder)
        frozen = self._frozen(ctrl_heartbeat, seen)
        result_head = _U16.unpack_from(raw, _RESULT_HEAD)[0]
        due = self._results_due(result_head, seen)
        key = (raw[_BITS], raw[_TRIGGER_HEAD], raw[_LANE_FULL], raw[_BOOT], frozen)
        here = (sent, seen, encoder)
        self._history.append(here)
        if self.targets:
            self._watch(encoder, seen, cps)
        wanted = self._wanted is not None and sent >= self._wanted
        edge = self._edge_due is not None and sent >= self._edge_due
        if wanted or due or edge or key != self._key:
            if wanted:
                self._wanted = None
            self._edge_due = None  # the history below tells the loop of every edge passed so far
            history = tuple(self._history)
            self._history.clear()
            self._history.append(here)
            self._key = key
            results = None
            if due:  # read here: the loop takes them with this poll
                results = self.read_results(c.ring_entries_between(self.results_read, result_head, c.RESULT_RING_LEN))
                self.results_read = result_head
            self.deliver(Poll(c.Status.from_bytes(raw), sent, seen, self.prev_sent, cps, frozen, results, history))
        self.prev_sent = sent
        # the next poll at the idle period, or when a heartbeat that needs its own write is due,
        # or when a poll is wanted
        self.next_at = sent + self.idle_s
        if sent < self.lease_until and self._next_hb > sent:
            self.next_at = min(self.next_at, self._next_hb)
        for at in (self._wanted, self._edge_due):
            if at is not None:
                self.next_at = min(self.next_at, max(at, sent + self.min_gap_s))

    def _watch(self, encoder: int, seen: float, cps: float) -> None:
        """A watched trailing edge this poll shows passed (for the first time) asks for a handover
        when its windows close."""
        targets = self.targets
        if targets is not self._noticed_in:  # the loop has taken edges off: forget them here too
            self._noticed.intersection_update(targets)
            self._noticed_in = targets
        for target in targets:
            past = c.encoder_delta(target, encoder)
            if target not in self._noticed and 0 <= past < EDGE_PAST_MAX:
                self._noticed.add(target)
                due = seen if self.edge_close is None else self.edge_close(seen, self.prev_sent, past, cps)
                self._edge_due = due if self._edge_due is None else min(self._edge_due, due)

    def _frozen(self, ctrl_heartbeat: int, now: float) -> bool:
        value, since = self._hb_seen
        if ctrl_heartbeat != value:
            self._hb_seen = (ctrl_heartbeat, now)
            return False
        return now - since > FROZEN_S

    def _results_due(self, head: int, now: float) -> bool:
        read = self.results_read
        if head == read:
            self._results_from = None
            return False
        if self._results_from is None or self._results_from[0] != read:
            self._results_from = (read, now)
        return c.seq_distance(read, head) >= RESULT_BATCH or now - self._results_from[1] >= RESULT_DELAY_S
