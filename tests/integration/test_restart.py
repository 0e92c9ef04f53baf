"""Agent restarts in the middle of a busy line: nothing is released on another parcel's evidence."""

from __future__ import annotations

import pytest

from hw_sim.broker import Mosquitto
from hw_sim.harness import RunSpec, run_line
from hw_sim.plan import Mix, make_plan
from tests.integration.test_line import assert_never_released_without_command, assert_no_parcel_got_another_parcels_code

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("seed", [51, 52])
async def test_restarts_never_hand_one_parcels_code_to_another(broker: Mosquitto, line_name: str, seed: int) -> None:
    # three kill/restart cycles while parcels (and their reader frames) are in flight
    plan = make_plan(120, rate=10, seed=seed, mix=Mix(inspect=0.4, reader_misread=0.0))
    steps = []
    for at in (2.0, 5.0, 8.0):
        steps += [(at, "agent-kill"), (at + 0.6, "agent-start")]
    run, m = await run_line(RunSpec(plan=plan, line=f"{line_name}s{seed}", rate=10, chaos_steps=steps),
                            broker=broker, keep=True)
    try:
        assert m["agent_starts"] == 4
        assert m["wrongly_released"] == 0 and m["missorted"] == 0
        assert m["records_lost"] == 0
        assert_no_parcel_got_another_parcels_code(run)
        assert_never_released_without_command(run)
    finally:
        run.cleanup()
