"""Config migrations: what an upgrade rewrites in a technician's config file.

A migration changes one key's value where it still holds an old default that a newer version
names differently; a value the technician chose is never touched. The file is edited line by
line, so its comments and layout stay. ``sortgate migrate-config FILE [--write]`` runs them (the
installer does, with the new version, before that version starts).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MIGRATIONS", "Migration", "migrate_text"]


@dataclass(frozen=True, slots=True)
class Migration:
    since: str  # the version that made the change
    section: str  # the TOML table, e.g. "vision"
    key: str
    old: Any  # the value it replaces (only this exact value)
    new: Any
    why: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "0.2.0", "vision", "model", "/opt/sortgate/models/xray_int8.tflite", "xray_int8.tflite",
        "the model ships inside the installed package; a bare name names a shipped model",
    ),
)


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def migrate_text(text: str, migrations: tuple[Migration, ...] = MIGRATIONS) -> tuple[str, list[str]]:
    """The config text with every applicable migration done, and one line per change made.
    Raises tomllib.TOMLDecodeError for a file that is not TOML (check-config says where)."""
    data = tomllib.loads(text)
    lines = text.splitlines(keepends=True)
    changes = []
    for m in migrations:
        table = data.get(m.section)
        if not isinstance(table, dict) or table.get(m.key) != m.old:
            continue
        section = None
        for i, line in enumerate(lines):
            head = re.match(r"\s*\[([^\[\]]+)\]\s*(#.*)?$", line)
            if head:
                section = head.group(1).strip()
                continue
            if section == m.section and re.match(rf"\s*{re.escape(m.key)}\s*=", line):
                key, _, rest = line.partition("=")
                old = _toml(m.old)
                if old not in rest:  # written another way (single quotes, say): leave it to a person
                    break
                lines[i] = key + "=" + rest.replace(old, _toml(m.new), 1)
                changes.append(f"{m.section}.{m.key}: {m.old!r} -> {m.new!r} ({m.why}; since {m.since})")
                break
    out = "".join(lines)
    if changes:
        tomllib.loads(out)  # still TOML
    return out, changes


def migrate_file(path: Path, write: bool) -> list[str]:
    text = path.read_text()
    out, changes = migrate_text(text)
    if write and changes:
        tmp = path.with_name(path.name + ".migrating")
        st = path.stat()
        tmp.write_text(out)
        tmp.chmod(st.st_mode & 0o777)
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)  # root:sortgate 0640 stays so
        tmp.replace(path)
    return changes
