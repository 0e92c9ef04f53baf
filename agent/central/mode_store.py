"""The line's mode, kept on disk so that a restart never loosens it.

Central can put a line in ``inspect_all`` (nothing is released) or ``maintenance``; only a command
signed by a central key brings it back to ``normal`` (docs/mqtt.md, Commands). A technician at the
box can put the line in ``maintenance`` too (``sortgate maintenance on``) and end only that:
``set_by`` says who set the mode, and a mode central set is ended by central alone. The mode, and the
ids of the signed commands already obeyed (so none can be replayed), live in
``{state_dir}/mode.json``, written atomically (temporary file, fsync, rename). A missing file is
``normal``; an unreadable one is ``inspect_all`` (the safe side), logged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import structlog

from agent.central.files import write_json_atomic
from agent.pipeline.decision import Mode

log = structlog.get_logger("sortgate.mode")

#: how long an obeyed signed command's id is remembered (commands older than this are refused anyway)
SEEN_KEEP_S = 24 * 3600


class ModeStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "mode.json"
        self.mode = Mode.NORMAL
        self.seen: dict[str, float] = {}  # signed command id -> when obeyed (wall clock)
        self.set_by = "central"  # "central" or "local" (a technician at the box, sortgate maintenance)
        self._load()

    def _load(self) -> None:
        try:
            data: Any = json.loads(self.path.read_text(encoding="utf-8"))
            self.mode = Mode(data["mode"])
            self.seen = {str(k): float(v) for k, v in dict(data.get("seen", {})).items()}
            self.set_by = "local" if data.get("set_by") == "local" else "central"
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.mode = Mode.INSPECT_ALL
            log.error("mode file unreadable; starting in inspect_all", path=str(self.path), error=str(exc))

    def set(self, mode: Mode, command_id: str | None = None, set_by: str = "central") -> None:
        """Record a new mode (and the signed command that made it, and who: ``central`` or
        ``local``). Raises OSError if it cannot be written: a mode that would not survive a restart
        is not taken."""
        now = time.time()
        seen = {k: v for k, v in self.seen.items() if now - v < SEEN_KEEP_S}
        if command_id:
            seen[command_id] = now
        write_json_atomic(self.path, {"mode": mode.value, "changed_at": now, "set_by": set_by, "seen": seen})
        self.mode, self.seen, self.set_by = mode, seen, set_by

    def was_obeyed(self, command_id: str) -> bool:
        return command_id in self.seen
