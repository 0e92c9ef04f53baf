"""Inbound rules that need no broker: strict types, reply topics, equal timestamps, the kept mode."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.central.commands import reply_topic_problem
from agent.central.messages import Command, VerdictAnswer, parse_model, parse_verdict_envelope, parse_verdict_items
from agent.central.mode_store import ModeStore
from agent.central.verdicts import VerdictStore
from agent.pipeline.decision import Mode

ROOT = "sortgate/HKG/L1"


def answer(found: object) -> bytes:
    return json.dumps({"schema": "sortgate.verdict_answer/1", "waybill": "RB123456785GB", "found": found}).encode()


@pytest.mark.parametrize("found", ["yes", 1, "true", "false", 0, None, [True]])
def test_found_must_be_a_json_boolean(found: object) -> None:
    msg, problem = parse_model(VerdictAnswer, answer(found))
    assert msg is None and problem is not None and "found" in problem


def test_a_real_boolean_is_read() -> None:
    msg, _ = parse_model(VerdictAnswer, answer(True))
    assert msg is not None and msg.found is True


def item(**over: object) -> dict[str, object]:
    return {"waybill": "RB123456785GB", "verdict": "release", "verdict_id": "v1",
            "issued_at": "2026-11-30T08:00:00Z", **over}


@pytest.mark.parametrize("bad", [
    {"issued_at": 1764489600},  # a number is not a time
    {"verdict": ["release"]},
    {"waybill": 123456789012},
    {"expires_at": True},
    {"extra": 1},  # keys the schema does not name
])
def test_verdict_items_are_read_strictly(bad: dict[str, object]) -> None:
    batch = {"schema": "sortgate.verdicts/1", "batch_id": "b", "verdicts": [item(**bad)]}
    _, raws, problem = parse_verdict_envelope(json.dumps(batch).encode())
    items, problems = parse_verdict_items(raws)
    assert problem is None and items == [] and len(problems) == 1


def test_commands_are_read_strictly() -> None:
    ok, _ = parse_model(Command, b'{"schema":"sortgate.command/1","command":"set_mode","mode":"normal"}')
    assert ok is not None
    for bad in (b'{"schema":"sortgate.command/1","command":"status","request_id":7}',
                b'{"schema":"sortgate.command/1","command":"status","debug":true}',
                b'{"schema":"sortgate.command/1","command":"set_mode","mode":"normal","issued_at":0}'):
        assert parse_model(Command, bad)[0] is None, bad


@pytest.mark.parametrize("topic", [
    f"{ROOT}/+", f"{ROOT}/#", f"{ROOT}/cmd/#", f"{ROOT}/+/reply", f"{ROOT}/cmd/reply/+",
    f"{ROOT}/parcels", f"{ROOT}/status", f"{ROOT}/alarms", f"{ROOT}/cmd", f"{ROOT}/cmd/replyX",
    "other/line/cmd/reply", f"{ROOT}/cmd/reply/a\0b", f"{ROOT}/cmd/reply/" + "x" * 300,
])
def test_reply_topics_outside_the_reply_prefix_or_with_wildcards_are_refused(topic: str) -> None:
    assert reply_topic_problem(topic, ROOT) is not None


@pytest.mark.parametrize("topic", [f"{ROOT}/cmd/reply", f"{ROOT}/cmd/reply/console-7", f"{ROOT}/cmd/reply/a/b"])
def test_reply_topics_under_the_reply_prefix_are_used(topic: str) -> None:
    assert reply_topic_problem(topic, ROOT) is None


async def test_equal_issued_at_keeps_the_stricter_verdict(tmp_path: Path) -> None:
    from agent.central.messages import VerdictItem

    store = VerdictStore(tmp_path / "v.sqlite", default_ttl_s=86_400)
    at = datetime.now(UTC)

    def v(waybill: str, verdict: str, vid: str) -> VerdictItem:
        return VerdictItem.model_validate_json(json.dumps(
            {"waybill": waybill, "verdict": verdict, "verdict_id": vid, "issued_at": at.isoformat()}))

    try:
        for first, second, want in (("release", "inspect", "inspect"), ("inspect", "release", "inspect"),
                                    ("hold", "release", "hold"), ("release", "hold", "hold")):
            waybill = f"RB{abs(hash((first, second))) % 10**9:09d}GB"
            a, b = v(waybill, first, f"{first}-{second}-a"), v(waybill, second, f"{first}-{second}-b")
            await store.store([a])
            if store.replay_check(b) is None:
                await store.store([b])
            assert store.lookup(waybill).verdict == want, (first, second)
        # an older verdict is still a replay, a newer one still supersedes
        later = VerdictItem.model_validate_json(json.dumps({"waybill": "RB000000001GB", "verdict": "inspect",
                                                            "verdict_id": "n1", "issued_at": at.isoformat()}))
        await store.store([later])
        older = later.model_copy(update={"verdict_id": "n0", "verdict": "release",
                                         "issued_at": at - timedelta(seconds=1)})
        assert store.replay_check(older) == "replayed"
    finally:
        store.close()


def test_the_mode_survives_a_restart_and_signed_ids_are_remembered(tmp_path: Path) -> None:
    modes = ModeStore(tmp_path)
    assert modes.mode is Mode.NORMAL
    modes.set(Mode.INSPECT_ALL)
    again = ModeStore(tmp_path)
    assert again.mode is Mode.INSPECT_ALL
    again.set(Mode.NORMAL, "cmd-42")
    assert ModeStore(tmp_path).was_obeyed("cmd-42")


def test_an_unreadable_mode_file_starts_on_the_safe_side(tmp_path: Path) -> None:
    (tmp_path / "mode.json").write_text("{not json")
    assert ModeStore(tmp_path).mode is Mode.INSPECT_ALL
