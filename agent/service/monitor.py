"""What a technician at the line asks about the readers: read rates and the last raw frames.

Reader-station HMIs show good / no-read / multi-read counters since a reset and the last frames;
this is that, kept in memory by the agent (``sortgate status``, ``sortgate reader watch``). It
costs a few counter increments per frame; a watcher gets the frames only while it watches, through
a bounded queue that drops rather than grows (a slow terminal never holds up the line).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from firmware_bridge.reader_codec import Event, Frame

__all__ = ["ReaderMonitor", "ReaderStats", "frame_text"]

#: frames kept per reader for ``status`` (the newest last)
LAST_FRAMES = 10
#: frames a watcher may have queued before the newest are dropped
WATCH_QUEUE = 256


def frame_text(raw: bytes, limit: int = 80) -> str:
    """A raw frame as printable text: control bytes as <HEX>, cut at ``limit`` characters."""
    out = "".join(chr(b) if 0x20 <= b < 0x7F else f"<{b:02X}>" for b in raw[: limit * 2])
    return out if len(out) <= limit else out[: limit - 1] + "…"


def describe(event: Event) -> dict[str, Any]:
    """One reader event as the status and a watcher see it."""
    if isinstance(event, Frame):
        kind = "no_read" if event.no_read else ("multi_read" if len(event.codes) > 1 else "read")
        return {"kind": kind, "codes": list(event.codes), "counter": event.counter, "raw": frame_text(event.raw)}
    return {"kind": "framing_error", "error": event.kind, "detail": event.detail, "raw": frame_text(event.raw)}


@dataclass
class ReaderStats:
    name: str
    device: str
    open: bool = False
    state: str = "not opened yet"
    since: float = field(default_factory=time.time)  # counters count from here (wall clock)
    frames: int = 0
    reads: int = 0  # exactly one code
    no_reads: int = 0
    multi_reads: int = 0
    framing_errors: int = 0
    last: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=LAST_FRAMES))
    watchers: set[asyncio.Queue[dict[str, Any]]] = field(default_factory=set)

    def count(self, event: Event) -> None:
        if isinstance(event, Frame):
            self.frames += 1
            if event.no_read:
                self.no_reads += 1
            elif len(event.codes) > 1:
                self.multi_reads += 1
            else:
                self.reads += 1
        else:
            self.framing_errors += 1

    def summary(self) -> dict[str, Any]:
        def pct(n: int) -> float | None:
            return round(100 * n / self.frames, 2) if self.frames else None

        return {
            "name": self.name, "device": self.device, "open": self.open, "state": self.state,
            "since": self.since, "frames": self.frames, "reads": self.reads, "no_reads": self.no_reads,
            "multi_reads": self.multi_reads, "framing_errors": self.framing_errors,
            "read_pct": pct(self.reads), "no_read_pct": pct(self.no_reads), "multi_read_pct": pct(self.multi_reads),
            "last": list(self.last),
        }


class ReaderMonitor:
    def __init__(self, readers: dict[str, str]) -> None:
        self.readers = {name: ReaderStats(name, device) for name, device in readers.items()}

    def on_event(self, reader: str, event: Event) -> None:
        stats = self.readers.get(reader)
        if stats is None:
            return
        stats.count(event)
        seen = {"at": time.time(), "reader": reader, **describe(event)}
        stats.last.append(seen)
        for q in stats.watchers:
            if q.full():
                q.get_nowait()  # a slow watcher loses its oldest frame, never the line's time
            q.put_nowait(seen)

    def on_state(self, reader: str, up: bool, detail: str) -> None:
        stats = self.readers.get(reader)
        if stats is not None:
            stats.open, stats.state = up, detail

    def reset(self, reader: str | None = None) -> None:
        for stats in self.readers.values():
            if reader is None or stats.name == reader:
                stats.since = time.time()
                stats.frames = stats.reads = stats.no_reads = stats.multi_reads = stats.framing_errors = 0

    def watch(self, reader: str) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(WATCH_QUEUE)
        self.readers[reader].watchers.add(q)
        return q

    def unwatch(self, reader: str, q: asyncio.Queue[dict[str, Any]]) -> None:
        self.readers[reader].watchers.discard(q)

    def summary(self) -> list[dict[str, Any]]:
        return [s.summary() for s in self.readers.values()]
