"""Tie reader frames (and X-ray images) to triggers by evidence of identity. Pure: times are passed in.

The rule this module keeps, and nothing else in the agent may bend: **a frame is attached to a
trigger only when the evidence says it can belong to that trigger and to no other.** Order alone
is never evidence: a reader that skips a cycle, repeats a frame or restarts must not shift codes
onto the neighbouring parcels.

Two witnesses can speak for a frame:

* **The clock.** The controller captures the encoder at each trigger; the agent turns that into
  an interval in which the photo-eye fired (``lo``..``hi``, bounded by its own polls and widened
  for every uncertainty), and, where the controller measured the parcel's length, an interval in
  which its trailing edge left the photo-eye (the first poll whose encoder is past capture +
  length brackets it the same way: ``set_trailing``). Each source has a *window*: a frame arrives between
  ``min_s`` and ``max_s`` after the parcel's leading or trailing edge. The frame's *candidates*
  are the triggers whose window holds its arrival time. Where the agent cannot know every trigger
  that could own a frame (before its first poll, after a controller reconnect: ``known_since``),
  an unknown trigger is a candidate too.
* **The counter.** A reader that prefixes its own trigger counter to each frame names its read
  cycle. Once aligned (``offset`` = trigger index − counter index), the counter names a trigger.

Attachment:

* With a counter, *aligned*: the frame is attached when the counter's trigger is its only
  candidate (both witnesses agree). At once: no later frame can claim that trigger without
  carrying the same counter (a duplicate, dropped) or disagreeing with one witness. A counter
  trigger among several candidates: that trigger's read is ``ambiguous``. Any disagreement (a
  late frame, a restarted reader, a reader whose own photo-eye missed or doubled a parcel) drops
  the alignment.
* Without a counter, or not aligned: the frame is attached to its only candidate, but the read is
  final only when that trigger's window has closed, and a second frame in the same window makes
  it a ``conflict`` (one of the two is some other parcel's). Several candidates: every one of them
  is ``ambiguous``. No candidate: an orphan. Byte-identical frames in one window are one read.
* Alignment is (re)gained from two successive frames that are each their trigger's only
  candidate and imply the same offset; meanwhile the reader is matched as one without a counter.
* A trigger whose window closes with no frame attached has ``timed_out`` for that source.

A source whose frames keep failing to match (``FAULT_RUN`` orphans, disagreements, conflicts or
counter gaps in a row) is *unmatched*: its reads are marked so (the parcel goes to inspection)
until ``CLEAN_RUN`` frames in a row match cleanly.

Nothing here raises on odd input; everything it notices comes back as a ``Note``.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CAPTURE_SLACK_S",
    "CLEAN_RUN",
    "FAULT_RUN",
    "Capture",
    "Matcher",
    "Note",
    "Outcome",
    "SPEED_TOLERANCE",
    "SourceSpec",
    "capture_interval",
]

#: disagreements in a row that make a source "unmatched" (alarm; its parcels go to inspection)
FAULT_RUN = 3
#: clean matches in a row that clear it again
CLEAN_RUN = 3
#: how long a trigger is remembered after its window closed (only for late frames' notes)
KEEP_S = 2.0
INF = float("inf")
#: a counter this low after a higher one is a rebooted reader, not a late frame
RESET_MAX = 3

Status = Literal["read", "timed_out", "ambiguous", "conflict"]


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A reader (or the image export) and where its frames can arrive."""

    name: str
    min_s: float  # a frame arrives no earlier than this after its anchor
    max_s: float  # ... and no later than this
    anchor: Literal["leading_edge", "trailing_edge"] = "trailing_edge"
    counter_modulus: int | None = None  # the reader's counter wraps to 0 here; None: no counter


@dataclass(frozen=True, slots=True)
class Capture:
    """When a trigger's photo-eye fired, as the agent can bound it."""

    seq: int
    lo: float  # leading edge no earlier than this (monotonic seconds)
    hi: float  # ... and no later than this
    measured: bool = False  # the controller measured its length: its trailing edge will be observed


@dataclass(frozen=True, slots=True)
class Outcome:
    """A source's final answer for one trigger."""

    seq: int
    source: str
    status: Status
    payload: Any = None  # the attached frame (status "read")
    t_frame: float | None = None
    counter: int | None = None
    unmatched: bool = False  # the source was unmatched: do not trust this read


@dataclass(frozen=True, slots=True)
class Note:
    """Something worth a counter, a log line or an alarm.

    kinds: orphan, ambiguous, mismatch, duplicate, conflict, counter_gap, counter_reset, aligned,
    unaligned, unmatched (source became unmatched), matched (it recovered).
    """

    source: str
    kind: str
    detail: str
    seqs: tuple[int, ...] = ()
    payload: Any = None


Event = Outcome | Note


#: how far the belt-speed estimate may be off when placing a trigger's edges in time
SPEED_TOLERANCE = 0.05
#: clock slack added to every capture interval (poll round trip, timer granularity)
CAPTURE_SLACK_S = 0.002


def capture_interval(
    now: float, after: float, travelled: int, speed_cps: float, stale: float = 0.0
) -> tuple[float, float]:
    """When the belt was at a position it has since travelled ``travelled`` counts past, as bounds.

    Hard bounds: after ``after`` (a poll that went out before the belt got there, less the
    controller's publishing delay) and before ``now`` (the poll that shows it returned); the
    encoder narrows that to its estimate, give or take the speed tolerance and ``stale``, the age
    the controller's encoder register may have. Pure."""
    lo, hi = after, now
    if speed_cps > 0:
        ago = max(travelled, 0) / speed_cps
        slack = CAPTURE_SLACK_S + SPEED_TOLERANCE * ago
        est_lo, est_hi = now - ago - slack - stale, now - ago + slack
        if est_lo <= hi and est_hi >= lo:
            lo, hi = max(lo, est_lo), min(hi, est_hi)
    return lo, hi


@dataclass(slots=True)
class _Trig:
    seq: int
    idx: int  # unwrapped trigger index: strictly increasing, never reused
    cap: Capture
    windows: dict[str, tuple[float, float]]  # source -> (opens, closes); inf until the trailing edge
    closes: float  # the latest window close over all sources (inf until known)


@dataclass(slots=True)
class _Slot:
    """One source's state for one trigger."""

    frame: Any = None
    t_frame: float | None = None
    counter: int | None = None
    status: Status | None = None  # set when final
    conflict: bool = False
    ambiguous: bool = False
    proposed: bool = False  # a counter reader's frame held until the next cycle confirms its offset
    counter_index: int | None = None


@dataclass(slots=True)
class _Source:
    spec: SourceSpec
    held: deque[tuple[Any, float, int | None]] = field(default_factory=deque)
    offset: int | None = None  # trigger idx - counter idx, when aligned
    candidate: tuple[int, int, int] | None = None  # (offset, counter index, seq) the last frame proposed
    confirmed: int | None = None  # the seq whose proposal the alignment confirmed
    last_counter: int | None = None  # unwrapped counter index of the last frame
    last_raw: int | None = None  # its raw value
    attached: dict[int, Any] = field(default_factory=dict)  # counter idx -> frame (for duplicates)
    bad_run: int = 0
    clean_run: int = 0
    unmatched: bool = False


def _same(a: Any, b: Any) -> bool:
    raw_a, raw_b = getattr(a, "raw", a), getattr(b, "raw", b)
    return bool(raw_a == raw_b)


class Matcher:
    """Per-source frame matching. Feed it triggers, frames and the passing of time."""

    def __init__(self, sources: list[SourceSpec], max_pass_s: float) -> None:
        """``max_pass_s``: the longest a parcel can take to pass the photo-eye (for triggers
        whose length the controller did not measure)."""
        self.sources = {s.name: _Source(s) for s in sources}
        self.max_pass_s = max_pass_s
        self._trigs: deque[_Trig] = deque()
        self._slots: dict[tuple[int, str], _Slot] = {}
        self._closing: list[tuple[float, int, int, str]] = []  # heap: (closes, idx, seq, source)
        self._by_seq: dict[int, _Trig] = {}
        self._idx = 0
        self._last_seq: int | None = None
        self.known_since = float("inf")  # no trigger known yet: every frame could be anyone's
        self.horizon = float("-inf")  # every trigger captured before this is known

    # --- triggers and time --------------------------------------------------------------
    def new_session(self, known_since: float) -> None:
        """A (re)connected controller session: triggers captured before ``known_since`` may be
        unknown to us, and sequence numbers may have restarted (the old triggers are forgotten:
        their parcels' reads end as time-outs)."""
        self.known_since = known_since
        self.horizon = known_since
        self._trigs.clear()
        self._slots.clear()
        self._by_seq.clear()
        self._closing.clear()
        self._idx += 1_000_000  # no counter alignment survives a session change
        self._last_seq = None
        for src in self.sources.values():
            src.offset = None
            src.candidate = None

    def add_trigger(self, cap: Capture) -> None:
        if self._last_seq is None:
            self._idx += 1
        else:
            step = (cap.seq - self._last_seq) % 0xFFFF  # 1..65535, wrapping to 1
            self._idx += step if step else 0xFFFF
        self._last_seq = cap.seq
        trig = _Trig(cap.seq, self._idx, cap, {}, 0.0)
        for name, src in self.sources.items():
            self._slots[(cap.seq, name)] = _Slot()
            spec = src.spec
            if spec.anchor == "leading_edge":
                self._set_window(trig, name, cap.lo + spec.min_s, cap.hi + spec.max_s)
            elif not cap.measured:  # its trailing edge is somewhere up to the longest parcel
                self._set_window(trig, name, cap.lo + spec.min_s, cap.hi + self.max_pass_s + spec.max_s)
            else:
                trig.windows[name] = (INF, INF)
        trig.closes = max(w[1] for w in trig.windows.values())
        self._trigs.append(trig)
        self._by_seq[cap.seq] = trig

    def set_trailing(self, seq: int, lo: float, hi: float) -> None:
        """The measured parcel ``seq``'s trailing edge left the photo-eye between ``lo`` and ``hi``."""
        trig = self._by_seq.get(seq)
        if trig is None:
            return
        self.max_pass_s = max(self.max_pass_s, hi - trig.cap.lo)
        for name, src in self.sources.items():
            if src.spec.anchor == "trailing_edge" and trig.windows.get(name, (0.0, 0.0))[0] == INF:
                self._set_window(trig, name, lo + src.spec.min_s, hi + src.spec.max_s)
        trig.closes = max(w[1] for w in trig.windows.values())

    def _set_window(self, trig: _Trig, name: str, opens: float, closes: float) -> None:
        trig.windows[name] = (opens, closes)
        heapq.heappush(self._closing, (closes, trig.idx, trig.seq, name))

    def set_horizon(self, t: float) -> None:
        """Every trigger captured before ``t`` has been handed to ``add_trigger``."""
        self.horizon = max(self.horizon, t)

    def add_frame(self, source: str, frame: Any, t: float, counter: int | None = None) -> list[Event]:
        """A frame from ``source`` that arrived at ``t``; ``counter`` is the reader's counter."""
        src = self.sources[source]
        src.held.append((frame, t, counter))
        return self.advance(t)

    def advance(self, now: float) -> list[Event]:
        """Resolve held frames the horizon now allows, and close windows that have passed."""
        out: list[Event] = []
        for src in self.sources.values():
            while src.held and src.held[0][1] - src.spec.min_s <= self.horizon:
                frame, t, counter = src.held.popleft()
                self._resolve(src, frame, t, counter, out)
        # a window is over when the clock has passed it and no held frame could still fall in it
        pending = [src.held[0][1] for src in self.sources.values() if src.held]
        settled = min([now, *pending])
        closing = self._closing
        while closing and closing[0][0] < settled:
            _, _, seq, name = heapq.heappop(closing)
            slot = self._slots.get((seq, name))
            if slot is not None and slot.status is None:
                self._close(self.sources[name], seq, slot, out)
        while self._trigs and (self._trigs[0].closes + KEEP_S < now or self._trigs[0].cap.hi + 60.0 < now):
            old = self._trigs.popleft()
            if self._by_seq.get(old.seq) is old:
                del self._by_seq[old.seq]
            for name in self.sources:
                self._slots.pop((old.seq, name), None)
        return out

    def holding(self) -> bool:
        """Frames wait for the horizon (a controller poll would let them resolve)."""
        return any(src.held for src in self.sources.values())

    def expect(self, seq: int) -> list[str]:
        """Sources that have not yet given their final answer for ``seq``."""
        return [n for n in self.sources if (s := self._slots.get((seq, n))) is not None and s.status is None]

    def give_up(self, seq: int) -> list[Outcome]:
        """The parcel must be decided now: final answers for whatever is still open (a frame seen
        but whose window has not closed is not trusted: ``timed_out``)."""
        out: list[Outcome] = []
        for name, src in self.sources.items():
            slot = self._slots.get((seq, name))
            if slot is not None and slot.status is None:
                slot.status = "conflict" if slot.proposed or slot.conflict else "timed_out"
                out.append(Outcome(seq, name, slot.status, unmatched=src.unmatched))
        return out

    def drop_source(self, source: str, seq: int) -> None:
        """``source`` answers for ``seq`` another way (an image named by its trigger sequence)."""
        slot = self._slots.get((seq, source))
        if slot is not None:
            slot.status = "read"

    # --- resolution ---------------------------------------------------------------------
    def _candidates(self, src: _Source, t: float) -> tuple[list[_Trig], bool]:
        """Triggers whose window for ``src`` holds ``t``, and whether an unknown one could."""
        name = src.spec.name
        cands = []
        longest = src.spec.max_s + self.max_pass_s
        for trig in reversed(self._trigs):
            if trig.cap.hi + longest < t:
                break  # older triggers' windows closed before t
            opens, closes = trig.windows[name]
            if opens <= t <= closes:
                cands.append(trig)
        cands.reverse()
        earliest_owner = t - longest  # the earliest capture that could own this frame
        return cands, earliest_owner < self.known_since

    def _resolve(self, src: _Source, frame: Any, t: float, counter: int | None, out: list[Event]) -> None:
        cands, unknown = self._candidates(src, t)
        name = src.spec.name
        if counter is not None and src.spec.counter_modulus is not None:
            prev = src.last_counter
            n = self._index(src, counter)
            if prev is not None and n < prev and counter > RESET_MAX:
                # an older cycle's frame (late, or sent out of order): it may compete, never attach
                out.append(Note(name, "late", f"counter {counter} after {src.last_raw}: an older cycle's frame",
                                tuple(c.seq for c in cands), frame))
                self._compete(src, cands, out)
                self._bad(src, out)
                return
            src.last_raw, src.last_counter = counter, n
            if src.offset is None and self._learn_offset(src, n, cands, unknown, out):
                self._confirm(src, out)  # the previous frame proposed this offset: both are proven now
            elif src.offset is None:  # not aligned: a counter reader's frame is never tied by the clock alone
                self._propose(src, frame, t, counter, cands, unknown, out)
                return
            if not self._by_counter(src, frame, t, counter, n, prev, cands, unknown, out):
                self._disagree(src, frame, counter, n, prev, cands, unknown, out)
            return
        # the clock alone
        if unknown or len(cands) > 1:
            seqs = tuple(c.seq for c in cands)
            out.append(Note(name, "ambiguous", "frame could belong to more than one trigger"
                            + (" (or to one this agent never saw)" if unknown else ""), seqs, frame))
            for trig in cands:
                self._mark_ambiguous(src, trig, out)
            return
        if not cands:
            out.append(Note(name, "orphan", "frame inside no trigger's window", (), frame))
            self._bad(src, out)
            return
        trig = cands[0]
        slot = self._slots[(trig.seq, name)]
        if slot.frame is not None and _same(slot.frame, frame):
            out.append(Note(name, "duplicate", "the same frame twice in one window", (trig.seq,), frame))
            return
        if slot.status is not None:  # answered already: this frame is some other parcel's, or late
            out.append(Note(name, "orphan", "frame for a trigger already answered", (trig.seq,), frame))
            self._bad(src, out)
            return
        if slot.frame is not None:
            slot.conflict = True
            out.append(Note(name, "conflict", "two different frames in one trigger's window", (trig.seq,), frame))
            self._bad(src, out)
            return
        slot.frame, slot.t_frame, slot.counter = frame, t, counter

    def _by_counter(
        self, src: _Source, frame: Any, t: float, counter: int, n: int, prev: int | None,
        cands: list[_Trig], unknown: bool, out: list[Event],
    ) -> bool:
        """Aligned counter: True when the frame was handled (attached, duplicate, ambiguous);
        False when the witnesses disagree."""
        name = src.spec.name
        assert src.offset is not None
        seen = src.attached.get(n)
        if seen is not None and _same(seen, frame):
            out.append(Note(name, "duplicate", f"counter {counter} repeated", (), frame))
            return True
        trig = next((c for c in cands if c.idx == n + src.offset), None) if seen is None else None
        slot = self._slots[(trig.seq, name)] if trig is not None else None
        if trig is not None and slot is not None and not unknown and slot.status is None and slot.frame is None:
            if len(cands) > 1:  # the counter's trigger shares the frame's time with another
                out.append(Note(name, "ambiguous", "frame inside more than one trigger's window",
                                tuple(c.seq for c in cands), frame))
                self._mark_ambiguous(src, trig, out)
                return True
            if prev is not None and n > prev + 1:
                out.append(Note(name, "counter_gap", f"{n - prev - 1} read cycle(s) without a frame", (trig.seq,)))
                self._bad(src, out)
            slot.status = "read"
            slot.frame, slot.t_frame, slot.counter = frame, t, counter
            src.attached[n] = frame
            if len(src.attached) > 64:
                del src.attached[min(src.attached)]
            self._clean(src, out)
            out.append(Outcome(trig.seq, name, "read", frame, t, counter, src.unmatched))
            return True
        return False

    def _disagree(
        self, src: _Source, frame: Any, counter: int, n: int, prev: int | None, cands: list[_Trig],
        unknown: bool, out: list[Event],
    ) -> None:
        """The counter names a trigger whose window does not hold the frame: it is tied to no one,
        it competes for the triggers whose windows hold it, and the alignment is dropped (a reader
        that rebooted, or whose own photo-eye missed or doubled a parcel)."""
        reset = prev is not None and n < prev
        out.append(Note(src.spec.name, "counter_reset" if reset else "mismatch",
                        f"counter {counter} does not fit the trigger its alignment names; alignment dropped",
                        tuple(c.seq for c in cands), frame))
        src.offset = None
        src.candidate = None
        src.attached.clear()
        self._compete(src, cands, out)
        self._bad(src, out)
        self._learn_offset(src, n, cands, unknown, out)  # the first witness of a new alignment

    def _propose(
        self, src: _Source, frame: Any, t: float, counter: int, cands: list[_Trig], unknown: bool, out: list[Event]
    ) -> None:
        """Unaligned: a frame alone in one window is held there until the next cycle confirms the
        offset it implies (``_confirm``); otherwise it only competes."""
        slot = self._slots.get((cands[0].seq, src.spec.name)) if len(cands) == 1 and not unknown else None
        if slot is not None and slot.frame is not None and _same(slot.frame, frame):
            out.append(Note(src.spec.name, "duplicate", f"counter {counter} repeated", (cands[0].seq,), frame))
            return
        if slot is None or slot.status is not None or slot.frame is not None:
            out.append(Note(src.spec.name, "unaligned", "reader counter not aligned; frame not tied",
                            tuple(c.seq for c in cands), frame))
            self._compete(src, cands, out)
            return
        slot.frame, slot.t_frame, slot.counter, slot.proposed = frame, t, counter, True
        slot.counter_index = src.last_counter

    def _confirm(self, src: _Source, out: list[Event]) -> None:
        """The frame before this one proposed the offset this one confirms: tie it, if nothing has
        competed for its trigger meanwhile."""
        assert src.offset is not None and src.confirmed is not None
        seq = src.confirmed
        slot = self._slots.get((seq, src.spec.name))
        if slot is None or slot.status is not None or not slot.proposed or slot.conflict:
            return
        slot.status = "read"
        if slot.counter_index is not None:
            src.attached[slot.counter_index] = slot.frame
        out.append(Outcome(seq, src.spec.name, "read", slot.frame, slot.t_frame, slot.counter, src.unmatched))

    def _compete(self, src: _Source, cands: list[_Trig], out: list[Event]) -> None:
        """A frame that cannot be tied to anyone but may be any of ``cands``'s: none of them can
        trust a read from this source any more."""
        for trig in cands:
            slot = self._slots.get((trig.seq, src.spec.name))
            if slot is not None and slot.status is None:
                slot.conflict = True

    def _learn_offset(self, src: _Source, n: int, cands: list[_Trig], unknown: bool, out: list[Event]) -> bool:
        """Unaligned: a frame that is its trigger's only candidate proposes an offset; the next
        one confirming it aligns the reader (True)."""
        if unknown or len(cands) != 1:
            src.candidate = None
            return False
        offset = cands[0].idx - n
        if src.candidate is not None and src.candidate[:2] == (offset, n - 1):  # the next cycle agrees
            src.offset = offset
            src.confirmed = src.candidate[2]
            src.candidate = None
            out.append(Note(src.spec.name, "aligned", f"reader counter aligned (offset {offset})"))
            return True
        src.candidate = (offset, n, cands[0].seq)
        return False

    def _index(self, src: _Source, counter: int) -> int:
        """The counter as an ever-growing index: the nearest to the last one, modulo its wrap."""
        m = src.spec.counter_modulus
        assert m is not None
        if src.last_counter is None or src.last_raw is None:
            return counter + 10 * m  # room below for a counter that steps back
        step = (counter - src.last_raw) % m
        return src.last_counter + (step - m if step > m // 2 else step)

    def _mark_ambiguous(self, src: _Source, trig: _Trig, out: list[Event]) -> None:
        slot = self._slots.get((trig.seq, src.spec.name))
        if slot is None or slot.status is not None:
            return
        slot.status = "ambiguous"
        out.append(Outcome(trig.seq, src.spec.name, "ambiguous", unmatched=src.unmatched))

    def _close(self, src: _Source, seq: int, slot: _Slot, out: list[Event]) -> None:
        if slot.proposed and not slot.conflict:
            return  # waits for the next cycle to confirm it, or for the parcel's deadline (give_up)
        if slot.conflict or slot.proposed:
            slot.status = "conflict"
            out.append(Outcome(seq, src.spec.name, "conflict", unmatched=src.unmatched))
        elif slot.frame is not None:
            slot.status = "read"
            self._clean(src, out)
            out.append(Outcome(seq, src.spec.name, "read", slot.frame, slot.t_frame, slot.counter, src.unmatched))
        else:
            slot.status = "timed_out"
            out.append(Outcome(seq, src.spec.name, "timed_out", unmatched=src.unmatched))

    # --- source health ------------------------------------------------------------------
    def _bad(self, src: _Source, out: list[Event]) -> None:
        src.clean_run = 0
        src.bad_run += 1
        if not src.unmatched and src.bad_run >= FAULT_RUN:
            src.unmatched = True
            out.append(Note(src.spec.name, "unmatched",
                            f"{src.bad_run} frames in a row did not match a trigger cleanly"))

    def _clean(self, src: _Source, out: list[Event]) -> None:
        src.bad_run = 0
        src.clean_run += 1
        if src.unmatched and src.clean_run >= CLEAN_RUN:
            src.unmatched = False
            out.append(Note(src.spec.name, "matched", f"{src.clean_run} frames in a row matched cleanly"))
