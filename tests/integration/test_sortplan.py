"""A line with a sort plan, over real wires: hold lanes, consolidation lanes, overflow, the loop,
and plans from central applied whole or refused whole. The line is hw_sim/sortline.py's (the
example config's lanes); ground truth is on the simulator's side."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from agent.central.security import generate_keypair, sign_item
from hw_sim import sortline
from hw_sim.broker import Mosquitto
from hw_sim.harness import LineRun, RunSpec, run_line
from hw_sim.plan import Mix, make_plan

pytestmark = pytest.mark.integration

PLAN = tomllib.loads((Path(__file__).resolve().parents[2] / "config" / "plans" / "example.toml").read_text())
# many holds and unreadable labels, so that a short run holds each case many times
MIX = Mix(inspect=0.1, hold=0.15, no_verdict=0.02, noread=0.1, multi=0.0, bad_check=0.0, reader_misread=0.0)
SORT = sortline.SortMix(sortline.HOLD_REASONS, sortline.GROUPS, grouped=0.7, readable_again=0.5)


def publish(run: LineRun, body: dict[str, Any], private: str | None = None) -> None:
    """Central (or whoever holds ``private``) publishes a plan message for this line."""
    assert run.central is not None
    message = run.central.plan_message(body, run.spec.site, run.spec.line)
    if private is not None:
        message = sign_item(message, private, "central-1")
    run.central.publish_raw(f"{run.topic_root}/plan", json.dumps(message).encode())


async def test_holds_groups_the_loop_and_plans_from_central(broker: Mosquitto, line_name: str) -> None:
    """Hold verdicts reach the hold lane for their reason, consolidation groups their container;
    an unreadable parcel goes round the loop once and then to inspection; plans with an unknown
    lane, a gap or a forged signature are refused whole and the plan in force stays; a good one
    applies from the next parcel on."""
    plan = make_plan(160, rate=5, seed=61, mix=MIX, sort=SORT)
    attacker, _ = generate_keypair()
    unknown_lane = {**PLAN, "version": 2, "rules": [*PLAN["rules"][:-1], {"name": "release", "verdict": "release",
                                                                          "lanes": [2, 14]}]}
    gap = {**PLAN, "version": 2, "groups": [*PLAN["groups"], "AF185"]}
    update = sortline.derive_update(PLAN)  # version 2, lane 5 (CX880's container) out of use
    steps = [
        (6.0, lambda run: publish(run, unknown_lane)),
        (7.0, lambda run: publish(run, gap)),
        (8.0, lambda run: publish(run, {**PLAN, "version": 2}, private=attacker)),
    ]
    spec = RunSpec(plan=plan, line=line_name, rate=5, sort_plan=PLAN, plan_update=update, plan_update_at=16.0,
                   chaos_steps=steps)
    run, m = await run_line(spec, broker=broker, keep=True)
    try:
        assert run.central is not None
        assert m["wrongly_released"] == 0 and m["wrong_lane"] == 0, m["wrong_lane_examples"]
        assert m["late"] == 0 and m["records_published"] == m["parcels"]
        results = [(r["version"], r["accepted"], " ".join(r["problems"])) for r in run.central.plan_results]
        assert results[0][:2] == (2, False) and "lane 14 does not exist" in results[0][2], results
        assert results[1][:2] == (2, False) and "gap: group 'AF185'" in results[1][2], results
        assert results[2] == (2, False, "signature: bad_signature"), results
        assert results[3][:2] == (2, True), results
        assert any(a["alarm"] == "plan_refused" for a in run.central.alarms)
        records = run.central.records_by_parcel()
        versions = [((records.get(t.key) or {}).get("decision") or {}).get("plan", {}).get("version")
                    for t in sorted(run.truth, key=lambda t: t.tracked.t_trigger if t.tracked else 0)]
        first_v2 = versions.index(2)
        assert set(versions[:first_v2]) <= {1, None} and set(versions[first_v2:]) <= {2, None}  # whole, in order
        assert first_v2 > 40  # not before central sent it (16 s in, 5 parcels a second)
        held = grouped = looped = limited = 0
        for t in run.truth:
            p, rec = t.planned, records[t.key]
            d = rec["decision"]
            plan_then = update if d["plan"]["version"] == 2 else PLAN
            if p.label == "ok" and p.verdict == "hold":
                rule = sortline.rule_for(p, plan_then)
                if rule is None:  # "tax": no rule takes it, so inspection, as on a two-lane line
                    assert t.lane_reached == 1 and d["reasons"] == ["verdict_hold"], (p, d)
                else:
                    assert t.lane_reached == rule["lanes"][0] and d["lane_class"] == "hold", (p, d)
                    assert d["plan"]["rule"] == rule["name"] and rec["verdict"]["hold_reason"] == p.hold_reason
                    held += 1
            if p.label == "ok" and p.verdict == "release" and p.group in ("KE612", "LH733", "SQ001"):
                rule = sortline.rule_for(p, plan_then)
                assert rule is not None and t.lane_reached == rule["lanes"][0], (p, d)
                assert d["lane_class"] == "consolidation" and rec["verdict"]["group"] == p.group
                grouped += 1
            if p.label == "ok" and p.verdict == "release" and p.group == "CX880" and d["plan"]["version"] == 2:
                assert t.lane_reached == 9 and d["plan"]["overflowed"], (p, d)  # lane 5 disabled by v2
            if p.label == "noread" and t.pass_no == 0:
                assert t.disposition == "recirculated" and d["lane_class"] == "recirculation", (p, d)
                assert d["reasons"][-1] == "recirculated"
                looped += 1
            if p.label == "noread" and t.pass_no == 1:
                assert rec["trigger"]["rounds"] == 1 and rec["trigger"]["prev_seq"] == t.prev_seq
                if p.readable_on_pass is None:  # still unread after the limit: inspection
                    assert t.lane_reached == 1 and d["reasons"][-1] == "recirculation_limit", (p, d)
                    limited += 1
                else:
                    assert t.lane_reached in sortline.allowed(p, 1, run.plans_used)
        assert held >= 8 and grouped >= 20 and looped >= 8 and limited >= 2, (held, grouped, looped, limited)
        assert m["recirculated"] == looped
    finally:
        run.cleanup()


async def test_a_full_lane_overflows_and_the_rest_of_the_line_keeps_flowing(broker: Mosquitto, line_name: str) -> None:
    """CX880's container holds four parcels and nobody empties it: once full, CX880 parcels go to
    the consolidation overflow lane; every other lane keeps taking its parcels (no line_unhealthy),
    and the lane's alarm names it."""
    sort = sortline.SortMix(sortline.HOLD_REASONS, ("CX880", "KE612"), grouped=0.8)
    plan = make_plan(120, rate=8, seed=62, mix=Mix(inspect=0.1, hold=0.0, no_verdict=0.0, noread=0.0, multi=0.0,
                                                   bad_check=0.0, reader_misread=0.0), sort=sort)
    capacity = {**sortline.CAPACITY, 5: (4, 0.0)}
    spec = RunSpec(plan=plan, line=line_name, rate=8, sort_plan=PLAN,
                   controller_overrides={"lane_capacity": capacity})
    run, m = await run_line(spec, broker=broker, keep=True)
    try:
        assert run.central is not None
        assert m["wrongly_released"] == 0 and m["wrong_lane"] == 0 and m["late"] == 0
        assert m["lane_full_events"] == 1 and m["overflowed"] > 5, m
        records = run.central.records_by_parcel()
        cx = [t for t in run.truth if t.planned.group == "CX880" and t.planned.verdict == "release"]
        lanes = [t.lane_reached for t in cx]
        assert lanes[:4] == [5, 5, 5, 5] and set(lanes[5:]) == {9}, lanes  # (the 5th may race the sensor)
        ke = [t for t in run.truth if t.planned.group == "KE612" and t.planned.verdict == "release"]
        assert ke and all(t.lane_reached == 6 for t in ke)
        late_ke = [t for t in ke if t.tracked and t.tracked.t_trigger > cx[5].tracked.t_trigger]  # type: ignore[union-attr]
        assert late_ke, "KE612 parcels after lane 5 filled"
        assert not any("line_unhealthy" in (records[t.key]["decision"] or {}).get("reasons", []) for t in run.truth)
        full = [a for a in run.central.alarms if a["alarm"] == "lane_full"]
        assert full and full[0]["subject"] == "5" and full[0]["active"] is True, full
    finally:
        run.cleanup()
