"""What each alarm means and what a technician does, for the console's alarm page: the table of
docs/operations.md, shipped in the wheel as agent/data/alarms.md (tests/unit/test_console.py keeps
the two the same)."""

from __future__ import annotations

import functools
import re
from importlib import resources

__all__ = ["alarm_help"]

_CODE = re.compile(r"`([^`]+)`")


def _plain(cell: str) -> str:
    return _CODE.sub(r"\1", cell).replace("**", "").strip()


@functools.cache
def alarm_help() -> dict[str, dict[str, str]]:
    """alarm kind -> {"kind": condition/event text, "means": ..., "todo": ...}."""
    text = resources.files("agent").joinpath("data/alarms.md").read_text(encoding="utf-8")
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4:
            out[_plain(cells[0])] = {"kind": _plain(cells[1]), "means": _plain(cells[2]), "todo": _plain(cells[3])}
    return out
