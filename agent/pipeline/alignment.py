"""The reader counter's rules, and the bookkeeping every source shares.

A counter is a witness only once it is *aligned* with the controller's trigger sequence; the
alignment is learnt from the clock (a frame alone in one trigger's window proposes an offset, the
next cycle's frame confirms it) and dropped on any disagreement. ``CounterRules`` holds those rules;
``SourceRules`` the ways a frame that is tied to nobody still counts (it competes, it makes a read
ambiguous) and a source's health (a run of bad matches makes it *unmatched*). ``Matcher``
(``matching``) uses both.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from agent.pipeline.evidence import CLEAN_RUN, FAULT_RUN, INF, Event, Note, Outcome, _same, _Slot, _Source, _Trig

__all__ = ["CounterRules", "SourceRules"]


class SourceRules:
    _slots: dict[tuple[int, str], _Slot]
    _trigs: deque[_Trig]

    def _compete(self, src: _Source, cands: list[_Trig], out: list[Event]) -> None:
        """A frame that cannot be tied to anyone but may be any of ``cands``'s: none of them can
        trust a read from this source any more."""
        for trig in cands:
            slot = self._slots.get((trig.seq, src.spec.name))
            if slot is not None and slot.status is None:
                slot.conflict = True

    def _mark_ambiguous(self, src: _Source, trig: _Trig, out: list[Event]) -> None:
        slot = self._slots.get((trig.seq, src.spec.name))
        if slot is None or slot.status is not None:
            return
        slot.status = "ambiguous"
        out.append(Outcome(trig.seq, src.spec.name, "ambiguous", unmatched=src.unmatched))

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


class CounterRules(SourceRules):
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
        self, src: _Source, frame: Any, t: float, counter: int, n: int, prev: int | None, cands: list[_Trig],
        unknown: bool, out: list[Event],
    ) -> None:
        """The counter names a trigger whose window does not hold the frame: it is tied to no one,
        it competes for the triggers whose windows hold it, and the alignment is dropped (a reader
        that rebooted, or whose own photo-eye missed or doubled a parcel)."""
        reset = prev is not None and n < prev
        assert src.offset is not None
        out.append(Note(src.spec.name, "counter_reset" if reset else "mismatch",
                        f"counter {counter} does not fit the trigger its alignment names"
                        f" ({self._named_window(src, n + src.offset, t)}); alignment dropped",
                        tuple(c.seq for c in cands), frame))
        src.offset = None
        src.candidate = None
        src.attached.clear()
        self._compete(src, cands, out)
        self._bad(src, out)
        self._learn_offset(src, n, cands, unknown, out)  # the first witness of a new alignment

    def _named_window(self, src: _Source, idx: int, t: float) -> str:
        """Where the trigger a counter names stood against the frame's arrival, for the note."""
        trig = next((x for x in self._trigs if x.idx == idx), None)
        if trig is None:
            return "no such trigger known"
        opens, closes = trig.windows.get(src.spec.name, (INF, INF))
        slot = self._slots.get((trig.seq, src.spec.name))
        answered = f", answered {slot.status}" if slot is not None and slot.status is not None else ""
        if opens == INF:
            return f"trigger {trig.seq}: its trailing edge not placed yet{answered}"
        return (f"trigger {trig.seq}: window {(opens - t) * 1000:+.1f}..{(closes - t) * 1000:+.1f} ms"
                f" from the frame{answered}")

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
