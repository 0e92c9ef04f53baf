"""Verdict store: the customs verdict per waybill, pushed by the central system, kept in SQLite.

A newer verdict (later ``issued_at``) supersedes an older one — a parcel held for unpaid duty is
often released later the same day — and an older one arriving late never overwrites a newer one.
A verdict past its ``expires_at`` is reported as expired, which never releases.

Writes (batches from MQTT) run on one writer thread; look-ups run on the loop thread with their own
connection (WAL) and are a primary-key read, fast enough for the per-parcel hot path.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from agent.decision import VerdictLookup
from agent.messages import VerdictItem
from agent.sqlite_store import SqliteStore
from agent.waybill import normalize

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    waybill TEXT PRIMARY KEY,
    verdict TEXT NOT NULL,
    verdict_id TEXT NOT NULL,
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    received_at REAL NOT NULL
);
"""


class VerdictStore:
    def __init__(self, path: Path, default_ttl_s: int) -> None:
        # synchronous=NORMAL: a verdict lost in a power cut means inspection, which is safe
        self.db = SqliteStore(path, _SCHEMA, synchronous="NORMAL", thread_name="verdict-writer")
        self.default_ttl_s = default_ttl_s

    async def store(self, items: list[VerdictItem]) -> int:
        """Store a batch; returns how many rows were inserted or superseded."""
        now = time.time()
        rows = []
        for it in items:
            issued = it.issued_at.timestamp()
            expires = it.expires_at.timestamp() if it.expires_at else issued + self.default_ttl_s
            rows.append((normalize(it.waybill), it.verdict, it.verdict_id, issued, expires, now))

        def upsert(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN")
            before = conn.total_changes
            conn.executemany(
                """INSERT INTO verdicts(waybill, verdict, verdict_id, issued_at, expires_at, received_at)
                   VALUES (?,?,?,?,?,?)
                   ON CONFLICT(waybill) DO UPDATE SET
                     verdict=excluded.verdict, verdict_id=excluded.verdict_id,
                     issued_at=excluded.issued_at, expires_at=excluded.expires_at,
                     received_at=excluded.received_at
                   WHERE excluded.issued_at > verdicts.issued_at""",
                rows,
            )
            conn.execute("COMMIT")
            return conn.total_changes - before

        return await self.db.write(upsert)

    def lookup(self, waybill: str, now: float | None = None) -> VerdictLookup:
        rows = self.db.read(
            "SELECT verdict, verdict_id, expires_at FROM verdicts WHERE waybill = ?",
            (normalize(waybill),),
        )
        if not rows:
            return VerdictLookup("miss")
        verdict, verdict_id, expires_at = rows[0]
        if (now or time.time()) > expires_at:
            return VerdictLookup("expired", verdict, verdict_id)
        return VerdictLookup("hit", verdict, verdict_id)

    def count(self) -> int:
        return int(self.db.read("SELECT COUNT(*) FROM verdicts")[0][0])

    def close(self) -> None:
        self.db.close()
