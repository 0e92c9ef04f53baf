"""The per-parcel pipeline and its deadlines.

For every trigger the controller captures, ``Line`` runs one short task:

1. wait until every reader has given its final answer for that trigger (``Matcher``: a frame tied
   to it by evidence, a time-out, or an ambiguity), never past the parcel's deadline minus the
   safety margin;
2. identify the one valid waybill, look its verdict up in the local store;
3. ``decide()`` (pure) → lane + reasons;
4. write the lane to the controller's mailbox and check the acknowledgement.

The deadline comes from the parcel's position: the controller's identity block says how many
encoder counts lie between the scan point and the decision point; the supervisor measures belt
speed from the encoder; so ``deadline = seen + remaining_counts / counts_per_second``.

When the controller reports where the parcel went (result ring), the parcel record — the customs
audit record — is built and handed to the durable outbox, in result order.

Everything here runs on the event loop; nothing blocks (SQLite look-ups are primary-key reads).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent import messages
from agent.config import Config
from agent.decision import (
    Decision,
    DecisionInputs,
    ImageOutcome,
    Mode,
    ReaderOutcome,
    VerdictLookup,
    decide,
    identify,
)
from agent.matching import Capture, Matcher, Note, Outcome, SourceSpec, capture_interval
from agent.outbox import OutboxPublisher
from agent.verdicts import VerdictStore
from firmware_bridge import contract as c
from firmware_bridge.errors import LinkError
from firmware_bridge.modbus_link import ControllerLink
from firmware_bridge.reader_codec import Event, FramingError

if TYPE_CHECKING:  # OpenCV and LiteRT load only on lines that run the image check
    from agent.vision import ImageResult, VisionCheck

log = structlog.get_logger("sortgate.line")

ACK_TIMEOUT_S = 0.1
#: time kept back from a verdict look-up (or the image check) for writing the command before the
#: safety margin
LOOKUP_RESERVE_S = 0.02
#: the matcher's name for the X-ray image export, beside the readers' names
IMAGE_SOURCE = "xray"
#: what the agent does with each thing the matcher notices: (counter, alarm event or None, log level)
_NOTE_ALARMS = {
    "orphan": "reader_frame_unmatched",
    "conflict": "reader_frame_unmatched",
    "mismatch": "reader_frame_unmatched",
    "ambiguous": "reader_frame_unmatched",
    "counter_gap": "reader_counter_gap",
    "counter_reset": "reader_counter_reset",
    "duplicate": "reader_frame_repeated",
}


@dataclass
class Parcel:
    seq: int
    trigger: c.TriggerEntry
    seen_at: float  # monotonic
    seen_wall: float
    deadline: float  # monotonic time the parcel reaches the decision point
    reads: dict[str, ReaderOutcome] = field(default_factory=dict)
    last_input_at: float = 0.0
    read_settled: bool = False  # every reader has given its final answer
    all_read: asyncio.Event = field(default_factory=asyncio.Event)
    verdict: VerdictLookup | None = None
    decision: Decision | None = None
    decided_at: float | None = None
    lane: int | None = None
    ack: str | None = None
    command_at: float | None = None
    line_problems: tuple[str, ...] = ()
    mode: Mode = Mode.NORMAL
    part: dict[str, Any] | None = None  # the decision half of the record, once decided
    image_path: Any = None  # the matched X-ray image (a path, or a frame from a capture source)
    image_done: bool = False  # the image source has answered (an image, or a time-out)
    image: ImageResult | None = None
    image_kept: str | None = None

    @property
    def key(self) -> str:
        return decision_key(self.seq, self.trigger.encoder)


def decision_key(seq: int, encoder: int) -> str:
    """A parcel's identity on this line: its trigger sequence and captured encoder count."""
    return f"{seq}:{encoder}"


@dataclass(frozen=True, slots=True)
class RecordJob:
    record_id: str
    leaf: str  # topic leaf: "parcels" or "alarms"
    payload: bytes
    cursor: tuple[str, int] | None = None
    done_decision: str | None = None


class Line:
    def __init__(
        self,
        cfg: Config,
        link: ControllerLink,
        verdicts: VerdictStore,
        publisher: OutboxPublisher,
        config_hash: str,
        vision: VisionCheck | None = None,
    ) -> None:
        self.cfg = cfg
        self.vision = vision
        self.link = link
        self.verdicts = verdicts
        self.publisher = publisher
        self.config_hash = config_hash
        self.readers = [r.name for r in cfg.readers]
        sources = [
            SourceSpec(
                r.name, r.window_ms[0] / 1000, r.window_ms[1] / 1000, r.window_from,
                r.counter.modulus if r.counter else None,
            )
            for r in cfg.readers
        ]
        # images named with the trigger sequence are matched exactly; others by their time window
        self.image_seq = re.compile(cfg.vision.name_seq_regex) if cfg.vision.name_seq_regex else None
        self._early_images: dict[int, tuple[Any, float]] = {}
        if vision is not None and self.image_seq is None:
            sources.append(SourceSpec(IMAGE_SOURCE, 0.0, cfg.vision.window_ms / 1000, "leading_edge"))
        self.max_parcel_m = cfg.line.max_parcel_mm / 1000
        self.matcher = Matcher(sources, max_pass_s=1.0)
        self.publish_s = cfg.controller.trigger_publish_ms / 1000
        self.margin_s = cfg.decision.safety_margin_ms / 1000
        self.trigger_hooks: list[Callable[[], None]] = []  # e.g. a capture source grabbing a frame
        self.parcels: dict[int, Parcel] = {}
        self.mode = Mode.NORMAL
        self.problems: tuple[str, ...] = ("controller_offline",)
        self.identity: c.Identity | None = None
        self._cmd_counter = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._trailing: dict[int, int] = {}  # seq -> encoder count at which its trailing edge passes
        self.poll_now = asyncio.Event()  # set when an input waits for the next controller poll
        self._records: asyncio.Queue[RecordJob] = asyncio.Queue()
        self._persisting: set[asyncio.Task[None]] = set()
        self.outbox_ok = True
        self.on_alarm: Callable[..., None] = lambda kind, active, detail, subject=None: None
        self.on_event: Callable[..., None] = lambda kind, detail, **extra: None
        # Ask central for a verdict the store lacks: (waybill, seconds) -> lookup. Set by the agent.
        self.ask: Callable[[str, float], Awaitable[VerdictLookup]] | None = None
        self.counters: Counter[str] = Counter()
        self.recorder_alive = time.monotonic()  # the recorder loop's last turn (liveness)
        self.latencies_ms: list[float] = []

    # --- health -------------------------------------------------------------------------
    def set_problems(self, problems: tuple[str, ...]) -> None:
        if not self.outbox_ok and "outbox_unavailable" not in problems:
            problems = (*problems, "outbox_unavailable")
        if problems != self.problems:
            if problems:
                log.warning("line unhealthy", problems=list(problems))
            else:
                log.info("line healthy")
            for gone in set(self.problems) - set(problems):
                self.on_alarm(gone, False, f"{gone} cleared")
            for new in set(problems) - set(self.problems):
                # the outbox and the controller link raise their own alarms, with their causes
                if new not in ("outbox_unavailable", "controller_offline"):
                    self.on_alarm(new, True, f"line problem: {new}; every parcel goes to inspection")
            self.problems = problems

    # --- inputs -------------------------------------------------------------------------
    def new_session(self, known_since: float) -> None:
        """A controller session starts: triggers captured before ``known_since`` may never be
        seen (they were in the ring before this session read its head)."""
        self.matcher.new_session(known_since)
        self._trailing.clear()

    def on_trigger(
        self, entry: c.TriggerEntry, encoder_now: int, speed_cps: float, now: float, captured_after: float
    ) -> None:
        """A new trigger, seen at ``now``; it was captured after ``captured_after`` (the moment the
        previous status poll was sent, which did not show it yet)."""
        assert self.identity is not None
        travelled = c.encoder_delta(entry.encoder, encoder_now)
        remaining = self.identity.decision_distance_counts - travelled
        deadline = now + remaining / max(speed_cps, 1.0)
        p = Parcel(entry.seq, entry, now, time.time(), deadline, last_input_at=now)
        self.parcels[entry.seq] = p
        self.counters["triggers"] += 1
        for hook in self.trigger_hooks:
            hook()
        if speed_cps > 0:  # the longest parcel's passing time bounds windows of unmeasured parcels
            self.matcher.max_pass_s = max(self.max_parcel_m * self.identity.counts_per_metre / speed_cps, 0.05)
        lo, hi = capture_interval(now, captured_after - self.publish_s, travelled, speed_cps, self.publish_s)
        self.matcher.add_trigger(Capture(entry.seq, lo, hi, measured=entry.length_mm > 0))
        if entry.length_mm > 0:  # its trailing edge leaves the photo-eye at this encoder count
            self._trailing[entry.seq] = (entry.encoder + entry.length_mm * self.identity.counts_per_metre // 1000) \
                & 0xFFFFFFFF
        if self.image_seq is not None:
            early = self._early_images.pop(entry.seq, None)
            if early is not None:
                self._attach_image(p, *early)
        self._settle(p)
        task = asyncio.create_task(self._run_parcel(p), name=f"parcel-{entry.seq}")
        self._tasks.add(task)
        task.add_done_callback(self._parcel_done)

    def _parcel_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The parcel got no command, so the controller defaults it to inspection; the
            # sweep records it. A bug here must be loud, never silent.
            self.counters["parcel_task_errors"] += 1
            log.error("parcel task failed", task=task.get_name(), error=repr(task.exception()))

    def on_reader_event(self, reader: str, event: Event, t: float) -> None:
        if isinstance(event, FramingError):
            self.counters[f"reader_error_{event.kind}"] += 1
            log.warning(
                "reader framing error, skipped", reader=reader, kind=event.kind,
                detail=event.detail, bytes=event.preview(),
            )
            return
        self._apply(self.matcher.add_frame(reader, event, t, event.counter))
        if self.matcher.holding():
            self.poll_now.set()  # a frame waits to learn which triggers exist: look now

    def on_image(self, image: Any, t: float) -> None:
        """An X-ray image (a file path or a frame) from the image source."""
        if self.image_seq is None:
            self._apply(self.matcher.add_frame(IMAGE_SOURCE, image, t))
            if self.matcher.holding():
                self.poll_now.set()
            return
        m = self.image_seq.search(Path(image).name) if isinstance(image, str) else None
        if m is None:
            self.counters["image_orphans"] += 1
            log.warning("image name carries no trigger sequence; not used", image=str(image))
            self._discard(image)
            return
        seq = int(m.group("seq"))
        p = self.parcels.get(seq)
        if p is None:  # before the poll has seen its trigger: keep it briefly
            self._early_images[seq] = (image, t)
            return
        self._attach_image(p, image, t)

    def _attach_image(self, p: Parcel, image: Any, t: float) -> None:
        if p.decision is not None or p.image_done:
            self.counters["image_late"] += 1
            log.warning("image arrived after the parcel was decided; not used", seq=p.seq, image=str(image))
            self._discard(image)
            return
        p.image_path, p.image_done = image, True
        p.last_input_at = max(p.last_input_at, t)
        self._settle(p)

    def on_poll(self, sent: float, now: float, prev_sent: float, encoder: int, speed_cps: float) -> None:
        """A status poll sent at ``sent`` returned at ``now`` (its triggers already handed over):
        place the trailing edges the encoder has passed, and every trigger captured before
        ``sent`` is known."""
        for seq, target in list(self._trailing.items()):
            past = c.encoder_delta(target, encoder)
            if past >= 0:
                del self._trailing[seq]
                lo, hi = capture_interval(now, prev_sent - self.publish_s, past, speed_cps, self.publish_s)
                self.matcher.set_trailing(seq, lo, hi)
            elif past < -(1 << 30):  # a controller restart left it behind: forget it
                del self._trailing[seq]
        self.matcher.set_horizon(sent - self.publish_s)
        self.tick(now)

    def tick(self, now: float) -> None:
        """Periodic: close read windows (and drop images that found no parcel)."""
        self._apply(self.matcher.advance(now))
        for seq, (image, t) in list(self._early_images.items()):
            if now - t > 1.0:
                del self._early_images[seq]
                self.counters["image_orphans"] += 1
                log.warning("image matched no parcel", seq=seq, image=str(image))
                self._discard(image)

    def _discard(self, image: Any) -> None:
        if self.vision is not None and self.cfg.vision.consume:
            self.vision.discard(image)

    def _settle(self, p: Parcel) -> None:
        """Wake the parcel's task once every source has answered."""
        if not p.read_settled and not self.matcher.expect(p.seq):
            p.read_settled = True
        if p.read_settled and (p.image_done or self.vision is None or self.image_seq is None):
            p.all_read.set()

    def _apply(self, events: list[Outcome | Note]) -> None:
        for ev in events:
            if isinstance(ev, Note):
                self._note(ev)
                continue
            p = self.parcels.get(ev.seq)
            if p is None or p.decision is not None:
                if ev.source == IMAGE_SOURCE and ev.payload is not None:
                    self._discard(ev.payload)
                continue
            if ev.source == IMAGE_SOURCE:
                p.image_path = ev.payload  # None unless an image was tied to it
                p.image_done = True
            else:
                frame = ev.payload if ev.status == "read" else None
                p.reads[ev.source] = ReaderOutcome(
                    ev.source,
                    frame.codes if frame is not None else (),
                    no_read=frame.no_read if frame is not None else False,
                    timed_out=ev.status == "timed_out",
                    problem="unmatched" if ev.unmatched else (
                        ev.status if ev.status in ("ambiguous", "conflict") else None
                    ),
                    counter=ev.counter,
                )
            if ev.t_frame is not None:
                p.last_input_at = max(p.last_input_at, ev.t_frame)
            self._settle(p)

    def _note(self, note: Note) -> None:
        if note.kind == "aligned":
            self.counters[f"reader_aligned_{note.source}"] += 1
            log.info("reader counter aligned", reader=note.source, detail=note.detail)
            return
        if note.kind in ("unmatched", "matched"):
            self.on_alarm("reader_unmatched", note.kind == "unmatched",
                          f"reader {note.source}: {note.detail}", subject=note.source)
            return
        self.counters[f"reader_{note.kind}"] += 1
        if note.source == IMAGE_SOURCE:
            if note.payload is not None:
                self._discard(note.payload)
            log.warning("image not tied to a parcel", kind=note.kind, seqs=list(note.seqs), detail=note.detail)
            return
        payload = getattr(note.payload, "raw", note.payload)
        log.warning(
            "reader frame not tied to a parcel" if note.kind in ("orphan", "ambiguous", "mismatch", "conflict",
                                                                  "counter_reset")
            else "reader fault", reader=note.source, kind=note.kind, seqs=list(note.seqs), detail=note.detail,
            frame=repr(payload)[:120] if payload is not None else None,
        )
        alarm = _NOTE_ALARMS.get(note.kind)
        if alarm:
            self.on_event(alarm, f"reader {note.source}: {note.detail}", subject=note.source, reason=note.kind)

    # --- the decision task --------------------------------------------------------------
    async def _run_parcel(self, p: Parcel) -> None:
        bound = structlog.contextvars.bound_contextvars(seq=p.seq)
        with bound:
            # leave room for the look-up, the image check and the command before the safety margin
            decide_by = p.deadline - self.margin_s - LOOKUP_RESERVE_S
            try:
                async with asyncio.timeout(max(0.0, decide_by - time.monotonic())):
                    await p.all_read.wait()
            except TimeoutError:
                self._apply(self.matcher.give_up(p.seq))  # a read not final by now is not trusted
                if not p.image_done:
                    p.image_done = True
            reads = tuple(p.reads.get(r) or ReaderOutcome(r, timed_out=True) for r in self.readers)
            waybill, _, _ = identify(reads, tuple(self.cfg.waybill.accept))
            p.verdict = self.verdicts.lookup(waybill) if waybill else None
            if waybill and p.verdict and p.verdict.status == "miss" and self.ask is not None:
                # leave room for the command and its acknowledgement before the deadline
                budget = p.deadline - self.margin_s - LOOKUP_RESERVE_S - time.monotonic()
                p.verdict = await self.ask(waybill, min(budget, self.cfg.verdicts.lookup_timeout_ms / 1000))
            image = await self._image_check(p)
            p.line_problems = self.problems
            p.mode = self.mode
            now = time.monotonic()
            late = now > p.deadline - self.margin_s
            p.decision = decide(
                DecisionInputs(
                    reads=reads,
                    accept_formats=tuple(self.cfg.waybill.accept),
                    verdict=p.verdict,
                    image=image,
                    line_problems=p.line_problems,
                    mode=p.mode,
                    late=late,
                )
            )
            p.decided_at = now
            p.lane = self.cfg.release_lane if p.decision.released else self.cfg.default_lane
            self.counters[f"decided_{p.decision.lane.value}"] += 1
            for reason in p.decision.reasons:
                self.counters[f"reason_{reason}"] += 1
            log.debug("decided", waybill=p.decision.waybill, lane=p.lane, reasons=p.decision.reasons)
            if late:
                p.ack = "not_sent_late"
                log.warning("decision late; controller will default to inspection", reasons=p.decision.reasons)
            else:
                await self._command(p)
            if self.vision is not None and p.image is not None:
                p.image_kept = await self.vision.after(
                    p.image, p.image_path, f"{self.cfg.line.site}-{self.cfg.line.line}-{p.key.replace(':', '-')}",
                    self.cfg.vision.consume,
                )
            self._keep_decision(p)

    async def _image_check(self, p: Parcel) -> ImageOutcome | None:
        """Classify the parcel's image within what is left of its deadline."""
        if self.vision is None:
            return None
        budget = p.deadline - self.margin_s - LOOKUP_RESERVE_S - time.monotonic()
        p.image = await self.vision.check(p.image_path, budget)
        self.counters[f"image_{p.image.status}"] += 1
        if p.image.status == "flagged":
            log.warning("image check flagged the parcel", item=p.image.top_class, score=p.image.score)
        return ImageOutcome(self.cfg.vision.mode == "required", p.image.status, p.image.detail)

    async def _command(self, p: Parcel) -> None:
        assert p.lane is not None
        self._cmd_counter = c.next_seq(self._cmd_counter)
        try:
            ack = await self.link.command(self._cmd_counter, p.seq, p.lane, ACK_TIMEOUT_S)
        except LinkError as exc:
            p.ack = "link_error"
            log.error("lane command failed", error=str(exc))
            return
        p.ack = ack.name.lower()
        p.command_at = time.monotonic()
        self.latencies_ms.append((p.command_at - p.last_input_at) * 1000)
        if ack is not c.AckCode.ACCEPTED:
            self.counters[f"ack_{p.ack}"] += 1
            log.warning("lane command not accepted", ack=p.ack, lane=p.lane)

    def _keep_decision(self, p: Parcel) -> None:
        """Keep the decision half of the record in memory and on disk until the result comes."""
        p.part = self._decision_part(p)
        task = asyncio.create_task(self.publisher.outbox.save_decision(p.key, messages.dumps(p.part)))
        self._persisting.add(task)
        task.add_done_callback(self._persisting.discard)

    # --- results and records ------------------------------------------------------------
    def result_cursor(self) -> int | None:
        """The last result-ring sequence already turned into a record (None on a first start)."""
        return self.publisher.outbox.cursor("results")

    def results_lost(self, n: int) -> None:
        self.counters["results_lost"] += n
        log.error("result ring overrun: parcels left without a record", missed=n)
        self.on_event("records_lost", f"{n} parcel results were overwritten before they were recorded")

    def on_result(self, entry: c.ResultEntry) -> None:
        key = decision_key(entry.seq, entry.encoder)
        p = self.parcels.get(entry.seq)
        if p is not None and p.key == key:
            del self.parcels[entry.seq]
            part = p.part
        else:
            stored = self.publisher.outbox.load_decision(key)  # decided by a previous agent run
            part = messages.loads(stored) if stored else None
        self.counters[f"result_{entry.disposition_name}"] += 1
        result = {
            "lane_commanded": entry.lane_commanded or None,
            "lane_reached": entry.lane_reached or None,
            "disposition": entry.disposition_name,
        }
        record = self._record(entry.seq, entry.encoder, part, result)
        self._records.put_nowait(
            RecordJob(record["record_id"], "parcels", messages.dumps(record), ("results", entry.rseq), key)
        )

    def sweep_results(self, now: float) -> None:
        """Parcels whose result never came: record them anyway (an audit trail has no holes)."""
        limit = self.cfg.health.result_timeout_s
        for seq, p in list(self.parcels.items()):
            if now - p.deadline > limit:
                del self.parcels[seq]
                self.counters["result_missing"] += 1
                log.error("no result from controller for parcel", seq=seq)
                result = {"lane_commanded": None, "lane_reached": None, "disposition": "no_result"}
                record = self._record(seq, p.trigger.encoder, p.part, result)
                self._records.put_nowait(
                    RecordJob(record["record_id"], "parcels", messages.dumps(record), None, p.key)
                )

    def queue_alarm(self, record_id: str, payload: bytes) -> None:
        self._records.put_nowait(RecordJob(record_id, "alarms", payload))

    async def run_recorder(self) -> None:
        """Commit records to the outbox in order. While it cannot store, nothing is released."""
        root = self.cfg.topic_root
        while True:
            self.recorder_alive = time.monotonic()
            try:
                async with asyncio.timeout(0.5):
                    job = await self._records.get()
            except TimeoutError:
                continue
            while True:
                self.recorder_alive = time.monotonic()
                try:
                    await self.publisher.put(
                        job.record_id, messages.topic(root, job.leaf), job.payload,
                        cursor=job.cursor, done_decision=job.done_decision,
                    )
                    if not self.outbox_ok:
                        self.outbox_ok = True
                        self.set_problems(tuple(p for p in self.problems if p != "outbox_unavailable"))
                        log.info("outbox writable again")
                        self.on_alarm("outbox_full", False, "outbox accepts records again")
                    break
                except Exception as exc:  # noqa: BLE001 - OutboxFull, a disk error: any failure stops releases
                    if self.outbox_ok:
                        log.error("cannot store parcel record; releasing stops", error=str(exc))
                        self.outbox_ok = False
                        self.set_problems(self.problems)
                        self.on_alarm("outbox_full", True, f"records cannot be stored: {exc}")
                    await asyncio.sleep(0.5)

    def _decision_part(self, p: Parcel) -> dict[str, Any]:
        d = p.decision
        return {
            "trigger": {
                "encoder": p.trigger.encoder,
                "length_mm": p.trigger.length_mm,
                "seen_at": messages.iso(p.seen_wall),
            },
            "reads": [
                {
                    "reader": r.reader, "codes": list(r.codes), "no_read": r.no_read, "timed_out": r.timed_out,
                    "problem": r.problem, "counter": r.counter,
                }
                for r in (p.reads.get(name) or ReaderOutcome(name, timed_out=True) for name in self.readers)
            ],
            "waybill": d.waybill if d else None,
            "code_checks": [
                {"code": k.code, "valid": k.valid, "format": k.format, "problem": k.problem}
                for k in (d.code_checks if d else ())
            ],
            "verdict": (
                {"status": p.verdict.status, "verdict": p.verdict.verdict, "verdict_id": p.verdict.verdict_id}
                if p.verdict else None
            ),
            "image": (
                p.image.record(self.vision.model_version, p.image_kept) if p.image and self.vision else None
            ),
            "line_problems": list(p.line_problems),
            "mode": p.mode.value,
            "decision": (
                {
                    "lane_class": d.lane.value,
                    "lane": p.lane,
                    "reasons": list(d.reasons),
                    "decision_ms": round(((p.decided_at or p.seen_at) - p.seen_at) * 1000, 2),
                }
                if d else None
            ),
            "command": {
                "lane": p.lane,
                "ack": p.ack,
                "margin_ms": round((p.deadline - p.command_at) * 1000, 1) if p.command_at else None,
            },
        }

    def _record(
        self, seq: int, encoder: int, part: dict[str, Any] | None, result: dict[str, Any]
    ) -> dict[str, Any]:
        site, line = self.cfg.line.site, self.cfg.line.line
        rec: dict[str, Any] = {
            "schema": messages.SCHEMA_PARCEL,
            "record_id": f"{site}:{line}:{seq}:{encoder}",
            "site": site,
            "line": line,
            "seq": seq,
            "recorded_at": messages.iso(),
            "agent": {"version": messages.agent_version(), "config_hash": self.config_hash},
        }
        if part is None:
            rec.update(
                trigger={"encoder": encoder, "length_mm": None, "seen_at": None}, reads=[], waybill=None,
                code_checks=[], verdict=None, image=None, line_problems=[], mode=None, decision=None,
                command=None, note="no decision by this agent (it was not running when the parcel passed)",
            )
        else:
            rec.update(part)
        rec["result"] = result
        return rec
