"""A hostile network against a real mosquitto: nothing a broker client sends can crash, stall, deafen
or loosen the agent (issue 13's findings, each reproduced and shown fixed)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.central.security import generate_keypair, sign_item
from hw_sim.broker import Mosquitto
from hw_sim.harness import LineRun, RunSpec, forged_batches, run_line, verdict_flood
from hw_sim.plan import Mix, make_plan

pytestmark = pytest.mark.integration
CLEAN = Mix(reader_misread=0.0)


def command(run: LineRun, body: dict[str, Any], **props: Any) -> None:
    assert run.central is not None
    run.central.publish_raw(f"{run.topic_root}/cmd", json.dumps({"schema": "sortgate.command/1", **body}).encode(),
                            **props)


def reply(run: LineRun, request_id: str) -> dict[str, Any]:
    assert run.central is not None
    return next(r for r in run.central.replies if r["request_id"] == request_id)


async def test_a_malformed_lookup_answer_never_releases(broker: Mosquitto, line_name: str) -> None:
    """"found": "yes", 1, "true" (strings and numbers are not booleans) with a genuine release:
    invalid, inspection. "found": "false" is no more a miss than a hit: invalid too."""
    plan = make_plan(40, rate=5, seed=31, mix=Mix(inspect=0.0, hold=0.0, no_verdict=0.0, noread=0.0, multi=0.0,
                                                  bad_check=0.0, reader_misread=0.0))
    bad = ["yes", 1, "true", "false", 0]
    tampered: dict[str, Any] = {}

    def tamper(answer: dict[str, Any]) -> dict[str, Any]:
        n = len(tampered)
        if n % 2 == 0:  # every other answer is tampered with; the rest show look-ups work
            answer = {**answer, "found": bad[(n // 2) % len(bad)]}
        tampered[answer["waybill"]] = answer["found"]
        return answer

    spec = RunSpec(plan=plan, line=line_name, rate=5, push_fraction=0.0)
    run = LineRun(spec, broker)
    try:
        task_run = run.run()

        async def hook() -> None:
            while run.central is None:  # noqa: ASYNC110 - bounded by the run's own start-up
                await asyncio.sleep(0.01)
            run.central.tamper = tamper

        hooker = asyncio.create_task(hook())
        m = await task_run
        hooker.cancel()
        records = run.central.records_by_seq()  # type: ignore[union-attr]
        wrong = [w for w, f in tampered.items() if f is not True]
        assert len(wrong) >= 10
        for t in run.truth:
            rec = records[t.tracked.seq]  # type: ignore[union-attr]
            if rec["waybill"] in wrong:
                assert t.reached == "inspection", rec
                assert rec["verdict"]["status"] == "invalid", rec["verdict"]
        assert m["wrongly_released"] == 0
        assert m["released"] >= 10  # genuine answers still release
    finally:
        await run.stop_agent()
        run.cleanup()


async def test_hostile_commands_leave_the_agent_alive_listening_and_stoppable(
    broker: Mosquitto, line_name: str
) -> None:
    """50 rounds of status commands whose response topic is a wildcard or one of the agent's own
    output topics (some retained, which the broker replays at every restart): the agent stays up,
    answers on its reply topic, publishes nothing foreign on its outputs, still answers a good
    command on an allowed reply topic, survives a restart with the retained ones on the broker,
    and stops on SIGTERM."""
    plan = make_plan(70, rate=5, seed=32, mix=CLEAN)
    root = f"sortgate/SIM/{line_name}"
    # (a NUL is refused by the broker itself: MQTT forbids U+0000 in strings; see the unit tests)
    evil = [f"{root}/+", f"{root}/#", f"{root}/cmd/#", f"{root}/+/reply", f"{root}/parcels", f"{root}/status",
            "elsewhere/reply", f"{root}/cmd/replyX", f"{root}/cmd/reply/+"]

    def attack(run: LineRun) -> None:
        for i in range(50):
            topic = evil[i % len(evil)]
            command(run, {"command": "status", "request_id": f"evil-{i}"}, ResponseTopic=topic)
        for _ in range(2):  # retained: replayed to the agent on every subscribe
            assert run.central is not None
            body = {"schema": "sortgate.command/1", "command": "status", "request_id": "retained"}  # live: a normal command
            run.central.client.publish(f"{root}/cmd", json.dumps(body), qos=1, retain=True)

    def good(run: LineRun) -> None:
        command(run, {"command": "status", "request_id": "good-1"}, ResponseTopic=f"{root}/cmd/reply/console-7")

    spec = RunSpec(plan=plan, line=line_name, rate=5, chaos_steps=[
        (2.0, attack), (5.0, good), (6.0, "agent-kill"), (7.0, "agent-start"),
    ])
    run, m = await run_line(spec, broker=broker, keep=True)
    try:
        assert run.central is not None
        assert m["records_published"] == 70 and m["wrongly_released"] == 0, run.agent_log_tail(60)
        assert run.agent is not None and run.agent.returncode == 0  # alive to the end, and stopped cleanly
        refused = [r for r in run.central.replies if str(r["request_id"]).startswith("evil-")]
        assert len(refused) >= 50 and all(r["ok"] is False and "refused" in r["error"] for r in refused)
        i = run.central.replies.index(reply(run, "good-1"))
        assert reply(run, "good-1")["ok"] is True
        assert run.central.reply_topics[i] == f"{root}/cmd/reply/console-7"
        assert set(run.central.reply_topics) <= {f"{root}/cmd/reply", f"{root}/cmd/reply/console-7"}
        assert run.central.foreign == []  # nothing landed on parcels/status
        assert "retained message on an input topic" in run.agent_log.read_text()
    finally:
        run.central.client.publish(f"{root}/cmd", b"", qos=1, retain=True)  # type: ignore[union-attr]
        run.cleanup()


@pytest.mark.timeout(900)
async def test_sigterm_always_stops_the_agent_within_seconds(broker: Mosquitto, line_name: str) -> None:
    """A hundred consecutive starts, each hit by hostile commands and then SIGTERM while parcels
    flow: every one stops cleanly (exit 0, not the 5 s hard stop) within seconds."""
    plan = make_plan(2400, rate=4, seed=33, mix=CLEAN)  # outlasts the stops; cancelled after them
    spec = RunSpec(plan=plan, line=line_name, rate=4)
    run = LineRun(spec, broker)

    async def scenario() -> list[float]:
        took = []
        feeder = asyncio.create_task(run.run())
        while run.central is None or run.agent is None:  # noqa: ASYNC110 - bounded by the run's start-up
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        for i in range(100):
            if i:
                run.start_agent()
                await run._wait_ready()
            for topic in (f"{run.topic_root}/#", f"{run.topic_root}/+"):
                command(run, {"command": "status", "request_id": f"z{i}"}, ResponseTopic=topic)
            await asyncio.sleep(0.2)
            proc = run.agent
            assert proc is not None and proc.poll() is None, run.agent_log_tail()
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            for _ in range(100):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            took.append(time.monotonic() - t0)
            assert proc.poll() == 0, f"stop {i}: exit {proc.poll()} after SIGTERM\n{run.agent_log_tail()}"
        feeder.cancel()
        return took

    try:
        took = await scenario()
        assert max(took) < 4.0, took
    finally:
        await run.stop_agent()
        run.cleanup()


async def test_a_signature_flood_cannot_stall_the_line(broker: Mosquitto, line_name: str) -> None:
    """Six batches of 3,276 forged items (the finding's 952 KB): heartbeat gaps stay under 200 ms,
    genuine releases are released, nothing forged is believed, and the flood is alarmed."""
    plan = make_plan(80, rate=5, seed=34, mix=CLEAN)
    spec = RunSpec(plan=plan, line=line_name, rate=5, require_signatures=True, push_fraction=0.7,
                   forged=forged_batches(plan), chaos_steps=[(4.0, verdict_flood)])
    run, m = await run_line(spec, broker=broker, keep=True)
    try:
        assert run.central is not None
        assert m["heartbeat_gap_ms_max"] < 200, m
        assert m["wrongly_released"] == 0 and m["late"] == 0
        # Genuine releases are released. A reader frame is timestamped when the event loop reads
        # it; a batch is parsed and checked 128 items at a time (about 1 ms each) so a frame keeps
        # its window. One miss is tolerated for a loaded CI machine: that parcel is inspected
        # (safe), never released on a guess.
        missed = m["expected_release"] - m["released"]
        assert m["expected_release"] > 0 and missed <= 1, m["needless_inspections"]
        assert set(m["needless_inspections"]) <= {"reader_timeout"}, m["needless_inspections"]
        kinds = {(a["alarm"], a.get("reason")) for a in run.central.alarms}
        assert ("inbound_flood", "items") in kinds, kinds
        assert any(k == "verdict_rejected" for k, _ in kinds), kinds  # one event per 10 s, any reason
        assert '"reason": "bad_signature"' in run.agent_log.read_text()  # forged items did reach the check
    finally:
        run.cleanup()


async def test_loosening_needs_central_signature_and_the_mode_survives_restart(
    broker: Mosquitto, line_name: str
) -> None:
    private, _ = generate_keypair()
    attacker, _ = generate_keypair()
    plan = make_plan(90, rate=5, seed=35, mix=Mix(inspect=0.2, hold=0.0, no_verdict=0.0, noread=0.0, multi=0.0,
                                                  bad_check=0.0, reader_misread=0.0))
    # two releasable parcels get a second verdict with the very same issued_at: inspect stands
    same = [p for p in plan.parcels if p.expected_lane == "release" and 60 <= p.index < 80][:2]

    def signed(body: dict[str, Any], key: str = private) -> dict[str, Any]:
        return sign_item({"schema": "sortgate.command/1", **body}, key, "central-1")

    def step(body: dict[str, Any], signed_by: str | None = None) -> Any:
        def act(run: LineRun) -> None:
            assert run.central is not None
            b = {**body, "issued_at": datetime.now(UTC).isoformat()} if signed_by else body
            msg = signed(b, signed_by) if signed_by else {"schema": "sortgate.command/1", **b}
            run.central.publish_raw(f"{run.topic_root}/cmd", json.dumps(msg).encode())
        act.__name__ = f"cmd-{body.get('request_id')}"
        return act

    def equal_timestamps(run: LineRun) -> None:
        assert run.central is not None
        at = datetime.now(UTC) + timedelta(seconds=1)
        for p, order in zip(same, (("inspect", "release"), ("release", "inspect")), strict=True):
            for verdict in order:
                run.central.push_items([run.central.item(p.waybill or "", verdict, issued=at)])

    spec = RunSpec(plan=plan, line=line_name, rate=5, signing=(private, "central-1"), require_signatures=True,
                   chaos_steps=[
                       (1.0, equal_timestamps),
                       (3.0, step({"command": "set_mode", "mode": "inspect_all", "request_id": "tighten"})),
                       (4.0, step({"command": "set_mode", "mode": "normal", "request_id": "unsigned"})),
                       (5.0, step({"command": "set_mode", "mode": "normal", "request_id": "forged"}, attacker)),
                       (6.0, "agent-kill"), (7.0, "agent-start"),
                       (10.0, step({"command": "set_mode", "mode": "normal", "request_id": "signed-1"}, private)),
                       (11.0, step({"command": "set_mode", "mode": "normal", "request_id": "signed-1"}, private)),
                   ])
    run, m = await run_line(spec, broker=broker, keep=True)
    try:
        assert run.central is not None
        assert reply(run, "tighten")["ok"] is True
        assert reply(run, "unsigned")["ok"] is False and "refused" in reply(run, "unsigned")["error"]
        assert reply(run, "forged")["ok"] is False
        assert reply(run, "signed-1")["ok"] is True  # the first; the replay is a no-op or refused
        records = run.central.records_by_seq()
        by_index = {t.planned.index: records[t.tracked.seq] for t in run.truth if t.tracked}
        first = run.truth[0].tracked.t_trigger  # type: ignore[union-attr]

        def at(i: int) -> float:  # a parcel's trigger on the chaos clock
            return run.truth[i].tracked.t_trigger - first + plan.parcels[0].offset_s  # type: ignore[union-attr]

        # between tightening and the signed loosening, after the restart too: nothing released
        window = [i for i in by_index if 3.5 < at(i) < 9.5]
        assert window and all(run.truth[i].reached == "inspection" for i in window)
        restarted = [i for i in window if "mode_inspect_all" in (by_index[i].get("decision") or {}).get("reasons", [])]
        assert any(at(i) > 7.5 for i in restarted), "the restarted agent kept inspect_all"
        # after the signed command, releases again
        assert any(run.truth[i].reached == "release" for i in by_index if at(i) > 10.5)
        for p in same:
            assert run.truth[p.index].reached == "inspection"
        assert m["wrongly_released"] == 0
        assert any(a["alarm"] == "command_refused" for a in run.central.alarms)
    finally:
        run.cleanup()
