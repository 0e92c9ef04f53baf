"""Reader faults over real wires: a code stays with its parcel, and the agent says what happened.

Each fault is injected on the far side of a pty (hw_sim's reader), with and without the reader's
trigger counter, on a line the agent runs as its own process (docs/serial-readers.md, section 5).
"""

from __future__ import annotations

from typing import Any

import pytest

from hw_sim.broker import Mosquitto
from hw_sim.harness import LineRun, RunSpec, run_line
from hw_sim.plan import Mix, make_plan

pytestmark = pytest.mark.integration

#: parcel index -> the fault reader 1 has on it; far apart, so each stays a fault of its own
FAULTS = {6: "skip", 13: "duplicate", 20: "delay", 27: "reorder", 34: "restart", 42: "eye_miss", 50: "eye_double"}


def alarms(run: LineRun) -> list[dict[str, Any]]:
    assert run.central is not None
    return list(run.central.alarms)


def record(run: LineRun, index: int) -> dict[str, Any]:
    assert run.central is not None
    t = run.truth[index]
    assert t.tracked is not None
    return run.central.records_by_seq()[t.tracked.seq]


def assert_every_code_is_its_parcels(run: LineRun) -> None:
    for t in run.truth:
        if t.tracked is None:
            continue
        rec = record(run, t.planned.index)
        printed = set(t.planned.codes)
        for read in rec["reads"]:
            assert set(read["codes"]) <= printed, (t.planned.index, t.faults, rec["reads"], printed)
        assert rec["waybill"] in printed | {None}


@pytest.mark.parametrize("counter", [True, False], ids=["counter", "clock-only"])
async def test_each_reader_fault_keeps_codes_with_their_parcels(
    broker: Mosquitto, line_name: str, counter: bool
) -> None:
    plan = make_plan(58, rate=5, seed=21, mix=Mix(reader_misread=0.0, noread=0.0, multi=0.0, bad_check=0.0))
    spec = RunSpec(plan=plan, line=line_name, rate=5, reader_counter=counter,
                   fault_plan={(i, 0): f for i, f in FAULTS.items()})
    run, m = await run_line(spec, broker=broker, keep=True)
    try:
        assert m["wrong_identity"] == 0 and m["wrongly_released"] == 0
        assert m["records_published"] == 58
        assert_every_code_is_its_parcels(run)
        assert m["reader_faults"] == {f: 1 for f in FAULTS.values()}
        kinds = {(a["alarm"], a.get("reason")) for a in alarms(run)}
        log = run.agent_log.read_text()

        # a skipped cycle: its parcel has no read; nothing else moves
        skipped = record(run, 6)["reads"][0]
        assert skipped["timed_out"] and skipped["codes"] == []
        assert run.truth[7].reached == run.truth[7].planned.expected_lane
        # a duplicate costs nothing
        assert run.truth[13].reached == run.truth[13].planned.expected_lane
        # a late frame never reaches the next parcel: its own parcel times out
        for late in (20, 27):
            assert record(run, late)["reads"][0]["codes"] == [], record(run, late)["reads"]
        # the reboot's garbage is a framing error
        assert "reader framing error, skipped" in log
        # the missed parcel has no read
        assert record(run, 42)["reads"][0]["codes"] == []
        if counter:
            assert ("reader_counter_gap", "counter_gap") in kinds, kinds
            assert ("reader_frame_repeated", "duplicate") in kinds, kinds
            assert ("reader_counter_reset", "counter_reset") in kinds, kinds
            assert any(k == "reader_frame_unmatched" and r in ("late", "mismatch") for k, r in kinds), kinds
            assert record(run, 8)["reads"][0]["counter"] is not None
        else:
            assert ("reader_frame_repeated", "duplicate") in kinds, kinds
            assert any(k == "reader_frame_unmatched" for k, _ in kinds), kinds
    finally:
        run.cleanup()


async def test_a_reader_that_stops_matching_is_alarmed_and_its_parcels_inspected(
    broker: Mosquitto, line_name: str
) -> None:
    """Ten late frames in a row (a reader whose output fell behind): the reader is unmatched
    (alarm), its parcels go to inspection meanwhile, and the alarm clears once its frames match
    cleanly again."""
    plan = make_plan(40, rate=5, seed=22, mix=Mix(reader_misread=0.0))
    spec = RunSpec(plan=plan, line=line_name, rate=5, fault_plan={(i, 0): "delay" for i in range(10, 20)})
    run, m = await run_line(spec, broker=broker, keep=True)
    try:
        assert m["wrong_identity"] == 0 and m["wrongly_released"] == 0
        raised = [a for a in alarms(run) if a["alarm"] == "reader_unmatched"]
        assert [a["active"] for a in raised] == [True, False], raised
        assert raised[0]["subject"] == "reader1"
        unmatched = [i for i in range(len(run.truth)) if "reader_unmatched" in
                     (record(run, i).get("decision") or {}).get("reasons", [])]
        assert unmatched, "parcels read while the reader was unmatched go to inspection"
        assert all(run.truth[i].reached == "inspection" for i in unmatched)
        assert run.truth[-1].reached == run.truth[-1].planned.expected_lane  # and it recovers
    finally:
        run.cleanup()
