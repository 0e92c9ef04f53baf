"""Sort plans: validation against the line's lanes, and placement (pure, no wires)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.pipeline.decision import Decision, LaneClass, VerdictLookup
from agent.pipeline.sortplan import ActivePlan, PlanRule, SortPlan, check, default_plan, place


@dataclass(frozen=True)
class Lane:
    number: int
    role: str
    gate: int | None = None
    hold_reasons: list[str] | None = None


LINE = [
    Lane(1, "inspection"),
    Lane(2, "release", 1),
    Lane(3, "hold", 2, ["duty", "documents"]),
    Lane(4, "hold", 3, ["other_agency"]),
    Lane(5, "consolidation", 4),
    Lane(6, "consolidation", 5),
    Lane(7, "consolidation", 6),
    Lane(8, "release", 7),
    Lane(9, "recirculation", 8),
]


def plan(**kw: object) -> SortPlan:
    body: dict[str, object] = {
        "version": 3,
        "hold_reasons": ["duty", "documents", "other_agency"],
        "groups": ["CX880", "KE612"],
        "rules": [
            {"name": "hold-duty", "verdict": "hold", "hold_reasons": ["duty", "documents"], "lanes": [3]},
            {"name": "hold-oga", "verdict": "hold", "hold_reasons": ["other_agency"], "lanes": [4]},
            {"name": "cx880", "verdict": "release", "groups": ["CX880"], "lanes": [5, 6]},
            {"name": "ke612", "verdict": "release", "groups": ["KE612"], "lanes": [7]},
            {"name": "release", "verdict": "release", "lanes": [2, 8]},
        ],
        "recirculate_unread": 2,
    }
    body.update(kw)
    return SortPlan.model_validate(body)


ACTIVE = ActivePlan.build(plan(), LINE)
RELEASED = Decision(LaneClass.RELEASE, ("release_verdict",), "JD014600006281234567")


def hit(verdict: str, hold_reason: str | None = None, group: str | None = None) -> VerdictLookup:
    return VerdictLookup("hit", verdict, "v1", hold_reason, group)


def test_the_example_plan_fits_the_line() -> None:
    assert check(plan(), LINE) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"rules": [{"name": "r", "verdict": "release", "lanes": [12]}]}, "lane 12 does not exist"),
        ({"rules": [{"name": "r", "verdict": "release", "lanes": [3]}]}, "lane 3 is a hold lane; this rule needs a release"),
        ({"rules": [{"name": "r", "verdict": "release", "lanes": [2, 5]}]}, "different classes"),
        ({"rules": [{"name": "r", "verdict": "hold", "hold_reasons": ["duty"], "lanes": [4]}]},
         "hold lane 4 takes only ['other_agency']"),
        ({"rules": [{"name": "r", "verdict": "hold", "lanes": [3]}]}, "the rule sends any hold reason"),
        ({"hold_reasons": ["duty", "tax"]}, "gap: hold reason 'tax' is declared but no rule places it"),
        ({"groups": ["CX880", "KE612", "LH733"]}, "gap: group 'LH733'"),
        ({"rules": [{"name": "r", "verdict": "release", "groups": ["XX1"], "lanes": [5]}], "groups": []},
         "group 'XX1' is not declared"),
        ({"disabled_lanes": [1]}, "default inspection lane, which cannot be disabled"),
        ({"disabled_lanes": [15]}, "disabled_lanes: lane 15 does not exist"),
    ],
)
def test_a_plan_that_does_not_fit_is_refused_with_the_reason(change: dict[str, object], problem: str) -> None:
    problems = check(plan(**change), LINE)
    assert any(problem in p for p in problems), problems
    with pytest.raises(ValueError, match="rule|gap|disabled"):
        ActivePlan.build(plan(**change), LINE)


def test_recirculation_needs_a_loop() -> None:
    assert "recirculate_unread needs a lane" in " ".join(check(plan(), [lane for lane in LINE if lane.number != 9]))


@pytest.mark.parametrize(
    "body",
    [
        {"version": 1, "rules": [{"name": "r", "verdict": "release", "lanes": [2, 2]}]},
        {"version": 1, "rules": [{"name": "r", "verdict": "release", "hold_reasons": ["duty"], "lanes": [2]}]},
        {"version": 1, "rules": [{"name": "r", "verdict": "hold", "groups": ["CX880"], "lanes": [3]}]},
        {"version": 1, "rules": [{"name": "r", "verdict": "inspect", "lanes": [1]}]},
        {"version": 1, "rules": []},
        {"version": "1", "rules": [{"name": "r", "verdict": "release", "lanes": [2]}]},
        {"version": 1, "rules": [{"name": "r", "verdict": "release", "lanes": [2]}], "extra": 1},
        {"version": 1, "rules": [{"name": "r", "verdict": "release", "lanes": [2]},
                                 {"name": "r", "verdict": "release", "lanes": [8]}]},
    ],
)
def test_malformed_plans_do_not_parse(body: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SortPlan.model_validate(body)


def test_release_goes_to_its_rule_and_records_the_rule() -> None:
    p = place(ACTIVE, RELEASED, hit("release"))
    assert (p.lane, p.decision.lane, p.rule, p.overflowed) == (2, LaneClass.RELEASE, "release", False)
    assert p.decision.reasons == ("release_verdict",)


def test_a_consolidation_group_goes_to_its_lane() -> None:
    p = place(ACTIVE, RELEASED, hit("release", group="KE612"))
    assert (p.lane, p.decision.lane, p.rule) == (7, LaneClass.CONSOLIDATION, "ke612")


def test_a_full_lane_overflows_to_the_next_of_its_rule() -> None:
    p = place(ACTIVE, RELEASED, hit("release", group="CX880"), full_bits=1 << (5 - 1))
    assert (p.lane, p.overflowed, p.decision.lane) == (6, True, LaneClass.CONSOLIDATION)


def test_all_lanes_of_a_rule_full_is_inspection_and_says_so() -> None:
    p = place(ACTIVE, RELEASED, hit("release", group="KE612"), full_bits=1 << (7 - 1))
    assert (p.lane, p.decision.lane, p.decision.reasons) == (1, LaneClass.INSPECTION, ("lane_full",))
    assert not p.decision.released


def test_a_full_lane_affects_only_parcels_bound_for_it() -> None:
    full = 1 << (7 - 1)
    assert place(ACTIVE, RELEASED, hit("release", group="CX880"), full_bits=full).lane == 5
    assert place(ACTIVE, RELEASED, hit("release"), full_bits=full).lane == 2


def test_a_disabled_lane_is_skipped_and_an_all_disabled_rule_says_so() -> None:
    active = ActivePlan.build(plan(disabled_lanes=[2]), LINE)
    assert place(active, RELEASED, hit("release")).lane == 8
    active = ActivePlan.build(plan(disabled_lanes=[7]), LINE)
    assert place(active, RELEASED, hit("release", group="KE612")).decision.reasons == ("lane_disabled",)


def test_hold_goes_to_the_hold_lane_for_its_reason_and_is_never_a_release() -> None:
    held = Decision(LaneClass.INSPECTION, ("verdict_hold",), "JD014600006281234567")
    p = place(ACTIVE, held, hit("hold", hold_reason="other_agency"))
    assert (p.lane, p.decision.lane, p.rule) == (4, LaneClass.HOLD, "hold-oga")
    assert not p.decision.released
    assert place(ACTIVE, held, hit("hold", hold_reason="documents")).lane == 3
    # a reason no rule takes, or none at all: inspection with the hold reason, as on a two-lane line
    for why in ("tax", None):
        p = place(ACTIVE, held, hit("hold", hold_reason=why))
        assert (p.lane, p.decision.lane, p.decision.reasons) == (1, LaneClass.INSPECTION, ("verdict_hold",))


def test_a_hold_with_any_other_problem_is_inspection() -> None:
    held = Decision(LaneClass.INSPECTION, ("verdict_hold", "image_flagged"), "JD014600006281234567")
    assert place(ACTIVE, held, hit("hold", hold_reason="duty")).lane == 1
    sick = Decision(LaneClass.INSPECTION, ("verdict_hold", "line_unhealthy"), "JD014600006281234567")
    assert place(ACTIVE, sick, hit("hold", hold_reason="duty")).lane == 1


def test_nothing_but_a_full_pass_reaches_release_or_consolidation() -> None:
    for reasons in (("verdict_inspect",), ("unknown_waybill",), ("multi_read",), ("line_unhealthy",), ("late",)):
        d = Decision(LaneClass.INSPECTION, reasons, "JD014600006281234567")
        p = place(ACTIVE, d, hit("release", group="CX880"))
        assert (p.lane, p.decision.lane, p.decision.reasons) == (1, LaneClass.INSPECTION, reasons)


def test_unread_parcels_go_round_the_loop_up_to_the_limit() -> None:
    unread = Decision(LaneClass.INSPECTION, ("reader_timeout", "no_read"), None)
    for rounds in (0, 1):
        p = place(ACTIVE, unread, None, rounds=rounds)
        assert (p.lane, p.decision.lane) == (9, LaneClass.RECIRCULATION)
        assert p.decision.reasons == ("reader_timeout", "no_read", "recirculated")
    p = place(ACTIVE, unread, None, rounds=2)
    assert (p.lane, p.decision.reasons) == (1, ("reader_timeout", "no_read", "recirculation_limit"))
    # a full loop, or anything else wrong with the parcel: inspection at once
    assert place(ACTIVE, unread, None, full_bits=1 << 8).lane == 1
    assert place(ACTIVE, Decision(LaneClass.INSPECTION, ("no_read", "line_unhealthy")), None).lane == 1


def test_a_release_no_rule_places_is_inspection() -> None:
    only_groups = plan(rules=[{"name": "cx", "verdict": "release", "groups": ["CX880", "KE612"], "lanes": [5]},
                              {"name": "h", "verdict": "hold", "lanes": [3]}], hold_reasons=[],
                       recirculate_unread=0)
    active = ActivePlan.build(only_groups, [lane if lane.number != 3 else Lane(3, "hold", 2) for lane in LINE])
    p = place(active, RELEASED, hit("release", group="LH733"))
    assert (p.lane, p.decision.reasons, p.rule) == (1, ("plan_unplaced",), None)


def test_the_default_plan_is_the_two_lane_line() -> None:
    two = [Lane(1, "inspection"), Lane(2, "release", 1)]
    active = ActivePlan.build(default_plan(two), two)
    assert active.version == 0
    assert place(active, RELEASED, hit("release", group="CX880")).lane == 2
    held = Decision(LaneClass.INSPECTION, ("verdict_hold",), "JD014600006281234567")
    assert place(active, held, hit("hold", hold_reason="duty")).lane == 1
    unread = Decision(LaneClass.INSPECTION, ("no_read",))
    assert place(active, unread, None).decision.reasons == ("no_read",)
    assert PlanRule(name="release", verdict="release", lanes=[2]) == active.plan.rules[0]


def test_the_simulated_line_is_the_example_config_and_runs_the_example_plan() -> None:
    from pathlib import Path

    from agent.config import load_config
    from agent.service.plan_cli import read_plan
    from hw_sim import sortline

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "config" / "sortgate.sortplan.example.toml")
    lanes = [(lane.number, lane.name, lane.role, lane.gate, tuple(lane.hold_reasons) if lane.hold_reasons else None)
             for lane in cfg.lanes]
    assert lanes == list(sortline.LANES)
    example = read_plan(root / "config" / "plans" / "example.toml")
    assert sortline.problems(example) == []
    update = sortline.derive_update(example)
    assert sortline.problems(update) == [] and update["version"] == example["version"] + 1
    assert update["disabled_lanes"] == [5]
    assert "does not exist" in " ".join(sortline.problems({**example, "disabled_lanes": [16]}))
