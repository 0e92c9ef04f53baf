"""The evidence the matcher works with: sources and their windows, trigger captures, what it
answers (``Outcome``) and what it notices (``Note``), and how the agent bounds a capture in time
(``capture_interval``). Pure data and one pure function."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CAPTURE_SLACK_S", "CLEAN_RUN", "FAULT_RUN", "INF", "KEEP_S", "RESET_MAX", "SPEED_TOLERANCE",
    "Capture", "Event", "Note", "Outcome", "SourceSpec", "Status", "capture_interval",
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
#: clock slack added to every capture interval (timer granularity, an encoder count's width)
CAPTURE_SLACK_S = 0.002


def capture_interval(
    sent: float, now: float, after: float, travelled: int, speed_cps: float, stale: float = 0.0
) -> tuple[float, float]:
    """When the belt was at a position it has since travelled ``travelled`` counts past, as bounds.

    Hard bounds: after ``after`` (a poll that went out before the belt got there, less the
    controller's publishing delay) and before ``now`` (the answer to the poll that shows it, sent
    at ``sent``). The controller read the encoder somewhere between that poll going out and its
    answer (and the register may be ``stale`` older), so the encoder narrows the bounds to
    ``sent - stale - ago`` .. ``now - ago``, give or take the speed tolerance. Anchoring both ends
    at the answer would put the lower bound too late by the poll's round trip: a slow answer
    (a loaded I/O thread) would then open a window after its own frame. Pure."""
    lo, hi = after, now
    if speed_cps > 0:
        ago = max(travelled, 0) / speed_cps
        slack = CAPTURE_SLACK_S + SPEED_TOLERANCE * ago
        est_lo, est_hi = min(sent, now) - ago - slack - stale, now - ago + slack
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
