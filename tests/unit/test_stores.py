"""Verdict store and outbox on a real SQLite file (no wires)."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.central.messages import VerdictItem
from agent.central.outbox import REMOVE_AFTER_S, REMOVE_BATCH, Outbox, OutboxPublisher
from agent.central.sqlite_store import SchemaTooNew, SqliteStore
from agent.central.verdicts import VerdictStore

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)


def item(waybill: str, verdict: str, issued: datetime, expires: datetime | None = None) -> VerdictItem:
    return VerdictItem(waybill=waybill, verdict=verdict, verdict_id=f"{verdict}-{issued.minute}",  # type: ignore[arg-type]
                       issued_at=issued, expires_at=expires)


async def test_newer_verdict_supersedes_and_older_one_is_ignored(tmp_path: Path) -> None:
    store = VerdictStore(tmp_path / "v.sqlite", default_ttl_s=86_400)
    now = (T0 + timedelta(hours=1)).timestamp()
    try:
        assert await store.store([item("RB123456785GB", "hold", T0)]) == 1
        assert store.lookup("RB123456785GB", now).verdict == "hold"
        # the duty was paid: released later the same day
        assert await store.store([item("rb 123456785 gb", "release", T0 + timedelta(minutes=30))]) == 1
        hit = store.lookup("RB123456785GB", now)
        assert (hit.status, hit.verdict, hit.verdict_id) == ("hit", "release", "release-30")
        # a stale "inspect" from before arrives late: ignored
        assert await store.store([item("RB123456785GB", "inspect", T0 + timedelta(minutes=10))]) == 0
        assert store.lookup("RB123456785GB", now).verdict == "release"
        assert store.lookup("EE000000005CN", now).status == "miss"
    finally:
        store.close()


async def test_a_verdict_store_of_schema_1_gains_hold_reason_and_group(tmp_path: Path) -> None:
    """A store written before sort plans keeps its verdicts and takes the new fields."""
    path = tmp_path / "v.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE seen (verdict_id TEXT PRIMARY KEY, digest TEXT NOT NULL, expires_at REAL NOT NULL);"
        "CREATE TABLE verdicts (waybill TEXT PRIMARY KEY, verdict TEXT NOT NULL, verdict_id TEXT NOT NULL,"
        " issued_at REAL NOT NULL, expires_at REAL NOT NULL, received_at REAL NOT NULL);"
        "INSERT INTO verdicts VALUES ('RB123456785GB', 'release', 'old', 1, 4102444800, 1);"
        "PRAGMA user_version = 1;"
    )
    conn.close()
    store = VerdictStore(path, default_ttl_s=86_400)
    try:
        old = store.lookup("RB123456785GB")
        assert (old.status, old.verdict, old.group, old.hold_reason) == ("hit", "release", None, None)
        held = VerdictItem(waybill="EE123456785CN", verdict="hold", verdict_id="h1", issued_at=T0,
                           hold_reason="documents")
        grouped = VerdictItem(waybill="CP123456785DE", verdict="release", verdict_id="r1", issued_at=T0,
                              group="CX880")
        assert await store.store([held, grouped]) == 2
        now = (T0 + timedelta(hours=1)).timestamp()
        assert store.lookup("EE123456785CN", now).hold_reason == "documents"
        assert store.lookup("CP123456785DE", now).group == "CX880"
    finally:
        store.close()


async def test_expired_verdict_is_reported_as_expired(tmp_path: Path) -> None:
    store = VerdictStore(tmp_path / "v.sqlite", default_ttl_s=3600)
    try:
        await store.store([item("A1234", "release", T0, T0 + timedelta(minutes=5)), item("B1234", "release", T0)])
        later = (T0 + timedelta(minutes=6)).timestamp()
        assert store.lookup("A1234", later).status == "expired"
        assert store.lookup("B1234", later).status == "hit"  # default TTL of an hour
        assert store.lookup("B1234", (T0 + timedelta(hours=2)).timestamp()).status == "expired"
    finally:
        store.close()


async def test_outbox_publishes_in_order_within_window_and_deletes_on_ack(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite")
    sent: list[tuple[int, bytes]] = []

    def publish(topic: str, payload: bytes) -> int:
        sent.append((len(sent) + 1, payload))
        return len(sent)  # the mid

    pub = OutboxPublisher(outbox, publish, window=3)
    task = asyncio.create_task(pub.run())
    try:
        for i in range(5):
            await pub.put(f"r{i}", "t/parcels", f"p{i}".encode())
        await asyncio.sleep(0.05)
        assert [p for _, p in sent] == [b"p0", b"p1", b"p2"]  # window of 3 in flight
        assert outbox.count() == 5  # nothing removed before an ack
        pub.on_ack(1)
        pub.on_ack(2)
        await asyncio.sleep(0.05)
        assert [p for _, p in sent] == [b"p0", b"p1", b"p2", b"p3", b"p4"]  # room again: sent at once
        assert outbox.count() == 5  # acknowledged rows go in one batch, not one commit each
        await asyncio.sleep(REMOVE_AFTER_S + 0.1)
        assert outbox.count() == 3
        pub.on_ack(3)
        await pub.flush()  # a clean stop deletes what is acknowledged at once
        assert outbox.count() == 2
    finally:
        task.cancel()
        outbox.close()


async def test_outbox_deletes_a_full_batch_of_acknowledged_rows_at_once(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite")
    mids = iter(range(1, 1000))
    pub = OutboxPublisher(outbox, lambda t, p: next(mids), window=REMOVE_BATCH + 10)
    task = asyncio.create_task(pub.run())
    try:
        for i in range(REMOVE_BATCH + 5):
            await pub.put(f"r{i}", "t/parcels", b"x")
        await asyncio.sleep(0.05)
        for mid in range(1, REMOVE_BATCH + 1):
            pub.on_ack(mid)
        await asyncio.sleep(0.05)  # well before REMOVE_AFTER_S
        assert outbox.count() == 5
    finally:
        task.cancel()
        outbox.close()


async def test_outbox_replays_unacked_records_in_order_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    outbox = Outbox(path)
    for i in range(4):
        await outbox.add(f"r{i}", "t", f"p{i}".encode())
    await outbox.remove([(1, 2), (2, 2)])  # acknowledged before the "crash"
    outbox.close()

    outbox = Outbox(path)
    sent: list[bytes] = []
    pub = OutboxPublisher(outbox, lambda t, p: sent.append(p) or len(sent))
    task = asyncio.create_task(pub.run())
    pub.on_connected()
    try:
        await asyncio.sleep(0.05)
        assert sent == [b"p2", b"p3"]
    finally:
        task.cancel()
        outbox.close()


async def test_outbox_budget_refuses_and_cursor_and_decision_move_atomically(tmp_path: Path) -> None:
    from agent.central.outbox import OutboxFull

    outbox = Outbox(tmp_path / "o.sqlite", max_records=2, max_bytes=1000)
    try:
        await outbox.save_decision("7:1234", b'{"lane": 2}')
        assert outbox.load_decision("7:1234") == b'{"lane": 2}'
        await outbox.add("r1", "t", b"x" * 10, cursor=("results", 41), done_decision="7:1234")
        assert outbox.cursor("results") == 41 and outbox.load_decision("7:1234") is None
        await outbox.add("r2", "t", b"y" * 10)
        assert outbox.fill == 1.0
        try:
            await outbox.add("r3", "t", b"z")
            raise AssertionError("expected OutboxFull")
        except OutboxFull:
            pass
        await outbox.remove([(1, 10)])
        await outbox.add("r3", "t", b"z")  # room again after an acknowledgement
    finally:
        outbox.close()
    reopened = Outbox(tmp_path / "o.sqlite", max_records=2, max_bytes=1000)
    try:
        assert reopened.count() == 2 and reopened.pending_bytes == 11  # budget state survives
    finally:
        reopened.close()


async def test_cursors_set_together_and_pending_decisions_survive_a_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    await box.set_cursors({"results": 0, "controller_boot": 77})
    await box.save_decision("12:3400", b'{"a": 1}')
    await box.save_decision("13:3900", b'{"a": 2}')
    await box.add("r1", "t", b"x", cursor=("results", 5), done_decision="12:3400")
    box.close()
    again = Outbox(tmp_path / "o.sqlite")
    assert again.cursor("results") == 5 and again.cursor("controller_boot") == 77
    assert again.pending_decisions() == [("13:3900", b'{"a": 2}')]
    again.close()


def test_a_store_migrates_forward_in_steps_and_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    v1 = "CREATE TABLE t (a INTEGER)"
    store = SqliteStore(path, v1, "FULL", "t", version=1)
    store.reader.execute("INSERT INTO t VALUES (7)")
    store.close()
    v3 = "CREATE TABLE t (a INTEGER, b TEXT); CREATE TABLE u (c INTEGER)"
    steps = {1: "ALTER TABLE t ADD COLUMN b TEXT", 2: "CREATE TABLE u (c INTEGER)"}
    store = SqliteStore(path, v3, "FULL", "t", version=3, steps=steps)
    assert store.read("SELECT a, b FROM t") == [(7, None)]  # the row kept, the column added
    assert store.read("PRAGMA user_version") == [(3,)] and store.read("SELECT COUNT(*) FROM u") == [(0,)]
    store.close()
    with pytest.raises(SchemaTooNew, match="schema version 3 is newer than this sortgate's \\(1\\)"):
        SqliteStore(path, v1, "FULL", "t", version=1)  # the old version after a rollback


def test_stores_from_before_schema_versions_count_as_version_one(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (a INTEGER)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    conn.close()
    store = SqliteStore(path, "CREATE TABLE t (a INTEGER, b TEXT)", "FULL", "t", version=2,
                        steps={1: "ALTER TABLE t ADD COLUMN b TEXT"})
    assert store.read("SELECT a, b FROM t") == [(1, None)]
    store.close()


async def test_the_journal_keeps_parcel_records_and_findings_not_alarms_and_is_bounded(tmp_path: Path) -> None:
    import json

    o = Outbox(tmp_path / "o.sqlite")
    rec = {"schema": "sortgate.parcel/1", "record_id": "S:L:1:5", "waybill": "LP1",
           "decision": {"lane_class": "inspection", "reasons": ["image_flagged", "x"], "decision_ms": 3.5},
           "image": {"status": "flagged", "inference_ms": 0.9}}
    await o.add("S:L:1:5", "sortgate/S/L/parcels", json.dumps(rec).encode())
    await o.add("A:1", "sortgate/S/L/alarms", b'{"alarm": "jam"}')
    finding = {"schema": "sortgate.finding/1", "waybill": "LP1", "outcome": "seized", "parcel_record_id": "S:L:1:5"}
    await o.add("F:1", "sortgate/S/L/findings", json.dumps(finding).encode())
    rows = o.db.read("SELECT record_id, kind, waybill, lane_class, reasons, decision_ms, image_ms, flagged, parcel "
                     "FROM journal ORDER BY at")
    assert rows == [("S:L:1:5", "parcel", "LP1", "inspection", "image_flagged,x", 3.5, 0.9, 1, None),
                    ("F:1", "finding", "LP1", None, "seized", None, None, 0, "S:L:1:5")]
    for i in range(1200):
        await o.add(f"S:L:{i + 2}:0", "sortgate/S/L/parcels", json.dumps({**rec, "record_id": str(i)}).encode())
    assert await o.prune_journal(older_than_s=3600, max_rows=1000) == 202  # the oldest beyond 1000
    assert o.db.read("SELECT COUNT(*), MIN(record_id LIKE 'S:L:%:0') FROM journal")[0] == (1000, 1)
    assert await o.prune_journal(older_than_s=0.0, max_rows=1000, batch=400) == 400  # age, a batch at a time
    assert o.count() == 1203  # the outbox itself is untouched: the journal is a copy
    o.close()


async def test_entries_added_together_commit_all_or_nothing_in_order(tmp_path: Path) -> None:
    from agent.central.outbox import Entry, OutboxFull

    outbox = Outbox(tmp_path / "o.sqlite", max_records=3, max_bytes=1000)
    try:
        await outbox.save_decision("1:10", b"{}")
        rows = await outbox.add_many([
            Entry("r1", "t/parcels", b'{"n": 1}', (("results", 1),), "1:10"),
            Entry(cursors=(("results", 0), ("controller_boot", 9))),  # a mark: cursors alone
            Entry("r2", "t/alarms", b'{"n": 2}'),
        ])
        assert rows[0] is not None and rows[1] is None and rows[2] == rows[0] + 1
        assert outbox.cursor("results") == 0 and outbox.cursor("controller_boot") == 9  # applied in order
        assert outbox.load_decision("1:10") is None and outbox.count() == 2
        with pytest.raises(OutboxFull):  # two more do not fit a budget of three: neither is stored
            await outbox.add_many([Entry("r3", "t", b"x"), Entry("r4", "t", b"y")])
        assert [r for _, r, _ in outbox.fetch_after(0, 10)] == ["t/parcels", "t/alarms"]
        await outbox.add_many([Entry("r3", "t", b"x")])  # one still fits
        assert outbox.count() == 3
    finally:
        outbox.close()


async def test_a_delete_that_fails_keeps_the_rows_and_the_publisher_running(tmp_path: Path) -> None:
    """A full disk refuses the delete of acknowledged rows too: the publisher goes on publishing
    and deletes them once it can (it used to die, and the agent with it)."""
    outbox = Outbox(tmp_path / "o.sqlite")
    mids = iter(range(1, 1000))
    sent: list[bytes] = []

    def publish(topic: str, payload: bytes) -> int:
        sent.append(payload)
        return next(mids)

    pub = OutboxPublisher(outbox, publish, window=REMOVE_BATCH + 10)
    remove = outbox.remove
    failures = [sqlite3.OperationalError("database or disk is full")]

    async def flaky(rows: list[tuple[int, int]]) -> None:
        if failures:
            raise failures.pop()
        await remove(rows)

    outbox.remove = flaky  # type: ignore[method-assign]
    task = asyncio.create_task(pub.run())
    try:
        for i in range(REMOVE_BATCH):
            await pub.put(f"r{i}", "t/parcels", b"x")
        await asyncio.sleep(0.05)
        for mid in range(1, REMOVE_BATCH + 1):
            pub.on_ack(mid)
        await asyncio.sleep(0.05)
        assert not failures and outbox.count() == REMOVE_BATCH and not task.done()  # refused, kept
        await pub.put("late", "t/parcels", b"y")
        await asyncio.sleep(REMOVE_AFTER_S + 0.2)
        assert sent[-1] == b"y" and outbox.count() == 1  # published on, and the rows went at the next try
    finally:
        task.cancel()
        outbox.close()
