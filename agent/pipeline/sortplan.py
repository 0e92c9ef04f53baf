"""Sort plans: which lane a decided parcel takes. Pure data and pure functions, no I/O.

``decide()`` says whether every check passed; the sort plan says *where* a parcel goes then. Lanes
belong to classes (``[[lanes]] role``):

  inspection     the fail-safe default: one gateless lane, always present
  release        cleared parcels
  consolidation  cleared parcels of one consolidation group (a flight, a country, a container)
  hold           parcels central holds (for duty, tax, documents, another agency), never released
  recirculation  a loop back to the scan point, for a parcel no reader could read

A plan is a list of rules, tried in order; the first that matches places the parcel. A rule
matches a verdict (``release`` or ``hold``), optionally only some hold reasons or consolidation
groups, and names its lanes: the first is the rule's lane, the others its overflow lanes (same
class), taken in order while the ones before them are full or disabled. The floor stays
inspection:

* only a parcel whose every check passed (a signed, positive ``release`` hit) reaches a release or
  consolidation lane; only one whose single failed check is a ``hold`` verdict reaches a hold lane;
* a parcel whose only problem is that no reader read it may go round the recirculation loop, at
  most ``recirculate_unread`` times, then to inspection (``recirculation_limit``);
* what no rule places goes to inspection (``plan_unplaced``); a rule whose lanes are all full or
  disabled sends its parcel to inspection (``lane_full`` / ``lane_disabled``).

A plan is validated whole against the line's lanes (``check``) before it is used: every lane it
names exists and has the class its rule needs, a hold lane takes the reasons sent to it, and every
hold reason and group the plan declares is placed by some rule (no gap). A line without a plan
gets ``default_plan``: every release to the release lanes, as a two-lane line has always done.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.pipeline.decision import Decision, LaneClass, Reason, VerdictLookup

__all__ = [
    "ActivePlan",
    "LaneLike",
    "Placement",
    "PlanRule",
    "SortPlan",
    "check",
    "default_plan",
    "place",
]

Tag = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]

#: the reasons a parcel may still go round the loop for (nothing else counted against it)
UNREAD = frozenset({Reason.NO_READ, Reason.READER_TIMEOUT})


class PlaceReason(enum.StrEnum):
    PLAN_UNPLACED = "plan_unplaced"  # no rule of the plan matches this parcel
    LANE_FULL = "lane_full"  # every lane of its rule is full (or disabled)
    LANE_DISABLED = "lane_disabled"  # every lane of its rule is disabled
    RECIRCULATED = "recirculated"  # sent round the loop to be read again
    RECIRCULATION_LIMIT = "recirculation_limit"  # still unread after the plan's rounds


class LaneLike(Protocol):
    """What a plan needs of a configured lane (``agent.config.LaneConfig``)."""

    @property
    def number(self) -> int: ...
    @property
    def role(self) -> str: ...
    @property
    def gate(self) -> int | None: ...
    @property
    def hold_reasons(self) -> list[str] | None: ...


class _Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, str_strip_whitespace=True)


class PlanRule(_Plan):
    name: Tag
    verdict: Literal["release", "hold"]
    hold_reasons: list[Tag] | None = Field(None, max_length=32, description="hold rules: only these reasons")
    groups: list[Tag] | None = Field(None, max_length=256, description="release rules: only these groups")
    lanes: list[Annotated[int, Field(ge=1, le=16)]] = Field(min_length=1, max_length=8)

    @model_validator(mode="after")
    def _shape(self) -> PlanRule:
        if self.verdict == "release" and self.hold_reasons is not None:
            raise ValueError(f"rule {self.name}: hold_reasons belong to hold rules")
        if self.verdict == "hold" and self.groups is not None:
            raise ValueError(f"rule {self.name}: groups belong to release rules")
        if len(set(self.lanes)) != len(self.lanes):
            raise ValueError(f"rule {self.name}: a lane is named twice in {self.lanes}")
        return self


class SortPlan(_Plan):
    """A sort plan as written in the config (``[plan]``), in a file, or sent by central."""

    version: int = Field(ge=0, le=2**31, description="higher replaces lower; 0 is the built-in default")
    name: Tag = "plan"
    hold_reasons: list[Tag] = Field(default_factory=list, max_length=32,
                                    description="hold reasons central uses; each must reach a rule")
    groups: list[Tag] = Field(default_factory=list, max_length=256,
                              description="consolidation groups; each must reach a rule")
    rules: list[PlanRule] = Field(min_length=1, max_length=512)
    disabled_lanes: list[Annotated[int, Field(ge=1, le=16)]] = Field(default_factory=list, max_length=16)
    recirculate_unread: int = Field(0, ge=0, le=5, description="rounds an unread parcel may go round the loop")

    @model_validator(mode="after")
    def _names(self) -> SortPlan:
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"rule names must be unique, got {names}")
        return self


def check(plan: SortPlan, lanes: Sequence[LaneLike]) -> list[str]:
    """Every reason ``plan`` cannot run on a line with ``lanes`` (empty: it can)."""
    by_number = {lane.number: lane for lane in lanes}
    problems: list[str] = []
    for n in plan.disabled_lanes:
        lane = by_number.get(n)
        if lane is None:
            problems.append(f"disabled_lanes: lane {n} does not exist on this line")
        elif lane.role == "inspection" and lane.gate is None:
            problems.append(f"disabled_lanes: lane {n} is the default inspection lane, which cannot be disabled")
    holds, groups = set(plan.hold_reasons), set(plan.groups)
    for rule in plan.rules:
        problems += _check_rule(rule, by_number, holds, groups)
    reached_holds = {r for rule in plan.rules if rule.verdict == "hold" for r in (rule.hold_reasons or holds)}
    reached_groups = {g for rule in plan.rules for g in rule.groups or ()}
    problems += [f"gap: hold reason {r!r} is declared but no rule places it" for r in sorted(holds - reached_holds)]
    problems += [f"gap: group {g!r} is declared but no rule places it" for g in sorted(groups - reached_groups)]
    if plan.recirculate_unread and not any(lane.role == "recirculation" for lane in lanes):
        problems.append("recirculate_unread needs a lane with role = 'recirculation'")
    return problems


def _check_rule(rule: PlanRule, by_number: dict[int, LaneLike], holds: set[str], groups: set[str]) -> list[str]:
    where = f"rule {rule.name}"
    problems = [f"{where}: hold reason {r!r} is not declared in the plan's hold_reasons"
                for r in rule.hold_reasons or () if r not in holds]
    problems += [f"{where}: group {g!r} is not declared in the plan's groups"
                 for g in rule.groups or () if g not in groups]
    want = "hold" if rule.verdict == "hold" else "consolidation" if rule.groups is not None else "release"
    classes = set()
    for n in rule.lanes:
        lane = by_number.get(n)
        if lane is None:
            problems.append(f"{where}: lane {n} does not exist on this line")
            continue
        classes.add(lane.role)
        if lane.role != want:
            problems.append(f"{where}: lane {n} is a {lane.role} lane; this rule needs a {want} lane")
        elif lane.hold_reasons is not None:
            sent = set(rule.hold_reasons) if rule.hold_reasons is not None else None
            if sent is None or not sent <= set(lane.hold_reasons):
                problems.append(
                    f"{where}: hold lane {n} takes only {sorted(lane.hold_reasons)}, the rule sends "
                    f"{'any hold reason' if sent is None else sorted(sent)}"
                )
    if len(classes) > 1:
        problems.append(f"{where}: its lanes are of different classes {sorted(classes)}; overflow keeps the class")
    return problems


def default_plan(lanes: Sequence[LaneLike]) -> SortPlan:
    """The plan of a line without one: every release to the release lanes (the first, then the
    others as its overflow); holds to inspection, nothing round the loop."""
    release = [lane.number for lane in lanes if lane.role == "release"]
    return SortPlan(version=0, name="default", rules=[PlanRule(name="release", verdict="release", lanes=release)])


_CLASS = {
    "release": LaneClass.RELEASE,
    "consolidation": LaneClass.CONSOLIDATION,
    "hold": LaneClass.HOLD,
    "recirculation": LaneClass.RECIRCULATION,
    "inspection": LaneClass.INSPECTION,
}


@dataclass(frozen=True, slots=True)
class ActivePlan:
    """A plan checked against the line's lanes, ready for ``place``."""

    plan: SortPlan
    classes: dict[int, LaneClass]  # lane number -> class
    default_lane: int
    recirculation_lane: int | None

    @classmethod
    def build(cls, plan: SortPlan, lanes: Sequence[LaneLike]) -> ActivePlan:
        problems = check(plan, lanes)
        if problems:
            raise ValueError("; ".join(problems))
        default = next(lane.number for lane in lanes if lane.role == "inspection" and lane.gate is None)
        recirc = next((lane.number for lane in lanes if lane.role == "recirculation"), None)
        return cls(plan, {lane.number: _CLASS[lane.role] for lane in lanes}, default, recirc)

    @property
    def version(self) -> int:
        return self.plan.version


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the plan sends a decided parcel, and why."""

    lane: int
    decision: Decision  # the decision with its lane class and any placement reason added
    rule: str | None = None  # the rule that placed it (None: inspection, no rule)
    overflowed: bool = False  # not the rule's first lane: that one was full or disabled


def place(
    plan: ActivePlan, decision: Decision, verdict: VerdictLookup | None, full_bits: int = 0, rounds: int = 0
) -> Placement:
    """The lane for a decided parcel. ``full_bits``: the controller's LANE_FULL_BITS (bit n-1 for
    lane n); ``rounds``: how often the parcel has already gone round the loop. Never raises."""
    p = plan.plan
    if decision.released:
        group = verdict.group if verdict else None
        rule = next((r for r in p.rules if r.verdict == "release" and (r.groups is None or group in r.groups)), None)
        return _onto(plan, decision, rule, full_bits)
    if decision.waybill is not None and tuple(decision.reasons) == (Reason.VERDICT_HOLD,):
        why = verdict.hold_reason if verdict else None
        rule = next(
            (r for r in p.rules if r.verdict == "hold" and (r.hold_reasons is None or why in r.hold_reasons)), None
        )
        if rule is None:  # a hold the plan has no lane for: inspection, as on a two-lane line
            return Placement(plan.default_lane, decision)
        return _onto(plan, decision, rule, full_bits)
    if decision.reasons and set(decision.reasons) <= UNREAD and plan.recirculation_lane is not None:
        if rounds >= p.recirculate_unread:
            if p.recirculate_unread:
                return _inspect(plan, decision, PlaceReason.RECIRCULATION_LIMIT)
            return Placement(plan.default_lane, decision)
        lane = plan.recirculation_lane
        if lane in p.disabled_lanes or full_bits >> (lane - 1) & 1:
            return Placement(plan.default_lane, decision)
        reasons = (*decision.reasons, str(PlaceReason.RECIRCULATED))
        return Placement(lane, replace(decision, lane=LaneClass.RECIRCULATION, reasons=reasons), "recirculate_unread")
    return Placement(plan.default_lane, decision)


def _inspect(plan: ActivePlan, decision: Decision, why: str) -> Placement:
    reasons = tuple(r for r in decision.reasons if r != Reason.RELEASE_VERDICT)
    return Placement(plan.default_lane, replace(decision, lane=LaneClass.INSPECTION, reasons=(*reasons, str(why))))


def _onto(plan: ActivePlan, decision: Decision, rule: PlanRule | None, full_bits: int) -> Placement:
    """The first lane of ``rule`` that is enabled and not full."""
    if rule is None:
        return _inspect(plan, decision, PlaceReason.PLAN_UNPLACED)
    disabled = 0
    for i, lane in enumerate(rule.lanes):
        if lane in plan.plan.disabled_lanes:
            disabled += 1
        elif not full_bits >> (lane - 1) & 1:
            return Placement(lane, replace(decision, lane=plan.classes[lane]), rule.name, overflowed=i > 0)
    why = PlaceReason.LANE_DISABLED if disabled == len(rule.lanes) else PlaceReason.LANE_FULL
    return _inspect(plan, decision, why)
