"""Inbound in-process: routing, verdict intake, commands and replies, with a fake MQTT link and
controller link and a real SQLite verdict store. No broker."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.central.alarms import Alarms
from agent.central.inbound import Inbound
from agent.central.mode_store import ModeStore
from agent.central.mqtt import MessageMeta
from agent.central.security import KeyRing, generate_keypair, sign_item
from agent.central.verdicts import VerdictStore
from agent.config import parse_config
from agent.pipeline.decision import Mode

ROOT = "sortgate/T/L1"


class FakeMqtt:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, **kw: Any) -> int | None:
        self.sent.append((topic, json.loads(payload)))
        return len(self.sent)


class FakeLink:
    connected = False


@pytest.fixture
def inbound(tmp_path: Path) -> Any:
    private, public = generate_keypair()
    keys = tmp_path / "keys"
    keys.write_text(f"central-1 {public}\n")
    cfg = parse_config({
        "line": {"site": "T", "line": "L1"}, "controller": {"host": "127.0.0.1"},
        "readers": [{"name": "top", "device": "/dev/null"}],
        "lanes": [{"number": 1, "name": "i", "role": "inspection"}, {"number": 2, "name": "r", "role": "release", "gate": 1}],
        "verdicts": {"require_signatures": True, "trusted_keys_file": str(keys)},
    })
    store = VerdictStore(tmp_path / "v.sqlite", 86_400)
    published: list[bytes] = []
    modes = ModeStore(tmp_path)
    mode: list[Mode] = []
    mqtt = FakeMqtt()
    ib = Inbound(cfg, store, KeyRing.load(str(keys)), Alarms("T", "L1", lambda i, p: published.append(p)), mqtt,
                 FakeLink(), Counter(), set_mode=mode.append, status=lambda: {"state": "online"},  # type: ignore[arg-type]
                 modes=modes)
    yield ib, store, mqtt, mode, private
    store.close()


def cmd(**body: Any) -> bytes:
    return json.dumps({"schema": "sortgate.command/1", **body}).encode()


async def test_a_signed_batch_is_stored_and_a_forged_item_rejected(inbound: Any) -> None:
    ib, store, _, _, private = inbound
    now = datetime.now(UTC).isoformat()
    good = sign_item({"waybill": "RB123456785GB", "verdict": "release", "verdict_id": "a", "issued_at": now},
                     private, "central-1")
    attacker, _ = generate_keypair()
    forged = sign_item({"waybill": "EE123456785CN", "verdict": "release", "verdict_id": "b", "issued_at": now},
                       attacker, "central-1")
    batch = {"schema": "sortgate.verdicts/1", "batch_id": "x", "verdicts": [good, forged]}
    await ib._handle(f"{ROOT}/verdicts", json.dumps(batch).encode(), MessageMeta())
    assert store.lookup("RB123456785GB").verdict == "release"
    assert store.lookup("EE123456785CN").status == "miss"
    assert ib.counters["verdicts_rejected_bad_signature"] == 1


async def test_a_flood_of_forged_items_is_counted_whole_but_logged_in_a_few_lines(inbound: Any) -> None:
    """300 forged items: every one counted and none stored, but only the first few logged one by
    one and one line for the rest (thousands of lines in a burst hold the loop and fill the journal)."""
    from structlog.testing import capture_logs

    from agent.central.inbound import REJECT_LOG_MAX

    ib, store, _, _, _ = inbound
    now = datetime.now(UTC).isoformat()
    attacker, _ = generate_keypair()
    forged = [sign_item({"waybill": "EE123456785CN", "verdict": "release", "verdict_id": f"f{i}", "issued_at": now},
                        attacker, "central-1") for i in range(300)]
    batch = {"schema": "sortgate.verdicts/1", "batch_id": "flood", "verdicts": forged}
    with capture_logs() as logs:
        await ib._handle(f"{ROOT}/verdicts", json.dumps(batch).encode(), MessageMeta())
    assert ib.counters["verdicts_rejected_bad_signature"] == 300
    assert store.lookup("EE123456785CN").status == "miss"
    one_by_one = [e for e in logs if e["event"] == "verdict rejected"]
    rest = [e for e in logs if e["event"].startswith("more verdicts rejected")]
    assert len(one_by_one) == REJECT_LOG_MAX and all(e["reason"] == "bad_signature" for e in one_by_one)
    assert len(rest) == 1 and rest[0]["counter"] == "verdicts_rejected_bad_signature"


async def test_commands_route_reply_and_loosening_needs_a_signature(inbound: Any) -> None:
    ib, _, mqtt, mode, private = inbound
    await ib._handle(f"{ROOT}/cmd", cmd(command="set_mode", mode="inspect_all", request_id="t1"),
                     MessageMeta(response_topic=f"{ROOT}/cmd/reply/ui"))
    assert mode == [Mode.INSPECT_ALL] and mqtt.sent[-1][0] == f"{ROOT}/cmd/reply/ui" and mqtt.sent[-1][1]["ok"]
    await ib._handle(f"{ROOT}/cmd", cmd(command="set_mode", mode="normal", request_id="u1"), MessageMeta())
    assert mode == [Mode.INSPECT_ALL] and mqtt.sent[-1][1]["ok"] is False  # unsigned loosening refused
    signed = sign_item({"schema": "sortgate.command/1", "command": "set_mode", "mode": "normal", "request_id": "s1",
                        "issued_at": datetime.now(UTC).isoformat()}, private, "central-1")
    await ib._handle(f"{ROOT}/cmd", json.dumps(signed).encode(), MessageMeta())
    assert mode[-1] is Mode.NORMAL and mqtt.sent[-1][1]["ok"] is True


async def test_a_wildcard_response_topic_refuses_the_command_and_replies_on_the_reply_topic(inbound: Any) -> None:
    ib, _, mqtt, mode, _ = inbound
    await ib._handle(f"{ROOT}/cmd", cmd(command="set_mode", mode="maintenance", request_id="w"),
                     MessageMeta(response_topic=f"{ROOT}/#"))
    assert mode == [] and mqtt.sent[-1][0] == f"{ROOT}/cmd/reply" and "refused" in mqtt.sent[-1][1]["error"]


def test_retained_input_and_unknown_topics_are_ignored(inbound: Any) -> None:
    ib = inbound[0]
    ib.offer(f"{ROOT}/cmd", cmd(command="status"), MessageMeta(retain=True))
    assert ib.queue.empty() and ib.counters["inbound_retained"] == 1
    ib.offer(f"{ROOT}/verdicts/answer", b"{}", MessageMeta(correlation=b"nobody"))
    assert ib.counters["answers_unexpected"] == 1


async def test_a_long_wait_for_a_message_never_looks_like_a_stall_when_the_message_comes(inbound: Any) -> None:
    """The vital-task check reads last_turn(): waiting counts as alive, and a message taken after a
    long wait starts a new turn (it once kept the wait's start, so the agent looked stuck and its
    heartbeats stopped the moment a verdict flood arrived after a quiet spell)."""
    ib = inbound[0]
    started: list[float] = []
    taken, release = asyncio.Event(), asyncio.Event()

    async def slow_handle(topic: str, payload: bytes, meta: MessageMeta) -> None:
        started.append(time.monotonic())
        taken.set()
        await release.wait()

    ib._handle = slow_handle
    task = asyncio.create_task(ib.run())
    try:
        await asyncio.sleep(0.3)  # a quiet spell
        assert time.monotonic() - ib.last_turn() < 0.05  # waiting: alive
        ib.offer(f"{ROOT}/verdicts", b"{}", MessageMeta())
        async with asyncio.timeout(2):
            await taken.wait()
        assert ib.last_turn() >= started[0] - 0.05  # the turn began with the message, not the wait
    finally:
        release.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
