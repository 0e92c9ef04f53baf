"""The parcel record, the customs audit record: pure functions, no I/O.

A record has two halves. The *decision part* is built when the parcel is decided (trigger, reads,
code checks, verdict, image, decision, command) and kept on disk until the controller reports where
the parcel went; the *result* is added then (``parcel_record``). A parcel no agent decided (it
passed while none was running) gets a record with ``decision: null`` and a note. The shape is
``docs/schemas/parcel.schema.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.central import messages
from agent.pipeline.decision import ReaderOutcome
from agent.pipeline.parcel import Parcel
from firmware_bridge import contract as c

__all__ = ["RecordJob", "decision_part", "parcel_record", "result_part"]


@dataclass(frozen=True, slots=True)
class RecordJob:
    """One message for the durable outbox, with the cursor and stored decision it settles."""

    record_id: str
    leaf: str  # topic leaf: "parcels" or "alarms"
    payload: bytes
    cursor: tuple[str, int] | None = None
    done_decision: str | None = None
    boot: int | None = None  # a mark only (no payload): results count from ``cursor`` in this controller boot


def decision_part(p: Parcel, readers: Sequence[str], model_version: str | None) -> dict[str, Any]:
    """The half of the record known once the parcel is decided."""
    d = p.decision
    return {
        "trigger": {
            "encoder": p.trigger.encoder,
            "length_mm": p.trigger.length_mm,
            "seen_at": messages.iso(p.seen_wall),
            "prev_seq": p.prev_seq or None,
            "rounds": p.rounds,
        },
        "reads": [
            {
                "reader": r.reader, "codes": list(r.codes), "no_read": r.no_read, "timed_out": r.timed_out,
                "problem": r.problem, "counter": r.counter,
            }
            for r in (p.reads.get(name) or ReaderOutcome(name, timed_out=True) for name in readers)
        ],
        "waybill": d.waybill if d else None,
        "code_checks": [
            {"code": k.code, "valid": k.valid, "format": k.format, "problem": k.problem}
            for k in (d.code_checks if d else ())
        ],
        "verdict": (
            {"status": p.verdict.status, "verdict": p.verdict.verdict, "verdict_id": p.verdict.verdict_id,
             "hold_reason": p.verdict.hold_reason, "group": p.verdict.group}
            if p.verdict else None
        ),
        "image": p.image.record(model_version, p.image_kept) if p.image and model_version else None,
        "line_problems": list(p.line_problems),
        "mode": p.mode.value,
        "decision": (
            {
                "lane_class": d.lane.value,
                "lane": p.lane,
                "reasons": list(d.reasons),
                "plan": {"version": p.plan_version, "rule": p.rule, "overflowed": p.overflowed},
                "decision_ms": round(((p.decided_at or p.seen_at) - p.seen_at) * 1000, 2),
            }
            if d else None
        ),
        "command": {
            "lane": p.lane,
            "ack": p.ack,
            "margin_ms": round((p.deadline - p.command_at) * 1000, 1) if p.command_at else None,
        },
    }


def result_part(entry: c.ResultEntry | None) -> dict[str, Any]:
    """Where the parcel went, from the controller's result ring (None: it never reported it)."""
    if entry is None:
        return {"lane_commanded": None, "lane_reached": None, "disposition": "no_result"}
    return {
        "lane_commanded": entry.lane_commanded or None,
        "lane_reached": entry.lane_reached or None,
        "disposition": entry.disposition_name,
    }


def parcel_record(
    site: str, line: str, config_hash: str, seq: int, encoder: int, part: dict[str, Any] | None,
    result: dict[str, Any],
) -> dict[str, Any]:
    """The whole record; ``part`` None when no agent decided the parcel."""
    rec: dict[str, Any] = {
        "schema": messages.SCHEMA_PARCEL,
        "record_id": f"{site}:{line}:{seq}:{encoder}",
        "site": site,
        "line": line,
        "seq": seq,
        "recorded_at": messages.iso(),
        "agent": {"version": messages.agent_version(), "config_hash": config_hash},
    }
    if part is None:
        rec.update(
            trigger={"encoder": encoder, "length_mm": None, "seen_at": None, "prev_seq": None, "rounds": 0},
            reads=[], waybill=None,
            code_checks=[], verdict=None, image=None, line_problems=[], mode=None, decision=None,
            command=None, note="no decision by this agent (it was not running when the parcel passed)",
        )
    else:
        rec.update(part)
    rec["result"] = result
    return rec
