"""Results in ring order become records, and records reach the durable outbox in order.

The controller reports where each parcel went (result ring); ``on_result`` joins that with the
decision part (in memory, or on disk if a previous agent run decided the parcel) into the parcel
record. ``run`` commits records and alarms to the outbox in order, those queued together (a batch
of results) in one transaction: while a record cannot be stored the line is unhealthy
(``outbox_unavailable``) and nothing is released. ``sweep`` records parcels whose result never
came, so the audit trail has no holes. Decision parts are saved on disk as soon as a parcel is
decided (``keep``), and tracked so that a stop can wait for them (``drain``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from typing import Any

import structlog

from agent.central import messages
from agent.central.outbox import Entry, OutboxPublisher
from agent.pipeline.parcel import Parcel, decision_key
from agent.pipeline.records import RecordJob, parcel_record, result_part
from agent.pipeline.state import LineState
from firmware_bridge import contract as c

log = structlog.get_logger("sortgate.recorder")

__all__ = ["Recorder"]


#: records kept in memory for ``sortgate status`` (newest last)
RECENT = 20
#: at most this many queued records (and alarms, marks) are committed in one transaction
COMMIT_BATCH = 64


class Recorder:
    def __init__(self, state: LineState, publisher: OutboxPublisher, config_hash: str) -> None:
        self.state = state
        self.publisher = publisher
        self.config_hash = config_hash
        self._jobs: asyncio.Queue[RecordJob] = asyncio.Queue()
        self._saving: set[concurrent.futures.Future[None]] = set()  # decision parts being saved
        self._queued: set[str] = set()  # parcels whose record is queued, not yet committed
        self.alive = time.monotonic()  # the loop's last turn (liveness)
        self._waiting = False
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)  # the newest records, for sortgate status

    def cursor(self) -> int | None:
        """The last result-ring sequence already turned into a record (None on a first start)."""
        return self.publisher.outbox.cursor("results")

    def boot(self) -> int | None:
        """CTRL_BOOT of the controller whose results the cursor counts (None: not known)."""
        return self.publisher.outbox.cursor("controller_boot")

    def mark(self, rseq: int, boot: int) -> None:
        """Results of controller boot ``boot`` are recorded up to ``rseq``: durable, in order with
        the records queued before it (a first start marks where it began, so that parcels passing
        while a killed agent is down still get their records from the ring)."""
        self._jobs.put_nowait(RecordJob("", "", b"", cursor=("results", rseq), boot=boot))

    def controller_restarted(self, boot: int) -> int:
        """The controller forgot every parcel it tracked: each one in flight (in memory, or decided
        by an earlier agent run and on disk) gets its record now, ``no_result``, and results count
        again from the start of the new boot. Returns how many parcels were recorded so."""
        keys = set()
        for seq, p in list(self.state.parcels.items()):
            del self.state.parcels[seq]
            keys.add(p.key)
            self._queue(seq, p.trigger.encoder, p.part, result_part(None), None, p.key)
        for key, body in self.publisher.outbox.pending_decisions():
            seq_s, _, encoder_s = key.partition(":")
            if key in keys or key in self._queued or not (seq_s.isdigit() and encoder_s.isdigit()):
                continue
            keys.add(key)
            self._queue(int(seq_s), int(encoder_s), messages.loads(body), result_part(None), None, key)
        self.state.metrics.count("result_missing", len(keys))
        self.mark(0, boot)
        return len(keys)

    def results_lost(self, n: int) -> None:
        self.state.metrics.count("results_lost", n)
        log.error("result ring overrun: parcels left without a record", missed=n)
        self.state.alarms.event("records_lost", f"{n} parcel results were overwritten before they were recorded")

    def keep(self, p: Parcel, part: dict[str, Any]) -> None:
        """Keep the decision half of the record in memory and on disk until the result comes."""
        p.part = part
        saving = self.publisher.outbox.save_decision_soon(p.key, messages.dumps(part))
        self._saving.add(saving)
        saving.add_done_callback(self._saved)  # on the writer thread

    def _saved(self, saving: concurrent.futures.Future[None]) -> None:
        self._saving.discard(saving)
        exc = saving.exception()
        if exc is not None:  # the record itself is still written at the result (it keeps the part)
            log.error("decision not saved; a restart before its result would lose it", error=str(exc))

    def on_result(self, entry: c.ResultEntry) -> None:
        key = decision_key(entry.seq, entry.encoder)
        parcels = self.state.parcels
        p = parcels.get(entry.seq)
        if p is not None and p.key == key:
            del parcels[entry.seq]
            part = p.part
        else:
            stored = self.publisher.outbox.load_decision(key)  # decided by a previous agent run
            part = messages.loads(stored) if stored else None
        self.state.metrics.count(f"result_{entry.disposition_name}")
        self._queue(entry.seq, entry.encoder, part, result_part(entry), ("results", entry.rseq), key)

    def sweep(self, now: float) -> None:
        """Parcels whose result never came: record them anyway (an audit trail has no holes)."""
        limit = self.state.cfg.health.result_timeout_s
        for seq, p in list(self.state.parcels.items()):
            if now - p.deadline > limit:
                del self.state.parcels[seq]
                self.state.metrics.count("result_missing")
                log.error("no result from controller for parcel", seq=seq)
                self._queue(seq, p.trigger.encoder, p.part, result_part(None), None, p.key)

    def _queue(
        self, seq: int, encoder: int, part: dict[str, Any] | None, result: dict[str, Any],
        cursor: tuple[str, int] | None, key: str,
    ) -> None:
        line = self.state.cfg.line
        record = parcel_record(line.site, line.line, self.config_hash, seq, encoder, part, result)
        self.recent.append(record)  # the dict, not a copy: nothing changes it after this
        self._queued.add(key)
        self._jobs.put_nowait(RecordJob(record["record_id"], "parcels", messages.dumps(record), cursor, key))

    def queue_alarm(self, record_id: str, payload: bytes) -> None:
        self._jobs.put_nowait(RecordJob(record_id, "alarms", payload))

    def queue_message(self, record_id: str, leaf: str, payload: bytes) -> None:
        """Another durable message (an inspection finding), in order with the records."""
        self._jobs.put_nowait(RecordJob(record_id, leaf, payload))

    def last_turn(self) -> float:
        """For the vital-task check: now while it waits for work, else its last turn."""
        return time.monotonic() if self._waiting else self.alive

    async def drain(self) -> None:
        """Wait for decision parts still being saved (a clean stop)."""
        if self._saving:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in list(self._saving)), return_exceptions=True)

    async def run(self) -> None:
        """Commit records to the outbox in order, all those queued meanwhile in one transaction
        (a batch of results costs one fsync). While it cannot store, nothing is released."""
        root = self.state.cfg.topic_root
        while True:
            self.alive = time.monotonic()
            self._waiting = True  # waiting for work is not being stuck (and needs no timer)
            jobs = [await self._jobs.get()]
            while len(jobs) < COMMIT_BATCH and not self._jobs.empty():
                jobs.append(self._jobs.get_nowait())
            self._waiting = False  # its turn starts now, not when it began to wait
            size = len(jobs)
            while jobs:
                self.alive = time.monotonic()
                take = jobs[:size]
                try:
                    await self.publisher.put_many([_entry(job, root) for job in take])
                except Exception as exc:  # noqa: BLE001 - OutboxFull, a disk error: any failure stops releases
                    if len(take) > 1:  # all or nothing: near the budget some may still fit, one at a time
                        size = 1
                        continue
                    self._store_failed(exc)
                    await asyncio.sleep(0.5)
                    continue
                self._stored()
                for job in take:
                    if job.done_decision is not None:
                        self._queued.discard(job.done_decision)
                jobs = jobs[len(take):]

    def _stored(self) -> None:
        s = self.state
        if not s.outbox_ok:
            s.outbox_ok = True
            s.set_problems(tuple(p for p in s.problems if p != "outbox_unavailable"))
            log.info("outbox writable again")
            s.alarms.condition("outbox_full", False, "outbox accepts records again")

    def _store_failed(self, exc: Exception) -> None:
        s = self.state
        if s.outbox_ok:
            log.error("cannot store parcel record; releasing stops", error=str(exc))
            s.outbox_ok = False
            s.set_problems(s.problems)
            s.alarms.condition("outbox_full", True, f"records cannot be stored: {exc}")


def _entry(job: RecordJob, root: str) -> Entry:
    """The outbox's entry for a job: a message with the cursor it advances, or a mark (cursors only)."""
    if job.boot is not None and job.cursor is not None:
        return Entry(cursors=(job.cursor, ("controller_boot", job.boot)))
    return Entry(job.record_id, messages.topic(root, job.leaf), job.payload,
                 (job.cursor,) if job.cursor else (), job.done_decision)
