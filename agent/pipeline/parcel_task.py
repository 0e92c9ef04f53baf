"""The per-parcel task: deadline, verdict look-up, image check, decision, command, acknowledgement.

For every trigger one short task runs:

1. wait until every reader has given its final answer for the trigger (``Intake``), never past the
   parcel's deadline less the safety margin and a reserve for what follows (the task starts only
   then: a parcel waiting for its reads costs a timer, not a task);
2. identify the one valid waybill and look its verdict up in the local store, or ask central for
   it within what is left of the deadline;
3. check the X-ray image within what is left;
4. ``decide()`` (pure) -> whether every check passed, and the reasons; the sort plan
   (``sortplan.place``, pure) -> the lane;
5. write the lane to the controller's mailbox and check the acknowledgement (or, if it is too
   late for that, leave the parcel to the controller's default: inspection);
6. hand the decision half of the record to the recorder.

The deadline comes from the parcel's position: the controller's identity block says how many
encoder counts lie between the scan point and the decision point, the supervisor measures the belt
speed, so ``deadline = seen + remaining_counts / counts_per_second``. ``clock`` is injectable, so
the task runs in tests with a virtual clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import structlog

from agent.pipeline.decision import DecisionInputs, ImageOutcome, ReaderOutcome, decide, identify
from agent.pipeline.parcel import AckStatus, Parcel
from agent.pipeline.records import decision_part
from agent.pipeline.sortplan import place
from agent.pipeline.state import LaneCommander, LineState, VerdictAsk, VerdictSource
from firmware_bridge import contract as c
from firmware_bridge.errors import LinkError

if TYPE_CHECKING:  # OpenCV and LiteRT load only on lines that run the image check
    from agent.vision.check import VisionCheck

log = structlog.get_logger("sortgate.parcel")

__all__ = ["ACK_TIMEOUT_S", "LOOKUP_RESERVE_S", "ParcelRunner"]

ACK_TIMEOUT_S = 0.1
#: time kept back from the wait for reads, a verdict look-up or the image check for writing the
#: command before the safety margin
LOOKUP_RESERVE_S = 0.02


class ParcelRunner:
    def __init__(
        self,
        state: LineState,
        lanes: LaneCommander,
        verdicts: VerdictSource,
        give_up: Callable[[Parcel], None],
        keep: Callable[[Parcel, dict[str, Any]], None],
        vision: VisionCheck | None = None,
        ask: VerdictAsk | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.lanes = lanes
        self.verdicts = verdicts
        self.give_up = give_up  # the reads that are not final by the deadline become time-outs
        self.keep = keep  # the decision part goes to the recorder
        self.vision = vision
        self.ask = ask
        self.clock = clock
        cfg = state.cfg
        self.readers = [r.name for r in cfg.readers]
        self.margin_s = cfg.decision.safety_margin_ms / 1000
        self._cmd_counter = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # the end of the wait of each parcel whose reads are not final yet, by id(parcel) (its
        # trigger sequence may be a new session's parcel's too)
        self._waiting: dict[int, asyncio.TimerHandle] = {}

    def continue_from(self, counter: int) -> None:
        """The next command counter follows ``counter`` (the controller's last acknowledged)."""
        self._cmd_counter = counter

    def start(self, p: Parcel) -> None:
        """Run the parcel's task once its reads are final (``Parcel.settled``), or when the wait
        for them must end (then ``run`` gives up on what is still open). Until then the parcel
        costs no task: only a timer."""
        if p.all_read.is_set():
            self._spawn(p)
            return
        timer = asyncio.get_running_loop().call_later(max(0.0, self._left(p)), self._wait_over, p)
        self._waiting[id(p)] = timer
        p.when_read = self._read

    def _read(self, p: Parcel) -> None:
        timer = self._waiting.pop(id(p), None)
        if timer is not None:
            timer.cancel()
        self._spawn(p)

    def _wait_over(self, p: Parcel) -> None:
        self._waiting.pop(id(p), None)
        p.when_read = None
        self._spawn(p)

    def _spawn(self, p: Parcel) -> None:
        task = asyncio.create_task(self.run(p), name=f"parcel-{p.seq}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The parcel got no command, so the controller defaults it to inspection; the
            # sweep records it. A bug here must be loud, never silent.
            self.state.metrics.count("parcel_task_errors")
            log.error("parcel task failed", task=task.get_name(), error=repr(task.exception()))

    async def stop(self) -> None:
        """A clean stop: cancel the parcels in flight (the controller defaults them) and wait."""
        for timer in self._waiting.values():
            timer.cancel()
        self._waiting.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _left(self, p: Parcel) -> float:
        """Seconds left for a look-up or the image check before the command must go out."""
        return p.deadline - self.margin_s - LOOKUP_RESERVE_S - self.clock()

    async def run(self, p: Parcel) -> None:
        cfg = self.state.cfg
        with structlog.contextvars.bound_contextvars(seq=p.seq):
            try:
                async with asyncio.timeout(max(0.0, self._left(p))):
                    await p.all_read.wait()
            except TimeoutError:
                self.give_up(p)
            reads = tuple(p.reads.get(r) or ReaderOutcome(r, timed_out=True) for r in self.readers)
            waybill, _, _ = identify(reads, tuple(cfg.waybill.accept))
            p.verdict = self.verdicts.lookup(waybill) if waybill else None
            if waybill and p.verdict and p.verdict.status == "miss" and self.ask is not None:
                # leave room for the command and its acknowledgement before the deadline
                p.verdict = await self.ask(waybill, min(self._left(p), cfg.verdicts.lookup_timeout_ms / 1000))
            image = await self._image_check(p)
            p.line_problems = self.state.problems
            p.mode = self.state.mode
            now = self.clock()
            late = now > p.deadline - self.margin_s
            p.decision = decide(DecisionInputs(
                reads=reads, accept_formats=tuple(cfg.waybill.accept), verdict=p.verdict, image=image,
                line_problems=p.line_problems, mode=p.mode, late=late,
            ))
            p.decided_at = now
            plan = self.state.plan  # read once: a plan replaced meanwhile applies from the next parcel
            placed = place(plan, p.decision, p.verdict, self.state.lane_full_bits, p.rounds)
            p.decision, p.lane, p.rule, p.overflowed, p.plan_version = (
                placed.decision, placed.lane, placed.rule, placed.overflowed, plan.version
            )
            if placed.overflowed:
                self.state.metrics.count("overflowed")
            if placed.lane == plan.recirculation_lane:
                self.state.sent_round(p.seq, p.rounds)
            self.state.metrics.count(f"decided_{p.decision.lane.value}")
            for reason in p.decision.reasons:
                self.state.metrics.count(f"reason_{reason}")
            log.debug("decided", waybill=p.decision.waybill, lane=p.lane, reasons=p.decision.reasons)
            if late:
                p.ack = "not_sent_late"
                log.warning("decision late; controller will default to inspection", reasons=p.decision.reasons)
            else:
                await self._command(p)
            if self.vision is not None and p.image is not None:
                p.image_kept = await self.vision.after(
                    p.image, p.image_path, f"{cfg.line.site}-{cfg.line.line}-{p.key.replace(':', '-')}",
                    cfg.vision.consume,
                )
            self.keep(p, decision_part(p, self.readers, self.vision.model_version if self.vision else None))

    async def _image_check(self, p: Parcel) -> ImageOutcome | None:
        """Classify the parcel's image within what is left of its deadline."""
        if self.vision is None:
            return None
        p.image = await self.vision.check(p.image_path, self._left(p), p.image_started)
        self.state.metrics.count(f"image_{p.image.status}")
        if p.image.status == "flagged":
            log.warning("image check flagged the parcel", item=p.image.top_class, score=p.image.score)
        return ImageOutcome(self.state.cfg.vision.mode == "required", p.image.status, p.image.detail)

    async def _command(self, p: Parcel) -> None:
        assert p.lane is not None
        self._cmd_counter = c.next_seq(self._cmd_counter)
        try:
            ack = await self.lanes.command(self._cmd_counter, p.seq, p.lane, ACK_TIMEOUT_S)
        except LinkError as exc:
            p.ack = "link_error"
            log.error("lane command failed", error=str(exc))
            return
        p.ack = cast(AckStatus, ack.name.lower())
        p.command_at = self.clock()
        self.state.metrics.latency((p.command_at - p.last_input_at) * 1000)
        if ack is not c.AckCode.ACCEPTED:
            self.state.metrics.count(f"ack_{p.ack}")
            log.warning("lane command not accepted", ack=p.ack, lane=p.lane)
