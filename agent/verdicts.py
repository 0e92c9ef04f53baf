"""Verdict store: the customs verdict per waybill, pushed by the central system, kept in SQLite.

A newer verdict (later ``issued_at``) supersedes an older one — a parcel held for unpaid duty is
often released later the same day — and an older one arriving late never overwrites a newer one.
A verdict past its ``expires_at`` is reported as expired, which never releases.

Writes (batches from MQTT) run on one writer thread; look-ups run on the loop thread with their own
connection (WAL) and are a primary-key read, fast enough for the per-parcel hot path.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.decision import VerdictLookup
from agent.messages import VerdictItem
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
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.default_ttl_s = default_ttl_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verdict-writer")
        self._writer: sqlite3.Connection | None = None
        self._pool.submit(self._open_writer).result()
        self._reader = sqlite3.connect(path, isolation_level=None)

    def _open_writer(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # a lost verdict means inspection: safe
        conn.executescript(_SCHEMA)
        self._writer = conn

    def _store(self, items: list[VerdictItem]) -> int:
        assert self._writer is not None
        now = time.time()
        rows = []
        for it in items:
            issued = it.issued_at.timestamp()
            expires = it.expires_at.timestamp() if it.expires_at else issued + self.default_ttl_s
            rows.append((normalize(it.waybill), it.verdict, it.verdict_id, issued, expires, now))
        self._writer.execute("BEGIN")
        before = self._writer.total_changes
        self._writer.executemany(
            """INSERT INTO verdicts(waybill, verdict, verdict_id, issued_at, expires_at, received_at)
               VALUES (?,?,?,?,?,?)
               ON CONFLICT(waybill) DO UPDATE SET
                 verdict=excluded.verdict, verdict_id=excluded.verdict_id,
                 issued_at=excluded.issued_at, expires_at=excluded.expires_at,
                 received_at=excluded.received_at
               WHERE excluded.issued_at > verdicts.issued_at""",
            rows,
        )
        self._writer.execute("COMMIT")
        return self._writer.total_changes - before

    async def store(self, items: list[VerdictItem]) -> int:
        """Store a batch; returns how many rows were inserted or superseded."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._store, items)

    def lookup(self, waybill: str, now: float | None = None) -> VerdictLookup:
        row = self._reader.execute(
            "SELECT verdict, verdict_id, expires_at FROM verdicts WHERE waybill = ?",
            (normalize(waybill),),
        ).fetchone()
        if row is None:
            return VerdictLookup("miss")
        verdict, verdict_id, expires_at = row
        if (now or time.time()) > expires_at:
            return VerdictLookup("expired", verdict, verdict_id)
        return VerdictLookup("hit", verdict, verdict_id)

    def count(self) -> int:
        return int(self._reader.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        self._reader.close()

        def _close() -> None:
            if self._writer is not None:
                self._writer.close()

        self._pool.submit(_close).result()
        self._pool.shutdown()
