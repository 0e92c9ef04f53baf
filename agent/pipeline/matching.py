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
  trigger among several candidates: that trigger's read is ``ambiguous``. A counter lower than
  the last one is an older cycle's frame (``late``): it ties nothing. Any other disagreement (a
  restarted reader, a reader whose own photo-eye missed or doubled a parcel) drops the alignment.
  A frame the witnesses disagree on is tied to nobody but *competes*: every trigger whose window
  holds it ends as a ``conflict`` unless its own agreeing frame comes.
* With a counter, *not aligned*: never tied by the clock alone. A frame alone in one window
  proposes an offset and is held there; the next cycle's frame, alone in its window with the same
  offset, confirms it: the reader is aligned and both frames are tied (``alignment.py``).
* Without a counter: the frame is attached to its only candidate, but the read is final only when
  that trigger's window has closed, and a second frame in the same window makes it a ``conflict``
  (one of the two is some other parcel's). Several candidates: every one of them is
  ``ambiguous``. No candidate: an orphan. Byte-identical frames in one window are one read.
* A trigger whose window closes with no frame attached has ``timed_out`` for that source.

A source whose frames keep failing to match (``FAULT_RUN`` orphans, disagreements, conflicts or
counter gaps in a row) is *unmatched*: its reads are marked so (the parcel goes to inspection)
until ``CLEAN_RUN`` frames in a row match cleanly.

Nothing here raises on odd input; everything it notices comes back as a ``Note``.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any

from agent.pipeline.alignment import CounterRules
from agent.pipeline.evidence import (
    CAPTURE_SLACK_S,
    CLEAN_RUN,
    FAULT_RUN,
    INF,
    KEEP_S,
    RESET_MAX,
    SPEED_TOLERANCE,
    Capture,
    Event,
    Note,
    Outcome,
    SourceSpec,
    _same,
    _Slot,
    _Source,
    _Trig,
    capture_interval,
)

__all__ = [
    "CAPTURE_SLACK_S", "CLEAN_RUN", "FAULT_RUN", "SPEED_TOLERANCE",
    "Capture", "Matcher", "Note", "Outcome", "SourceSpec", "capture_interval",
]


class Matcher(CounterRules):
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

    def next_close(self) -> float | None:
        """When the earliest open window closes (``advance`` after it will close it); None when
        no window is open (one whose source has answered already is not: a counter's frame is
        final at once), or while a held frame that arrived before that close waits for the
        horizon (the window stays open until the frame has resolved, and the poll that resolves
        it is the moment to look again, not a timer)."""
        closing = self._closing
        while closing and self._final(closing[0][2], closing[0][3]):
            heapq.heappop(closing)  # answered before its window closed (a counter's frame): no close due
        if not closing:
            return None
        at = closing[0][0]
        if any(src.held and src.held[0][1] <= at for src in self.sources.values()):
            return None
        return at

    def _final(self, seq: int, source: str) -> bool:
        slot = self._slots.get((seq, source))
        return slot is None or slot.status is not None

    def holding(self) -> bool:
        """Frames wait for the horizon (a controller poll would let them resolve)."""
        return any(src.held for src in self.sources.values())

    def wanted_horizon(self) -> float | None:
        """The horizon the first held frame waits for (None: no frame is held)."""
        need = [src.held[0][1] - src.spec.min_s for src in self.sources.values() if src.held]
        return min(need) if need else None

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
                self._disagree(src, frame, t, counter, n, prev, cands, unknown, out)
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
