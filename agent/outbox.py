"""Durable outbox: every outbound record is on disk before it is published, and removed only
when the broker has acknowledged it (PUBACK, QoS 1).

SQLite in WAL mode with ``synchronous=FULL``: a committed record survives a power cut. Writes
(add, remove) run on one dedicated writer thread so an fsync never stalls the event loop; reads
(the next rows to publish) use a second connection on the loop thread, which WAL allows.

The publisher hands at most ``window`` records to paho at a time, always the oldest unacked ones
in insertion order; after a restart it starts again from the oldest row, so records of a crashed
agent are replayed in order. A record may therefore arrive twice (crash between PUBACK and the
delete): its ``record_id`` lets consumers drop the duplicate.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from agent.sqlite_store import SqliteStore

log = structlog.get_logger("sortgate.outbox")

PublishFn = Callable[[str, bytes], int]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
"""


class Outbox:
    def __init__(self, path: Path) -> None:
        self.db = SqliteStore(path, _SCHEMA, synchronous="FULL", thread_name="outbox-writer")

    async def add(self, record_id: str, topic: str, payload: bytes) -> int:
        """Commit a record durably; returns its row id."""

        def insert(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO outbox(record_id, topic, payload, created) VALUES (?,?,?,?)",
                (record_id, topic, payload, time.time()),
            )
            return int(cur.lastrowid or 0)

        return await self.db.write(insert)

    async def remove(self, row_ids: list[int]) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM outbox WHERE id = ?", [(r,) for r in row_ids])

        await self.db.write(delete)

    def fetch_after(self, row_id: int, limit: int) -> list[tuple[int, str, bytes]]:
        rows = self.db.read(
            "SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (row_id, limit)
        )
        return [(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    def count(self) -> int:
        return int(self.db.read("SELECT COUNT(*) FROM outbox")[0][0])

    def close(self) -> None:
        self.db.close()


class OutboxPublisher:
    """Moves committed records from the outbox to the broker, oldest first."""

    def __init__(self, outbox: Outbox, publish: PublishFn, window: int = 200) -> None:
        self.outbox = outbox
        self._publish = publish
        self.window = window
        self._inflight: dict[int, int] = {}  # mqtt mid -> outbox row id
        self._handed_up_to = 0  # highest row id handed to paho
        self._wake = asyncio.Event()
        self._acked: list[int] = []
        self.published = 0
        self.acked = 0
        self.online = False

    async def put(self, record_id: str, topic: str, payload: bytes) -> None:
        """Commit first, then publish. Raises if the record cannot be stored."""
        await self.outbox.add(record_id, topic, payload)
        self._wake.set()

    def on_ack(self, mid: int) -> None:
        row = self._inflight.pop(mid, None)
        if row is not None:
            self._acked.append(row)
            self.acked += 1
            self._wake.set()

    def on_connected(self) -> None:
        # paho resends what it already holds; we only need to keep feeding it.
        self.online = True
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._acked:
                done, self._acked = self._acked, []
                await self.outbox.remove(done)
            room = self.window - len(self._inflight)
            if room <= 0:
                continue
            for row_id, topic, payload in self.outbox.fetch_after(self._handed_up_to, room):
                mid = self._publish(topic, payload)
                self._inflight[mid] = row_id
                self._handed_up_to = row_id
                self.published += 1


