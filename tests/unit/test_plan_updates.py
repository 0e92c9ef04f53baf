"""Sort plans from central, in-process: applied whole or refused whole, kept across a restart.
A fake MQTT link (collects what would be published) and a real verdict signer; no broker."""

from __future__ import annotations

import json
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.central.alarms import Alarms
from agent.central.plans import PLAN_FILE, PlanUpdates
from agent.central.security import Check, KeyRing, generate_keypair, sign_item
from agent.config import Config, load_config, parse_config
from agent.pipeline.state import LineState
from tests.unit.test_inbound import FakeMqtt

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "sortgate.sortplan.example.toml"
PLAN = tomllib.loads((ROOT / "config" / "plans" / "example.toml").read_text())


def line(tmp_path: Path) -> tuple[Config, str]:
    private, public = generate_keypair()
    (tmp_path / "keys").write_text(f"central-1 {public}\n")
    data = tomllib.loads(EXAMPLE.read_text())
    data["storage"] = {"state_dir": str(tmp_path / "state")}
    data["verdicts"] = {"trusted_keys_file": str(tmp_path / "keys")}
    (tmp_path / "state").mkdir(exist_ok=True)
    return parse_config(data, "example"), private


def updates(cfg: Config, tmp_path: Path) -> tuple[PlanUpdates, LineState, FakeMqtt, list[bytes]]:
    alarms: list[bytes] = []
    state = LineState(cfg, Alarms("HKG-AIR", "L1", lambda i, p: alarms.append(p)))
    mqtt = FakeMqtt()
    keyring = KeyRing.load(str(tmp_path / "keys"))

    async def verify(raw: dict[str, Any]) -> Check:
        return keyring.verify(raw)

    return PlanUpdates(cfg, state, keyring, state.alarms, mqtt, verify), state, mqtt, alarms  # type: ignore[arg-type]


def message(private: str, **plan_changes: Any) -> bytes:
    body = {"schema": "sortgate.plan/1", "site": "HKG-AIR", "line": "L1", "issued_at": datetime.now(UTC).isoformat(),
            "plan": {**PLAN, **plan_changes}}
    return json.dumps(sign_item(body, private, "central-1")).encode()


def test_the_example_config_carries_the_example_plan() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.plan is not None and cfg.plan.model_dump() == cfg.plan.model_validate(PLAN).model_dump()


async def test_a_newer_signed_plan_is_applied_kept_and_answered(tmp_path: Path) -> None:
    cfg, private = line(tmp_path)
    up, state, mqtt, _ = updates(cfg, tmp_path)
    assert up.info() == {"version": 1, "name": "example-day-plan", "source": "config"}
    sent = message(private, version=2, disabled_lanes=[5])
    await up.offer(sent)
    assert state.plan.version == 2 and state.plan.plan.disabled_lanes == [5]
    topic, reply = mqtt.sent[-1]
    assert topic == "sortgate/HKG-AIR/L1/plan/result" and reply["accepted"] and reply["in_force"]["version"] == 2
    # a restart keeps it (the config's plan is older)
    again, state2, _, _ = updates(cfg, tmp_path)
    assert state2.plan.version == 2 and again.info()["source"] == "central"
    # the same message again is a redelivery (QoS 1 is at least once): no answer, no refusal
    n = len(mqtt.sent)
    await up.offer(sent)
    assert state.plan.version == 2 and len(mqtt.sent) == n
    # the same version with other content is refused
    await up.offer(message(private, version=2, disabled_lanes=[6]))
    assert state.plan.plan.disabled_lanes == [5] and "in force with other content" in mqtt.sent[-1][1]["problems"][0]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"version": 2, "rules": [{"name": "r", "verdict": "release", "lanes": [12]}]}, "lane 12 does not exist"),
        ({"version": 2, "rules": [{"name": "r", "verdict": "release", "lanes": [3]}]}, "lane 3 is a hold lane"),
        ({"version": 2, "groups": ["CX880", "KE612", "LH733", "SQ001", "AF185"]}, "gap: group 'AF185'"),
        ({"version": 1, "disabled_lanes": [6]}, "version 1 is not newer"),
        ({"version": 2, "rules": []}, "plan.rules"),
    ],
)
async def test_a_plan_that_does_not_fit_is_refused_whole_and_the_old_stays(
    tmp_path: Path, change: dict[str, Any], problem: str
) -> None:
    cfg, private = line(tmp_path)
    up, state, mqtt, alarms = updates(cfg, tmp_path)
    before = state.plan
    await up.offer(message(private, **change))
    assert state.plan is before
    reply = mqtt.sent[-1][1]
    assert reply["accepted"] is False and any(problem in p for p in reply["problems"]), reply
    assert json.loads(alarms[-1])["alarm"] == "plan_refused"
    assert not (tmp_path / "state" / PLAN_FILE).exists()


async def test_a_forged_wrongly_scoped_or_unsigned_plan_is_refused(tmp_path: Path) -> None:
    cfg, private = line(tmp_path)
    up, state, mqtt, _ = updates(cfg, tmp_path)
    attacker, _ = generate_keypair()
    await up.offer(message(attacker, version=5))
    assert state.plan.version == 1 and mqtt.sent[-1][1]["problems"] == ["signature: bad_signature"]
    body = json.loads(message(private, version=5))
    body["plan"]["disabled_lanes"] = [2]  # changed after signing
    await up.offer(json.dumps(body).encode())
    assert state.plan.version == 1 and mqtt.sent[-1][1]["problems"] == ["signature: bad_signature"]
    del body["signature"]
    await up.offer(json.dumps(body).encode())
    assert mqtt.sent[-1][1]["problems"] == ["signature: unsigned"]
    other = json.loads(message(private, version=5))
    other["line"] = "L2"
    await up.offer(json.dumps(sign_item(other, private, "central-1")).encode())
    assert "plan is for HKG-AIR/L2" in mqtt.sent[-1][1]["problems"][0]
    await up.offer(b"not json")
    assert state.plan.version == 1 and mqtt.sent[-1][1]["accepted"] is False


async def test_a_line_without_trusted_keys_takes_plans_from_its_config_only(tmp_path: Path) -> None:
    cfg, private = line(tmp_path)
    up, state, mqtt, _ = updates(cfg, tmp_path)
    up.keyring = None
    await up.offer(message(private, version=3))
    assert state.plan.version == 1 and "no trusted keys" in mqtt.sent[-1][1]["problems"][0]


async def test_messages_match_their_published_schemas(tmp_path: Path) -> None:
    import jsonschema

    schemas = ROOT / "docs" / "schemas"
    plan_schema = json.loads((schemas / "plan.schema.json").read_text())
    result_schema = json.loads((schemas / "plan_result.schema.json").read_text())
    cfg, private = line(tmp_path)
    up, _, mqtt, _ = updates(cfg, tmp_path)
    good = message(private, version=2)
    jsonschema.validate(json.loads(good), plan_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**json.loads(good), "plan": {**PLAN, "rules": []}}, plan_schema)
    await up.offer(good)
    await up.offer(message(private, version=3, rules=[{"name": "r", "verdict": "release", "lanes": [12]}]))
    assert [r["accepted"] for _, r in mqtt.sent] == [True, False]
    for _, reply in mqtt.sent:
        jsonschema.validate(reply, result_schema)


async def test_a_plan_that_cannot_be_kept_on_disk_is_not_taken(tmp_path: Path) -> None:
    cfg, private = line(tmp_path)
    up, state, mqtt, _ = updates(cfg, tmp_path)
    up.path = tmp_path / "no-such-folder" / PLAN_FILE
    await up.offer(message(private, version=2))
    assert state.plan.version == 1 and "cannot keep it" in mqtt.sent[-1][1]["problems"][0]
