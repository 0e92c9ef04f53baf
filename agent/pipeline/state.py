"""What the pipeline's parts share, and the small interfaces they are given.

``LineState`` is the one place for the parcels in flight, the line's health and mode, the
controller's identity and the metrics: the parts (intake, parcel task, recorder) get it through
their constructors instead of setting each other's attributes. The collaborators from outside
the pipeline come in as ``typing.Protocol``s, so tests can hand in fakes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from agent.config import Config
from agent.pipeline.decision import Mode, VerdictLookup
from agent.pipeline.parcel import Parcel
from agent.pipeline.sortplan import ActivePlan
from firmware_bridge import contract as c

log = structlog.get_logger("sortgate.line")

__all__ = ["AlarmSink", "LaneCommander", "LineState", "Metrics", "VerdictSource", "VerdictAsk"]


class AlarmSink(Protocol):
    """Alarms (agent.central.alarms.Alarms): conditions that start and end, rate-limited events."""

    def condition(self, kind: str, active: bool, detail: str, subject: str | None = None) -> None: ...

    def event(self, kind: str, detail: str, **extra: Any) -> None: ...


class LaneCommander(Protocol):
    """The controller's lane mailbox (firmware_bridge.modbus_link.ControllerLink).
    ``command`` raises firmware_bridge.errors.LinkError when the link fails."""

    async def command(self, counter: int, seq: int, lane: int, ack_timeout_s: float) -> c.AckCode: ...


class VerdictSource(Protocol):
    """The local verdict store (agent.central.verdicts.VerdictStore); a primary-key read, never raises."""

    def lookup(self, waybill: str, now: float | None = None) -> VerdictLookup: ...


#: asks central for a waybill the store lacks, waiting at most the seconds given; never raises
VerdictAsk = Callable[[str, float], Awaitable[VerdictLookup]]


@dataclass
class Metrics:
    """Counters (reported in stats and status) and decision latencies (for percentiles)."""

    counters: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def latency(self, ms: float) -> None:
        self.latencies_ms.append(ms)  # the runtime's stats trim it (it keeps the index of its last report)


@dataclass
class LineState:
    cfg: Config
    alarms: AlarmSink
    metrics: Metrics = field(default_factory=Metrics)
    parcels: dict[int, Parcel] = field(default_factory=dict)  # in flight, by trigger sequence
    mode: Mode = Mode.NORMAL
    problems: tuple[str, ...] = ("controller_offline",)  # empty: healthy
    identity: c.Identity | None = None  # the controller's, once connected
    outbox_ok: bool = True  # records can be stored (else nothing is released)
    plan: ActivePlan = field(init=False)  # the sort plan in force (replaced whole, between two parcels)
    lane_full_bits: int = 0  # the controller's LANE_FULL_BITS at its last poll
    loop_rounds: dict[int, int] = field(default_factory=dict)  # seq sent round the loop -> its earlier rounds

    def __post_init__(self) -> None:
        self.plan = self.cfg.sort_plan()

    def sent_round(self, seq: int, rounds: int) -> None:
        """Parcel ``seq`` goes round the loop after ``rounds`` earlier rounds (kept for its return)."""
        self.loop_rounds[seq] = rounds
        while len(self.loop_rounds) > 256:
            del self.loop_rounds[next(iter(self.loop_rounds))]

    def returned(self, prev_seq: int) -> int:
        """Rounds behind a parcel back from the loop whose previous pass was ``prev_seq``. A pass
        this agent did not send round (it restarted meanwhile) counts as the limit: uncertain, so
        the parcel goes no further round, it goes to inspection."""
        rounds = self.loop_rounds.pop(prev_seq, None)
        return self.plan.plan.recirculate_unread if rounds is None else rounds + 1

    def set_lane_full(self, bits: int, per_lane: bool) -> None:
        """The controller's LANE_FULL_BITS. With a controller of contract 1.3 (``per_lane``) a full
        lane is a condition of that lane alone (alarm ``lane_full`` with the lane as subject): the
        sort plan overflows its parcels or sends them to inspection, the line keeps flowing."""
        changed, self.lane_full_bits = bits ^ self.lane_full_bits, bits
        if not changed:
            return
        for n in range(1, 17):
            if changed >> (n - 1) & 1:
                full = bool(bits >> (n - 1) & 1)
                if full:
                    self.metrics.count("lane_full_events")
                if per_lane:
                    detail = (f"lane {n} full: its parcels go to an overflow lane or to inspection" if full
                              else f"lane {n} has room again")
                    self.alarms.condition("lane_full", full, detail, subject=str(n))

    def set_problems(self, problems: tuple[str, ...]) -> None:
        """The line's health as the controller reports it (plus the outbox's): every change is
        logged and alarmed; any problem sends every parcel to inspection."""
        if not self.outbox_ok and "outbox_unavailable" not in problems:
            problems = (*problems, "outbox_unavailable")
        if problems == self.problems:
            return
        if problems:
            log.warning("line unhealthy", problems=list(problems))
        else:
            log.info("line healthy")
        for gone in set(self.problems) - set(problems):
            self.alarms.condition(gone, False, f"{gone} cleared")
        for new in set(problems) - set(self.problems):
            # the outbox and the controller link raise their own alarms, with their causes
            if new not in ("outbox_unavailable", "controller_offline"):
                self.alarms.condition(new, True, f"line problem: {new}; every parcel goes to inspection")
        self.problems = problems
