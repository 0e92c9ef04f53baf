"""A simulated line with a sort plan: lanes of every class, chutes that fill and drain, a loop.

The lanes are those of ``config/sortgate.sortplan.example.toml`` (a unit test keeps them equal):
release, two hold lanes, four consolidation lanes (one container per flight), a consolidation and
a release overflow chute, and a recirculation loop. The simulator adds what a config does not say:
how many parcels each chute holds and how fast it is emptied (people unload containers slowly, so
the first flight's container fills during a run), and how long the loop takes.

Ground truth, per pass of a parcel (``allowed``): the lanes it may reach under any plan the run
uses. The inspection lane is always allowed (it is the floor); a release or consolidation lane
only for a readable label with a release verdict, and then only the lanes of the rule for its
group; a hold lane only for a readable label with a hold verdict, and only one taking its reason;
the loop only for a pass the agent could not read (a label no reader can read on this pass, or a
frame lost or late).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.pipeline.sortplan import SortPlan, check
from hw_sim.plan import PlannedParcel, SortMix

#: (number, name, role, gate, hold reasons): the example line config's [[lanes]]
LANES: tuple[tuple[int, str, str, int | None, tuple[str, ...] | None], ...] = (
    (1, "inspection", "inspection", None, None),
    (2, "release", "release", 1, None),
    (3, "customs-hold", "hold", 2, ("duty", "documents", "manifest")),
    (4, "agency-hold", "hold", 3, ("other_agency", "anti_contraband")),
    (5, "uld-1", "consolidation", 4, None),
    (6, "uld-2", "consolidation", 5, None),
    (7, "uld-3", "consolidation", 6, None),
    (8, "uld-4", "consolidation", 7, None),
    (9, "consolidation-overflow", "consolidation", 8, None),
    (10, "release-overflow", "release", 9, None),
    (11, "loop", "recirculation", 10, None),
)
#: lane -> (capacity in parcels, parcels emptied per second). The first container is small and slow
#: to unload, so it fills during a run and its flight overflows; the release lane fills at 10
#: parcels a second and overflows too. Lanes not named here never fill.
CAPACITY: dict[int, tuple[int, float]] = {
    2: (80, 4.5),
    3: (40, 0.3),
    4: (40, 0.3),
    5: (15, 0.1),
    6: (60, 0.5),
    7: (60, 0.5),
    8: (60, 0.5),
}
LOOP_LANE = 11
LOOP_S = 4.0  # from the loop's photo-eye back to the scan point
CLASSES = {number: role for number, _, role, _, _ in LANES}
HOLD_REASONS = ("duty", "documents", "manifest", "other_agency", "anti_contraband", "tax")  # tax: no rule
GROUPS = ("CX880", "KE612", "LH733", "SQ001", "AF185")  # AF185: no rule of its own
MIX = SortMix(HOLD_REASONS, GROUPS)


@dataclass(frozen=True)
class Lane:
    number: int
    role: str
    gate: int | None
    hold_reasons: list[str] | None


def problems(plan: dict[str, Any]) -> list[str]:
    """Why ``plan`` cannot run on this line (empty: it can), as ``sortgate plan check`` says it."""
    try:
        parsed = SortPlan.model_validate(plan)
    except ValueError as exc:  # pydantic's ValidationError included
        return [str(exc)]
    return check(parsed, [Lane(n, role, gate, list(r) if r else None) for n, _, role, gate, r in LANES])


def lanes_toml() -> str:
    out = []
    for number, name, role, gate, reasons in LANES:
        out.append(f'\n[[lanes]]\nnumber = {number}\nname = "{name}"\nrole = "{role}"\n')
        if gate is not None:
            out.append(f"gate = {gate}\n")
        if reasons is not None:
            out.append(f"hold_reasons = {json.dumps(list(reasons))}\n")
    return "".join(out)


def plan_toml(plan: dict[str, Any]) -> str:
    """A plan (as parsed from TOML or JSON) as the config's [plan] table. Its values are strings,
    integers and lists of them, which JSON and TOML write alike."""
    out = ["\n[plan]\n"]
    out += [f"{k} = {json.dumps(v)}\n" for k, v in plan.items() if k != "rules"]
    for rule in plan["rules"]:
        out.append("\n[[plan.rules]]\n")
        out += [f"{k} = {json.dumps(v)}\n" for k, v in rule.items()]
    return "".join(out)


def derive_update(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan central sends mid-run: one version up, and the first consolidation rule's container
    taken out of use (its flight goes to the rule's overflow lane from then on)."""
    rule = next((r for r in plan["rules"] if r.get("groups")), None)
    disabled = list(plan.get("disabled_lanes", []))
    if rule is not None and rule["lanes"][0] not in disabled:
        disabled.append(rule["lanes"][0])
    return {**plan, "version": plan["version"] + 1, "name": f"{plan.get('name', 'plan')}-update",
            "disabled_lanes": disabled}


#: lane classes that take a parcel out of customs
CLEARED = ("release", "consolidation")


def readable(p: PlannedParcel, pass_no: int) -> bool:
    if p.label == "ok":
        return True
    return p.label == "noread" and p.readable_on_pass is not None and pass_no >= p.readable_on_pass


def rule_for(p: PlannedParcel, plan: dict[str, Any]) -> dict[str, Any] | None:
    """The rule of ``plan`` that places this parcel's verdict (first match wins), if any."""
    rules: list[dict[str, Any]] = plan["rules"]
    for rule in rules:
        if rule["verdict"] != p.verdict:
            continue
        if p.verdict == "release" and (rule.get("groups") is None or p.group in rule["groups"]):
            return rule
        if p.verdict == "hold" and (rule.get("hold_reasons") is None or p.hold_reason in rule["hold_reasons"]):
            return rule
    return None


def allowed(p: PlannedParcel, pass_no: int, plans: Sequence[dict[str, Any]], read_nothing: bool = False) -> set[int]:
    """The lanes this pass may reach under any of ``plans``. ``read_nothing``: the agent got no code
    for this pass (its record's only reasons are no_read or reader_timeout: a lost or late frame as
    well as an unreadable label). The loop is allowed for such a pass too: it is not an exit, the
    parcel comes back and is decided again."""
    lanes = {1}
    ok = readable(p, pass_no)
    if ok:
        for plan in plans:
            rule = rule_for(p, plan)
            lanes |= set(rule["lanes"]) if rule else set()
    if ((p.label == "noread" and not ok) or read_nothing) and any(plan.get("recirculate_unread") for plan in plans):
        lanes.add(LOOP_LANE)
    return lanes
