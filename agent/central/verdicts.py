"""Verdict store: the customs verdict per waybill, pushed by the central system, kept in SQLite.

A newer verdict (later ``issued_at``) supersedes an older one — a parcel held for unpaid duty is
often released later the same day — and an older one arriving late never overwrites a newer one.
Two verdicts with the same ``issued_at``: the stricter stands (inspect > hold > release), whichever
came first.
A verdict past its ``expires_at`` is reported as expired, which never releases.

Writes (batches from MQTT) run on one writer thread; look-ups run on the loop thread with their own
connection (WAL) and are a primary-key read, fast enough for the per-parcel hot path.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

from agent.central.messages import VerdictItem
from agent.central.sqlite_store import SqliteStore, transaction
from agent.pipeline.decision import VerdictLookup
from agent.pipeline.waybill import normalize

#: with equal issued_at, the stricter verdict stands
STRICTNESS = {"release": 0, "hold": 1, "inspect": 2}


def _rank(column: str) -> str:
    """SQL for a verdict column's strictness (STRICTNESS)."""
    cases = " ".join(f"WHEN '{v}' THEN {n}" for v, n in STRICTNESS.items())
    return f"(CASE {column} {cases} ELSE 2 END)"


def digest(item: VerdictItem) -> str:
    return hashlib.sha256(item.model_dump_json().encode()).hexdigest()[:32]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    verdict_id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS verdicts (
    waybill TEXT PRIMARY KEY,
    verdict TEXT NOT NULL,
    verdict_id TEXT NOT NULL,
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    received_at REAL NOT NULL,
    hold_reason TEXT,
    grp TEXT
);
"""
#: schema 2 (sort plans): a hold verdict's reason and a release verdict's consolidation group
_STEPS = {1: "ALTER TABLE verdicts ADD COLUMN hold_reason TEXT; ALTER TABLE verdicts ADD COLUMN grp TEXT"}


class VerdictStore:
    def __init__(self, path: Path, default_ttl_s: int) -> None:
        # synchronous=NORMAL: a verdict lost in a power cut means inspection, which is safe
        self.db = SqliteStore(
            path, _SCHEMA, synchronous="NORMAL", thread_name="verdict-writer", version=2, steps=_STEPS
        )
        self.default_ttl_s = default_ttl_s

    async def store(self, items: list[VerdictItem]) -> int:
        """Store a batch; returns how many rows were inserted or superseded."""
        now = time.time()
        rows = []
        for it in items:
            issued = it.issued_at.timestamp()
            expires = it.expires_at.timestamp() if it.expires_at else issued + self.default_ttl_s
            rows.append(
                (normalize(it.waybill), it.verdict, it.verdict_id, issued, expires, now, it.hold_reason, it.group)
            )
        seen = [(it.verdict_id, digest(it), r[4]) for it, r in zip(items, rows, strict=True)]

        def upsert(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                conn.executemany(
                    "INSERT INTO seen(verdict_id, digest, expires_at) VALUES (?,?,?) ON CONFLICT DO NOTHING",
                    seen,
                )
                before = conn.total_changes
                conn.executemany(
                    """INSERT INTO verdicts(waybill, verdict, verdict_id, issued_at, expires_at, received_at,
                                         hold_reason, grp)
                       VALUES (?,?,?,?,?,?,?,?)
                       ON CONFLICT(waybill) DO UPDATE SET
                         verdict=excluded.verdict, verdict_id=excluded.verdict_id,
                         issued_at=excluded.issued_at, expires_at=excluded.expires_at,
                         received_at=excluded.received_at, hold_reason=excluded.hold_reason,
                         grp=excluded.grp
                       WHERE excluded.issued_at > verdicts.issued_at
                          OR (excluded.issued_at = verdicts.issued_at
                              AND {rank_new} > {rank_old})""".format(
                        rank_new=_rank("excluded.verdict"), rank_old=_rank("verdicts.verdict")
                    ),
                    rows,
                )
                changed = conn.total_changes - before
                conn.execute("DELETE FROM seen WHERE expires_at < ?", (now - 86_400,))
            return changed

        return await self.db.write(upsert)

    def replay_check(self, item: VerdictItem) -> str | None:
        """``replayed`` if this verdict id was seen with other content, or an older verdict than
        the stored one is offered; ``duplicate`` for an identical redelivery; None if new."""
        rows = self.db.read("SELECT digest FROM seen WHERE verdict_id = ?", (item.verdict_id,))
        if rows:
            return "duplicate" if rows[0][0] == digest(item) else "replayed"
        stored = self.db.read(
            "SELECT issued_at, verdict FROM verdicts WHERE waybill = ?", (normalize(item.waybill),)
        )
        if stored:
            issued, verdict = stored[0][0], stored[0][1]
            if issued > item.issued_at.timestamp():
                return "replayed"
            if issued == item.issued_at.timestamp() and STRICTNESS[item.verdict] <= STRICTNESS.get(verdict, 2):
                return "replayed"  # the same moment: only a stricter verdict can stand beside it
        return None

    def lookup(self, waybill: str, now: float | None = None) -> VerdictLookup:
        rows = self.db.read(
            "SELECT verdict, verdict_id, expires_at, hold_reason, grp FROM verdicts WHERE waybill = ?",
            (normalize(waybill),),
        )
        if not rows:
            return VerdictLookup("miss")
        verdict, verdict_id, expires_at, hold_reason, group = rows[0]
        if (now or time.time()) > expires_at:
            return VerdictLookup("expired", verdict, verdict_id)
        return VerdictLookup("hit", verdict, verdict_id, hold_reason, group)

    def count(self) -> int:
        return int(self.db.read("SELECT COUNT(*) FROM verdicts")[0][0])

    def close(self) -> None:
        self.db.close()
