"""The MQTT contract against a real mosquitto on loopback: complete, durable and secure."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.central.mqtt import MqttLink, TlsSettings
from agent.central.security import generate_keypair, sign_item
from firmware_bridge import contract as c
from hw_sim.broker import Mosquitto
from hw_sim.harness import LineRun, RunSpec, run_line
from hw_sim.plan import Mix, make_plan
from tests.integration.certs import make_pki
from tests.integration.test_line import assert_no_parcel_got_another_parcels_code

pytestmark = pytest.mark.integration
SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"
CLEAN = Mix(reader_misread=0.0)


@pytest.fixture
def own_broker() -> Iterator[Mosquitto]:
    """A broker of this test's own, for tests that stop and start it."""
    with Mosquitto() as m:
        yield m


class Capture:
    """A plain MQTT subscriber that keeps every message it gets, in order."""

    def __init__(self, port: int, *topics: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"cap-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda cl, u, f, rc, p: ([cl.subscribe(t, qos=1) for t in topics], self._ready.set())
        self.client.on_message = lambda cl, u, msg: self.messages.append((msg.topic, bytes(msg.payload)))
        self.port = port

    def __enter__(self) -> Capture:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def command(run: LineRun, body: dict[str, Any], **props: Any) -> None:
    assert run.central is not None
    run.central.publish_raw(f"{run.topic_root}/cmd", json.dumps({"schema": "sortgate.command/1", **body}).encode(), **props)


async def test_every_message_on_the_wire_matches_its_schema(broker: Mosquitto, line_name: str) -> None:
    root = f"sortgate/SIM/{line_name}"

    def commands(run: LineRun) -> None:
        command(run, {"command": "status", "request_id": "s1"})
        command(run, {"command": "set_mode", "mode": "inspect_all", "request_id": "m1"},
                ResponseTopic=f"{root}/cmd/reply", CorrelationData=b"c1")
        command(run, {"command": "set_mode", "mode": "normal", "request_id": "m2"})

    def jam(run: LineRun) -> None:
        run.model.set_fault_bits(c.StatusBit.JAM, True)

    def unjam(run: LineRun) -> None:
        run.model.set_fault_bits(c.StatusBit.JAM, False)

    plan = make_plan(50, rate=8, seed=21, mix=CLEAN)
    spec = RunSpec(plan=plan, line=line_name, rate=8, push_fraction=0.7,
                   chaos_steps=[(1.0, commands), (2.0, jam), (2.6, unjam)])
    with Capture(broker.port, f"{root}/#") as cap:
        _, m = await run_line(spec, broker=broker)
        await asyncio.sleep(0.5)
    kinds: Counter[str] = Counter()
    for _topic, payload in cap.messages:
        data = json.loads(payload)
        name = data["schema"].removeprefix("sortgate.").split("/")[0]
        _validator(name).validate(data)
        kinds[name] += 1
    # everything the agent emits, and everything central sends it, was seen and is valid
    assert {"parcel", "alarm", "stats", "status", "verdict_request", "command_reply"} <= set(kinds), kinds
    assert {"verdicts", "verdict_answer", "command"} <= set(kinds), kinds
    assert kinds["parcel"] == 50 and m["records_published"] == 50
    assert m["wrongly_released"] == 0
    alarms = [json.loads(p) for t, p in cap.messages if t.endswith("/alarms")]
    assert [(a["alarm"], a["active"]) for a in alarms if a["alarm"] == "jam"] == [("jam", True), ("jam", False)]


async def test_records_published_during_a_broker_outage_arrive_in_order(own_broker: Mosquitto, line_name: str) -> None:
    plan = make_plan(80, rate=10, seed=22, mix=CLEAN)
    spec = RunSpec(plan=plan, line=line_name, rate=10, chaos_steps=[(2.0, "broker-stop"), (5.0, "broker-start")])
    run, m = await run_line(spec, broker=own_broker, keep=True)
    try:
        assert run.central is not None
        assert m["records_lost"] == 0 and m["records_unique"] == 80
        during = [t for t in run.truth if t.tracked and 2.2 < t.tracked.t_trigger - run.model.t0 - 0.5 < 4.5]
        assert len(during) >= 15  # parcels that left the belt while the broker was down
        seqs = [run.central.records[rid]["seq"] for rid in run.central.record_order]
        assert seqs == sorted(seqs), "records arrived out of order"
        assert m["wrongly_released"] == 0
    finally:
        run.cleanup()


async def test_records_of_an_agent_killed_while_the_broker_was_down_arrive_after_restart(
    own_broker: Mosquitto, line_name: str
) -> None:
    plan = make_plan(90, rate=10, seed=23, mix=CLEAN)
    steps = [(2.0, "broker-stop"), (3.0, "agent-kill"), (4.0, "agent-start"), (6.0, "broker-start")]
    run, m = await run_line(RunSpec(plan=plan, line=line_name, rate=10, chaos_steps=steps),
                            broker=own_broker, keep=True)
    try:
        assert run.central is not None
        assert m["records_lost"] == 0 and m["records_unique"] == 90, m
        assert m["agent_starts"] == 2
        records = list(run.central.records.values())
        # parcels decided by the killed agent whose results came after it died: the new agent
        # recorded them with the old agent's decision, read back from disk
        killed = [t for t in run.truth if t.tracked and t.tracked.t_cmd_accepted and
                  t.tracked.t_cmd_accepted < run.model.t0 + 0.5 + 3.0 and
                  t.tracked.t_trigger + run.model.exit_delay_s() > run.model.t0 + 0.5 + 3.0]
        assert killed
        by_seq = {r["seq"]: r for r in records}
        for t in killed:
            assert by_seq[t.tracked.seq]["decision"] is not None  # type: ignore[union-attr]
        assert any(r.get("note") for r in records)  # parcels that passed while no agent ran
        assert m["wrongly_released"] == 0
        # frames of parcels triggered before the restart never go to parcels after it
        assert_no_parcel_got_another_parcels_code(run)
    finally:
        run.cleanup()


async def test_tls_with_client_certificates(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, ["agent-L1"])
    ca = pki["ca"][0]
    with Mosquitto(tls=(ca, *pki["server"])) as broker:
        acks: list[int] = []
        got: list[tuple[str, bytes]] = []

        def link(tls: TlsSettings) -> MqttLink:
            return MqttLink(
                host="127.0.0.1", port=broker.port, client_id=f"tls-{uuid.uuid4().hex[:6]}",
                topic_root="sortgate/SIM/TLS", keepalive_s=10, reconnect_max_s=1,
                on_message=lambda t, p, meta: got.append((t, p)), on_ack=acks.append,
                birth=lambda: {"schema": "sortgate.status/1", "state": "online"}, tls=tls,
            )

        good = link(TlsSettings(ca, *pki["agent-L1"]))
        good.start()
        try:
            await asyncio.wait_for(good.connected.wait(), 10)
            mid = good.publish("sortgate/SIM/TLS/parcels", b"{}", qos=1)
            for _ in range(100):
                if mid in acks:
                    break
                await asyncio.sleep(0.05)
            assert mid in acks
            assert "agent-L1" in broker.log_text()  # the certificate's CN is the identity
        finally:
            good.stop()
        anonymous = link(TlsSettings(ca))  # TLS, but no client certificate
        anonymous.start()
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anonymous.connected.wait(), 3)
        finally:
            anonymous.stop()


async def test_forged_unsigned_expired_and_replayed_verdicts_are_rejected(
    broker: Mosquitto, line_name: str, tmp_path: Path
) -> None:
    private, public = generate_keypair()
    attacker, _ = generate_keypair()
    keys = tmp_path / "trusted.keys"
    keys.write_text(f"# central risk system\ncentral-1 {public}\n")
    mix = Mix(inspect=0.4, hold=0.0, no_verdict=0.0, noread=0.0, multi=0.0, bad_check=0.0, reader_misread=0.0)
    plan = make_plan(60, rate=8, seed=24, mix=mix)
    targets = [p for p in plan.parcels if p.verdict == "inspect" and p.index >= 25][:4]
    assert len(targets) == 4

    def item(waybill: str, verdict: str, issued: datetime, expires: datetime) -> dict[str, Any]:
        return {"waybill": waybill, "verdict": verdict, "verdict_id": uuid.uuid4().hex[:12],
                "issued_at": issued.isoformat(), "expires_at": expires.isoformat()}

    def attack(run: LineRun) -> None:
        assert run.central is not None
        now = datetime.now(UTC)
        day = timedelta(days=1)
        forged = sign_item(item(targets[0].codes[0], "release", now, now + day), attacker, "central-1")
        unsigned = item(targets[1].codes[0], "release", now, now + day)
        expired = sign_item(item(targets[2].codes[0], "release", now - 2 * day, now - day), private, "central-1")
        # a genuine but old "release", replayed after central's newer "inspect"
        replayed = sign_item(item(targets[3].codes[0], "release", now - timedelta(hours=1), now + day),
                             private, "central-1")
        run.central.push_items([forged, unsigned, expired, replayed])

    def status(run: LineRun) -> None:
        command(run, {"command": "status", "request_id": "after-attack"})

    spec = RunSpec(
        plan=plan, line=line_name, rate=8, signing=(private, "central-1"), push_fraction=0.8,
        extra_config=f'[verdicts]\nrequire_signatures = true\ntrusted_keys_file = "{keys}"\n',
        chaos_steps=[(0.5, attack), (plan.duration_s - 1.0, status)],
    )
    run, m = await run_line(spec, broker=broker, keep=True)
    try:
        assert run.central is not None
        for p in targets:
            truth = run.truth[p.index]
            assert truth.reached == "inspection", p
        assert m["wrongly_released"] == 0
        # signed verdicts, pushed or answered to look-ups, were acted on
        assert m["released"] == m["expected_release"] > 0
        reply = next(r for r in run.central.replies if r["request_id"] == "after-attack")
        counters = reply["result"]["counters"]
        for reason in ("bad_signature", "unsigned", "expired", "replayed"):
            assert counters.get(f"verdicts_rejected_{reason}", 0) >= 1, (reason, counters)
        assert any(a["alarm"] == "verdict_rejected" for a in run.central.alarms)
    finally:
        run.cleanup()


async def test_bad_input_is_reported_and_never_crashes_or_changes_a_lane(broker: Mosquitto, line_name: str) -> None:
    plan = make_plan(50, rate=8, seed=25, mix=Mix(inspect=0.3, reader_misread=0.0))
    target = next(p for p in plan.parcels if p.verdict == "inspect" and p.index >= 20)

    def garbage(run: LineRun) -> None:
        assert run.central is not None
        root = run.topic_root
        now = datetime.now(UTC).isoformat()
        run.central.publish_raw(f"{root}/verdicts", b"{not json")
        run.central.publish_raw(f"{root}/verdicts", b"[1, 2, 3]")
        run.central.publish_raw(f"{root}/verdicts", json.dumps({"schema": "sortgate.verdicts/9", "batch_id": "x", "verdicts": []}).encode())
        run.central.publish_raw(f"{root}/verdicts", b'{"schema":"sortgate.verdicts/1","batch_id":"big","verdicts":[' + b'{"waybill":"AAAA"},' * 80_000 + b"{}]}")
        bad_item = {"waybill": target.codes[0], "verdict": "release-now", "verdict_id": "x1", "issued_at": now}
        no_zone = {"waybill": target.codes[0], "verdict": "release", "verdict_id": "x2", "issued_at": "2026-11-30T08:00:00"}
        run.central.publish_raw(f"{root}/verdicts", json.dumps({"schema": "sortgate.verdicts/1", "batch_id": "mixed", "verdicts": [bad_item, no_zone]}).encode())
        run.central.publish_raw(f"{root}/cmd", json.dumps({"schema": "sortgate.command/1", "command": "self_destruct", "request_id": "bad1"}).encode())
        run.central.publish_raw(f"{root}/cmd", b"\xff\xfe\x00")
        for _ in range(3000):  # a flood
            run.central.client.publish(f"{root}/verdicts", b"{}", qos=0)

    spec = RunSpec(plan=plan, line=line_name, rate=8, chaos_steps=[(1.0, garbage)])
    run, m = await run_line(spec, broker=broker, keep=True)
    try:
        assert run.central is not None
        assert run.agent is not None and run.agent.returncode == 0  # it kept running, and stopped cleanly
        assert m["records_published"] == 50 and m["wrongly_released"] == 0
        assert run.truth[target.index].reached == "inspection"
        reply = next(r for r in run.central.replies if r["request_id"] == "bad1")
        assert reply["ok"] is False and "unknown command 'self_destruct'" in reply["error"]
        assert any(r["ok"] is False and "invalid command" in r["error"] for r in run.central.replies)
        kinds = {a["alarm"] for a in run.central.alarms}
        assert {"inbound_invalid", "inbound_flood"} <= kinds, kinds
        log = run.agent_log.read_text()
        for problem in ("not JSON", "not a JSON object", "exceeds", "timestamps need a timezone", "verdict"):
            assert problem in log, problem
    finally:
        run.cleanup()


async def test_two_lines_share_a_broker_and_consumers_share_the_load(broker: Mosquitto) -> None:
    lines = [f"S{uuid.uuid4().hex[:4]}", f"S{uuid.uuid4().hex[:4]}"]
    received: list[list[str]] = [[], []]
    clients = []
    for i in range(2):
        cl = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"consumer-{i}-{uuid.uuid4().hex[:4]}",
                         protocol=mqtt.MQTTv5)
        cl.on_message = lambda c_, u, msg, box=received[i]: box.append(json.loads(msg.payload)["record_id"])
        cl.connect("127.0.0.1", broker.port)
        cl.subscribe("$share/central/sortgate/SIM/+/parcels", qos=1)
        cl.loop_start()
        clients.append(cl)
    try:
        await asyncio.sleep(0.5)
        specs = [RunSpec(plan=make_plan(40, rate=6, seed=30 + i, mix=CLEAN), line=ln, rate=6) for i, ln in enumerate(lines)]
        results = await asyncio.gather(*(run_line(s, broker=broker, keep=True) for s in specs))
        ids_by_line = []
        for (run, m), ln in zip(results, lines, strict=True):
            assert run.central is not None
            assert m["records_published"] == 40 and m["wrongly_released"] == 0
            assert all(r["line"] == ln for r in run.central.records.values())  # no cross-talk
            ids_by_line.append(set(run.central.records))
            run.cleanup()
        await asyncio.sleep(1.0)
        a, b = set(received[0]), set(received[1])
        assert a and b  # both consumers took part
        assert not a & b  # each record went to one consumer of the group
        assert a | b == ids_by_line[0] | ids_by_line[1]
    finally:
        for cl in clients:
            cl.disconnect()
            cl.loop_stop()


async def test_a_full_outbox_stops_releases_until_records_can_be_stored(own_broker: Mosquitto, line_name: str) -> None:
    """No release without a record: while the outbox is at its budget, everything is inspected."""
    plan = make_plan(170, rate=10, seed=26, mix=CLEAN)
    spec = RunSpec(
        plan=plan, line=line_name, rate=10, extra_config="[outbox]\nmax_records = 100\n",
        chaos_steps=[(0.5, "broker-stop"), (plan.duration_s - 1.0, "broker-start")],
    )
    run, m = await run_line(spec, broker=own_broker, keep=True)
    try:
        assert run.central is not None
        records = list(run.central.records.values())
        full = [r for r in records if "outbox_unavailable" in r["line_problems"]]
        assert len(full) >= 20  # parcels decided while the outbox was full
        assert all(r["decision"]["lane_class"] == "inspection" for r in full)
        assert all("line_unhealthy" in r["decision"]["reasons"] for r in full)
        assert any(r["decision"]["lane_class"] == "release" for r in records if r not in full)
        assert m["records_lost"] == 0 and m["wrongly_released"] == 0  # every record still arrived
        assert "cannot store parcel record; releasing stops" in run.agent_log.read_text()
    finally:
        run.cleanup()
