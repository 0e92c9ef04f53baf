"""Durable outbox: every outbound record is on disk before it is published, and removed only
when the broker has acknowledged it (PUBACK, QoS 1).

SQLite in WAL mode with ``synchronous=FULL``: a committed record survives a power cut (a decision
kept for a parcel's record is committed without an fsync of its own; see ``save_decision_soon``). Writes
(add, remove) run on one dedicated writer thread so an fsync never stalls the event loop; reads
(the next rows to publish) use a second connection on the loop thread, which WAL allows.

The publisher hands at most ``window`` records to paho at a time, always the oldest unacked ones
in insertion order; after a restart it starts again from the oldest row, so records of a crashed
agent are replayed in order. A record may therefore arrive twice (crash between PUBACK and the
delete): its ``record_id`` lets consumers drop the duplicate.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.central.sqlite_store import SqliteStore, transaction
from agent.nudge import Nudge

log = structlog.get_logger("sortgate.outbox")

#: acknowledged rows are deleted in one transaction once this many have gathered, or this long
#: after the first of them (one commit per record instead of two)
REMOVE_BATCH = 64
REMOVE_AFTER_S = 0.5

PublishFn = Callable[[str, bytes], int | None]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
-- a parcel's decision, kept from the lane command until its record is in the outbox, so an
-- agent that restarts in between still writes the full record
CREATE TABLE IF NOT EXISTS decisions (
    key TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    created REAL NOT NULL
);
-- how far the controller's result ring has been turned into records
CREATE TABLE IF NOT EXISTS cursors (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- the local history of parcel records and inspection findings (the console's search and plots),
-- kept after the broker has them, for journal_days, written in the same transaction as the outbox
-- row (no commit of its own) and pruned in batches
CREATE TABLE IF NOT EXISTS journal (
    record_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    at REAL NOT NULL,
    waybill TEXT,
    lane_class TEXT,
    reasons TEXT,
    decision_ms REAL,
    image_ms REAL,
    flagged INTEGER NOT NULL DEFAULT 0,
    parcel TEXT,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_waybill ON journal(waybill);
CREATE INDEX IF NOT EXISTS journal_at ON journal(at);
"""

#: topic leaves whose messages are kept in the journal too
JOURNALED = ("/parcels", "/findings")


def journal_row(record_id: str, payload: bytes, at: float) -> tuple[Any, ...] | None:
    """The journal's columns for one parcel record or finding (on the writer thread); None for a
    payload that is not a JSON object (never expected: the agent made it)."""
    try:
        rec = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    if str(rec.get("schema", "")).startswith("sortgate.finding"):
        return (record_id, "finding", at, rec.get("waybill"), None, rec.get("outcome"), None, None, 0,
                rec.get("parcel_record_id"), payload)
    d = rec.get("decision") or {}
    img = rec.get("image") or {}
    return (record_id, "parcel", at, rec.get("waybill"), d.get("lane_class"), ",".join(d.get("reasons", [])),
            d.get("decision_ms"), img.get("inference_ms"), int(img.get("status") == "flagged"), None, payload)


@dataclass(frozen=True, slots=True)
class Entry:
    """One write in an outbox transaction: a message (``topic`` set), the cursors it advances
    (name, value) and the stored decision it settles (its key), or cursors alone."""

    record_id: str = ""
    topic: str | None = None
    payload: bytes = b""
    cursors: tuple[tuple[str, int], ...] = ()
    done_decision: str | None = None


def _insert(conn: sqlite3.Connection, e: Entry, now: float) -> int | None:
    """One entry, inside the caller's transaction (writer thread); the message's row id."""
    row_id = None
    if e.topic is not None:
        cur = conn.execute(
            "INSERT INTO outbox(record_id, topic, payload, created) VALUES (?,?,?,?)",
            (e.record_id, e.topic, e.payload, now),
        )
        row_id = int(cur.lastrowid or 0)
        row = journal_row(e.record_id, e.payload, now) if e.topic.endswith(JOURNALED) else None
        if row is not None:
            conn.execute("INSERT OR REPLACE INTO journal VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
    if e.cursors:
        conn.executemany(
            "INSERT INTO cursors(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            e.cursors,
        )
    if e.done_decision is not None:
        conn.execute("DELETE FROM decisions WHERE key = ?", (e.done_decision,))
    return row_id


class OutboxFull(Exception):
    """The outbox is at its disk budget: the record was not stored."""


class Outbox:
    """Records waiting for the broker's acknowledgement, within a budget of records and bytes."""

    def __init__(self, path: Path, max_records: int = 1_000_000, max_bytes: int = 1 << 30) -> None:
        self.db = SqliteStore(path, _SCHEMA, synchronous="FULL", thread_name="outbox-writer")
        self.max_records = max_records
        self.max_bytes = max_bytes
        n, size = self.db.read("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox")[0]
        self.pending_records, self.pending_bytes = int(n), int(size)

    @property
    def fill(self) -> float:
        """How full the outbox is, 0..1, by whichever budget is closer."""
        return max(self.pending_records / self.max_records, self.pending_bytes / self.max_bytes)

    async def add(
        self,
        record_id: str,
        topic: str,
        payload: bytes,
        *,
        cursor: tuple[str, int] | None = None,
        done_decision: str | None = None,
    ) -> int:
        """Commit a record durably; returns its row id. Raises OutboxFull at the budget.

        In the same transaction: advance ``cursor`` (name, value) and drop the decision row
        ``done_decision``, so a crash leaves either both or neither.
        """
        rows = await self.add_many([Entry(record_id, topic, payload, (cursor,) if cursor else (), done_decision)])
        return rows[0] or 0

    async def add_many(self, entries: Sequence[Entry]) -> list[int | None]:
        """Commit several entries in one transaction (one fsync for all: a batch of results
        becomes its records at the cost of one), in order; returns each message's row id (None
        for an entry that only sets cursors). All or nothing: raises OutboxFull if the messages
        together do not fit the budget, and then nothing is stored."""
        messages = [e for e in entries if e.topic is not None]
        size = sum(len(e.payload) for e in messages)
        if self.pending_records + len(messages) > self.max_records or self.pending_bytes + size > self.max_bytes:
            raise OutboxFull(
                f"outbox at its budget ({self.pending_records} records, {self.pending_bytes} bytes)"
            )

        def insert(conn: sqlite3.Connection) -> list[int | None]:
            now = time.time()
            rows: list[int | None] = []
            with transaction(conn):
                for e in entries:
                    rows.append(_insert(conn, e, now))
            return rows

        rows = await self.db.write(insert)
        self.pending_records += len(messages)
        self.pending_bytes += size
        return rows

    async def remove(self, rows: list[tuple[int, int]]) -> None:
        """Delete acknowledged rows, given as (row id, payload size)."""

        def delete(conn: sqlite3.Connection) -> None:
            with transaction(conn):  # one commit for the batch, not one per row
                conn.executemany("DELETE FROM outbox WHERE id = ?", [(r,) for r, _ in rows])

        await self.db.write(delete)
        self.pending_records -= len(rows)
        self.pending_bytes -= sum(n for _, n in rows)

    async def save_decision(self, key: str, body: bytes) -> None:
        await asyncio.wrap_future(self.save_decision_soon(key, body))

    def save_decision_soon(self, key: str, body: bytes) -> concurrent.futures.Future[None]:
        """Save a decision on the writer thread, in order with the other writes, without a task or
        a wake-up of the event loop per parcel; the Future says when it is on disk."""
        created = time.time()

        def upsert(conn: sqlite3.Connection) -> None:
            # Without an fsync of its own: in WAL mode the commit reaches the operating system at
            # once (a killed agent keeps it) and the disk with the next record's commit, which
            # syncs the log up to there (a power cut loses at most the decisions since the last
            # record; their records then say decision: null). One fsync a parcel instead of two.
            conn.execute("PRAGMA synchronous=NORMAL")
            try:
                conn.execute(
                    "INSERT INTO decisions(key, body, created) VALUES (?,?,?) "
                    "ON CONFLICT(key) DO UPDATE SET body = excluded.body",
                    (key, body, created),
                )
            finally:
                conn.execute("PRAGMA synchronous=FULL")

        return self.db.submit(upsert)

    def load_decision(self, key: str) -> bytes | None:
        rows = self.db.read("SELECT body FROM decisions WHERE key = ?", (key,))
        return bytes(rows[0][0]) if rows else None

    async def prune_decisions(self, older_than_s: float) -> None:
        cutoff = time.time() - older_than_s

        def prune(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM decisions WHERE created < ?", (cutoff,))

        await self.db.write(prune)

    async def prune_journal(self, older_than_s: float, max_rows: int, batch: int = 5000) -> int:
        """Drop journal rows older than ``older_than_s``, then the oldest beyond ``max_rows``, at
        most ``batch`` in one transaction (a short write, never a long lock on the console's
        reads); returns how many went."""
        cutoff = time.time() - older_than_s

        def prune(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                cur = conn.execute(
                    "DELETE FROM journal WHERE rowid IN (SELECT rowid FROM journal WHERE at < ? LIMIT ?)",
                    (cutoff, batch),
                )
                gone = int(cur.rowcount)
                (rows,) = conn.execute("SELECT COUNT(*) FROM journal").fetchone()
                over = min(batch - gone, int(rows) - max_rows)
                if over > 0:
                    cur = conn.execute(
                        "DELETE FROM journal WHERE rowid IN (SELECT rowid FROM journal ORDER BY at LIMIT ?)", (over,)
                    )
                    gone += int(cur.rowcount)
            return gone

        return int(await self.db.write(prune))

    async def set_cursors(self, values: dict[str, int]) -> None:
        """Set cursors durably, in one transaction."""
        await self.add_many([Entry(cursors=tuple(values.items()))])

    def pending_decisions(self) -> list[tuple[str, bytes]]:
        """Decisions whose record is not yet in the outbox, oldest first: (key, body)."""
        rows = self.db.read("SELECT key, body FROM decisions ORDER BY created")
        return [(str(k), bytes(b)) for k, b in rows]

    def cursor(self, name: str) -> int | None:
        rows = self.db.read("SELECT value FROM cursors WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else None

    def fetch_after(self, row_id: int, limit: int) -> list[tuple[int, str, bytes]]:
        rows = self.db.read(
            "SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (row_id, limit)
        )
        return [(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    def count(self) -> int:
        return self.pending_records

    def close(self) -> None:
        self.db.close()


class OutboxPublisher:
    """Moves committed records from the outbox to the broker, oldest first."""

    def __init__(self, outbox: Outbox, publish: PublishFn, window: int = 200) -> None:
        self.outbox = outbox
        self._publish = publish
        self.window = window
        self._inflight: dict[int, tuple[int, int]] = {}  # mqtt mid -> (row id, payload size)
        self._handed_up_to = 0  # highest row id handed to paho
        self._wake = Nudge()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mids: collections.deque[int] = collections.deque()  # acknowledged on paho's thread
        self._acked: list[tuple[int, int]] = []  # acknowledged rows not yet deleted
        self._acked_since = 0.0  # when the first of them was acknowledged
        self.published = 0
        self.acked = 0

    async def put(
        self,
        record_id: str,
        topic: str,
        payload: bytes,
        cursor: tuple[str, int] | None = None,
        done_decision: str | None = None,
    ) -> None:
        """Commit first, then publish. Raises OutboxFull (or an OSError) if it cannot be stored."""
        await self.put_many([Entry(record_id, topic, payload, (cursor,) if cursor else (), done_decision)])

    async def put_many(self, entries: Sequence[Entry]) -> None:
        """``put`` for several entries: committed in one transaction (all or nothing), then published."""
        await self.outbox.add_many(entries)
        self._wake.set()

    def on_ack(self, mid: int) -> None:
        """The broker has the record (loop thread): its row may go. Rows go in batches
        (REMOVE_BATCH rows, or REMOVE_AFTER_S after the first): an acknowledged row still on disk
        after a crash is only sent again (central keeps the first of a record_id), never lost."""
        row = self._inflight.pop(mid, None)
        if row is None:
            return
        if not self._acked:
            self._acked_since = time.monotonic()
        self._acked.append(row)
        self.acked += 1
        if len(self._acked) >= REMOVE_BATCH or len(self._inflight) == self.window - 1:
            self._wake.set()  # a full batch, or a full window has room again

    def ack_from_thread(self, mid: int) -> None:
        """``on_ack`` from paho's thread, without waking the event loop for every record: the
        acknowledgements wait for the publisher's next turn (a new record, or REMOVE_AFTER_S),
        unless a batch is full or the window is half used."""
        self._mids.append(mid)  # a deque: safe across threads
        if self._loop is not None and (len(self._mids) >= REMOVE_BATCH or len(self._inflight) >= self.window // 2):
            self._loop.call_soon_threadsafe(self._wake.set)

    def _take_acks(self) -> None:
        while self._mids:
            self.on_ack(self._mids.popleft())

    async def flush(self) -> None:
        """A clean stop: delete the acknowledged rows now (a crash would only resend them)."""
        self._take_acks()
        if self._acked:
            await self._remove_acked()

    async def _remove_acked(self) -> None:
        """Delete the acknowledged rows. A delete that fails (a full disk needs pages for it too)
        keeps them for the next turn: they are the broker's already, and a restart before they
        go only sends them again — never a reason to stop publishing."""
        done, self._acked = self._acked, []
        try:
            await self.outbox.remove(done)
        except (OSError, sqlite3.Error) as exc:
            self._acked = done + self._acked
            log.warning("acknowledged records not deleted yet; trying again", rows=len(done), error=str(exc))

    def on_connected(self) -> None:
        # paho resends what it already holds; we only need to keep feeding it.
        self._wake.set()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            # records in flight: look at their acknowledgements at least every REMOVE_AFTER_S
            await self._wake.wait(REMOVE_AFTER_S if self._inflight or self._acked or self._mids else None)
            self._wake.clear()
            self._take_acks()
            if self._acked and (
                len(self._acked) >= REMOVE_BATCH or time.monotonic() - self._acked_since >= REMOVE_AFTER_S
            ):
                await self._remove_acked()
            room = self.window - len(self._inflight)
            if room <= 0:
                continue
            for row_id, topic, payload in self.outbox.fetch_after(self._handed_up_to, room):
                mid = self._publish(topic, payload)
                if mid is None:  # refused (logged by the link): kept, tried again shortly
                    asyncio.get_running_loop().call_later(1.0, self._wake.set)
                    break
                self._inflight[mid] = (row_id, len(payload))
                self._handed_up_to = row_id
                self.published += 1


