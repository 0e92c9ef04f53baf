"""Alarms: conditions that start and end, and events that happen.

A *condition* (controller offline, jam, a reader offline, the outbox filling) is published once when
it becomes active and once when it clears — never repeated while it lasts. An *event* (a rejected
verdict, a malformed message) is published at most once per kind per ``event_quiet_s``, carrying how
many occurred since the last one, so a flood of bad input cannot flood the broker. An *audit*
alarm (``audit``: a mode change or a gate test made at the box) is published every time.

Alarms go through the durable outbox like parcel records (QoS 1, idempotent ``alarm_id``).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from agent.central import messages

log = structlog.get_logger("sortgate.alarms")

Sink = Callable[[str, bytes], None]

#: alarm messages kept in memory for sortgate status (newest last)
RECENT = 50


class Alarms:
    def __init__(self, site: str, line: str, sink: Sink, event_quiet_s: float = 10.0) -> None:
        self.site, self.line = site, line
        self._sink = sink
        self.active: dict[tuple[str, str | None], str] = {}  # (kind, subject) -> detail
        self.event_quiet_s = event_quiet_s
        self._events: dict[str, tuple[float, int]] = {}  # kind -> (last published, suppressed count)
        self._boot = f"{int(time.time() * 1000):x}"
        self._n = itertools.count(1)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)  # newest last, for sortgate status

    def condition(self, kind: str, active: bool, detail: str, subject: str | None = None) -> None:
        key = (kind, subject)
        if active == (key in self.active):
            return
        if active:
            self.active[key] = detail
        else:
            self.active.pop(key, None)
        (log.error if active else log.info)(
            "alarm raised" if active else "alarm cleared", alarm=kind, subject=subject, detail=detail
        )
        self._emit(kind, active, detail, subject=subject)

    def audit(self, detail: str, **extra: Any) -> None:
        """A person's action at the box (a mode change, a gate test, a console login): an ``audit``
        alarm, published every time."""
        log.warning("audit", detail=detail, **extra)
        self._emit("audit", True, detail, **extra)

    def event(self, kind: str, detail: str, **extra: Any) -> None:
        """A one-off occurrence; published at most once per kind per ``event_quiet_s``."""
        now = time.monotonic()
        last, suppressed = self._events.get(kind, (-1e9, 0))
        if now - last < self.event_quiet_s:
            self._events[kind] = (last, suppressed + 1)
            return
        self._events[kind] = (now, 0)
        self._emit(kind, True, detail, count=suppressed + 1, **extra)

    def _emit(self, kind: str, active: bool, detail: str, **extra: Any) -> None:
        alarm_id = f"{self.site}:{self.line}:alarm:{self._boot}:{next(self._n)}"
        body = messages.alarm(kind, active, detail, alarm_id=alarm_id, site=self.site, line=self.line, **extra)
        self.recent.append(body)
        self._sink(alarm_id, messages.dumps(body))
