"""Every alarm the agent can raise is in the schema, and every alarm in the schema is explained in
docs/operations.md (what it means, what a technician does)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from firmware_bridge import contract as c

ROOT = Path(__file__).resolve().parents[2]


def schema_kinds() -> set[str]:
    schema = json.loads((ROOT / "docs" / "schemas" / "alarm.schema.json").read_text())
    return set(schema["properties"]["alarm"]["enum"])


def raised_in_code() -> set[str]:
    kinds = set()
    for path in (ROOT / "agent").rglob("*.py"):
        text = path.read_text()
        kinds |= set(re.findall(r"\.(?:event|condition)\(\s*\"([a-z_]+)\"", text))
    return kinds


def test_every_alarm_raised_by_the_code_is_in_the_schema() -> None:
    status = c.Status.decode([0xFFFF] * c.POLL_LEN)  # every bit set, belt running
    line_problems = set(status.problems()) | {"belt_stopped", "controller_frozen"}
    kinds = raised_in_code() | line_problems | {"audit"}  # Alarms.audit
    assert len(raised_in_code()) >= 10  # the scan finds the calls
    assert kinds <= schema_kinds(), kinds - schema_kinds()


def test_every_alarm_in_the_schema_is_explained_in_operations() -> None:
    ops = (ROOT / "docs" / "operations.md").read_text()
    explained = set(re.findall(r"^\| `([a-z_]+)` \| (?:condition|event)", ops, re.M))
    assert schema_kinds() <= explained, schema_kinds() - explained
