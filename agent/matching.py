"""Match reader frames (and X-ray images) to triggers. Pure: times are passed in.

Each *source* — a barcode reader, the X-ray image export — delivers one item per trigger.

Readers fire on the same photo-eye as the controller's trigger, so each reader sends exactly one
frame per trigger (a code, several codes, or its NoRead string), some milliseconds later. We match
by order within a time window, per reader:

* a frame goes to that reader's oldest trigger still waiting for it, if the trigger was seen no
  longer than ``window_s`` ago;
* a trigger that waits longer than ``window_s`` gets a ``timed_out`` outcome for that reader
  (decided as a NoRead: inspection);
* a frame can arrive before the agent's poll has seen its trigger; it waits up to ``early_s`` for
  one, and is then reported as an orphan (logged; no parcel is harmed). It is matched to a trigger
  only if it arrived after that trigger was physically captured (``t_actual``, placed in time from
  the encoder): a frame cannot precede its own trigger. This stops a spurious frame from shifting
  the order by one and handing one parcel's code to the next parcel.

A frame is never split or shared across triggers, and a parcel with any uncertain read goes to
inspection, so a mismatch can cost a false inspection but the order/window rule plus check digits
keep it from releasing the wrong parcel.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

#: clock and encoder rounding slack when comparing a frame's arrival with a trigger's capture
TOLERANCE_S = 0.002


@dataclass(frozen=True, slots=True)
class Match:
    seq: int
    source: str
    payload: Any  # the frame or image; None when the source timed out for this trigger
    t_frame: float | None  # when it arrived (None for a time-out)

    @property
    def timed_out(self) -> bool:
        return self.t_frame is None


@dataclass(frozen=True, slots=True)
class Orphan:
    source: str
    payload: Any
    t_frame: float


class ReadMatcher:
    def __init__(self, sources: list[str], window_s: dict[str, float], early_s: float) -> None:
        self.readers = sources
        self.window_s = window_s
        self.early_s = early_s
        self._pending: dict[str, deque[tuple[int, float]]] = {r: deque() for r in sources}
        self._early: dict[str, deque[tuple[Any, float]]] = {r: deque() for r in sources}

    def add_trigger(self, seq: int, t_seen: float, t_actual: float | None = None) -> list[Match | Orphan]:
        """A trigger the agent has just seen; ``t_actual`` is when the photo-eye fired."""
        t_actual = t_seen if t_actual is None else t_actual
        out: list[Match | Orphan] = self.expire(t_seen)
        for reader in self.readers:
            early = self._early[reader]
            while early and early[0][1] < t_actual - TOLERANCE_S:
                frame, t_frame = early.popleft()
                out.append(Orphan(reader, frame, t_frame))  # older than this trigger: not its frame
            if early:
                frame, t_frame = early.popleft()
                out.append(Match(seq, reader, frame, t_frame))
            else:
                self._pending[reader].append((seq, t_seen))
        return out

    def add_frame(self, reader: str, frame: Any, t: float) -> list[Match | Orphan]:
        """An item from a source (a reader frame, an image path)."""
        out: list[Match | Orphan] = self.expire(t)
        pending = self._pending[reader]
        if pending:
            seq, _ = pending.popleft()
            out.append(Match(seq, reader, frame, t))
        else:
            self._early[reader].append((frame, t))
        return out

    def expire(self, now: float) -> list[Match | Orphan]:
        out: list[Match | Orphan] = []
        for reader in self.readers:
            pending = self._pending[reader]
            window = self.window_s[reader]
            while pending and now - pending[0][1] > window:
                seq, _ = pending.popleft()
                out.append(Match(seq, reader, None, None))
            early = self._early[reader]
            while early and now - early[0][1] > self.early_s:
                frame, t = early.popleft()
                out.append(Orphan(reader, frame, t))
        return out

    def cancel(self, source: str, seq: int) -> None:
        """Stop waiting for ``source`` on ``seq`` (its item is delivered another way)."""
        pending = self._pending[source]
        self._pending[source] = type(pending)(e for e in pending if e[0] != seq)

    def waiting(self, seq: int) -> list[str]:
        """Readers that have not yet answered for ``seq``."""
        return [r for r in self.readers if any(s == seq for s, _ in self._pending[r])]
