"""Controller supervisor: keeps the Modbus link up and turns polls into line events.

One task owns the link's life: connect (identity checked), measure the belt, then let the link's
I/O thread poll the status block every ``idle_poll_ms`` (sooner, but at most once per
``poll_interval_ms``, when a held reader frame or an early image asks for the poll that can tell it
which triggers exist) with the agent heartbeat on it (``firmware_bridge.poller``). The thread hands over only
the polls the line has a use for; this task reads the trigger and result rings when their heads
move and keeps the heartbeat's lease while the agent is whole. Read windows close on the intake's
own timer, not on polls. A lost link is retried with jittered doubling delay up to
``reconnect_max_s``, logged once at error level and once on recovery; while it is down the line is
unhealthy (every decision is inspection, and the controller's watchdog does the same on its side).
A contract mismatch is fatal: it is not retried.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import structlog

from agent.config import Config
from agent.nudge import Nudge
from agent.pipeline.pipeline import Pipeline
from firmware_bridge import contract as c
from firmware_bridge.backoff import Backoff
from firmware_bridge.errors import ContractMismatch, LinkError
from firmware_bridge.modbus_link import ControllerLink
from firmware_bridge.poller import Poll, Poller, SpeedEstimator

log = structlog.get_logger("sortgate.controller")


class ControllerRestarted(LinkError):
    """The controller's sequences started again (CTRL_BOOT changed, or a ring head went back)."""


class ControllerSupervisor:
    def __init__(
        self, cfg: Config, link: ControllerLink, pipeline: Pipeline, healthy: Callable[[], bool] = lambda: True,
        lease_s: float = 0.4,
    ) -> None:
        self.cfg = cfg
        self.link = link
        self.pipeline = pipeline
        self.healthy = healthy  # False while a vital task is dead or stuck: no heartbeat then
        self.lease_s = lease_s  # how long one ``keep_alive`` lets the heartbeat go on
        self.speed = SpeedEstimator()
        self.connected = asyncio.Event()
        self._alive = time.monotonic()  # the task's last turn outside a session (liveness)
        # what this process last saw of the controller, to notice a restart between sessions
        self._boot: int | None = None
        self._heads: tuple[int, int] | None = None  # (trigger head, result head reached)
        self._per_lane = False  # the connected controller takes a full lane as that lane's alone (1.3)
        # the session's poller, and the polls (or the error) it has handed over, in order
        self._poller: Poller | None = None
        self._polls: deque[Poll | Exception] = deque()
        self._woken = Nudge()
        self._busy = False  # the session task is taking a poll (others queue behind it)
        self._told_fc23 = False
        self._status: tuple[c.Status, float] | None = None  # before a poller runs
        # why and since when the link is down
        self.error: str | None = "not connected yet"
        self.down_since = time.time()

    def check_identity(self, ident: c.Identity) -> None:
        """Refuse a controller whose constants do not fit this line's config."""
        problems = []
        gates = [lane.gate for lane in self.cfg.lanes if lane.gate is not None]
        if gates and max(gates) > ident.gate_count:
            problems.append(f"config uses gate {max(gates)} but the controller has {ident.gate_count}")
        lanes = [lane.number for lane in self.cfg.lanes]
        if max(lanes) > ident.lane_count:
            problems.append(f"config uses lane {max(lanes)} but the controller has {ident.lane_count}")
        if ident.default_lane != self.cfg.default_lane:
            problems.append(
                f"controller default lane {ident.default_lane} != config inspection lane {self.cfg.default_lane}"
            )
        loop = next((lane.number for lane in self.cfg.lanes if lane.role == "recirculation"), None)
        if loop is not None and ident.contract_minor < c.PER_LANE_FULL_MINOR:
            problems.append(
                f"config has a recirculation lane ({loop}) but the controller speaks contract "
                f"{ident.contract_major}.{ident.contract_minor}; the loop needs 1.3 (previous-pass SEQs)"
            )
        if self.cfg.controller.heartbeat_interval_ms * 2 > ident.watchdog_ms:
            problems.append(
                f"heartbeat_interval_ms {self.cfg.controller.heartbeat_interval_ms} is more than half the "
                f"controller watchdog ({ident.watchdog_ms} ms)"
            )
        if problems:
            raise ContractMismatch(f"{self.link.settings.describe()}: " + "; ".join(problems))

    async def run(self) -> None:
        backoff = Backoff(0.2, max(0.2, self.cfg.controller.reconnect_max_s))
        failing = False
        while True:
            try:
                ident = await self.link.connect()
                self.check_identity(ident)
                self.pipeline.state.identity = ident
                # a full lane defaults only its own parcels (contract 1.3 and later): known per connection
                self._per_lane = ident.contract_minor >= c.PER_LANE_FULL_MINOR
                log.info(
                    "controller connected", link=self.link.settings.describe(),
                    contract=f"{ident.contract_major}.{ident.contract_minor}",
                    firmware=".".join(map(str, ident.firmware)), counts_per_metre=ident.counts_per_metre,
                    decision_distance_counts=ident.decision_distance_counts, watchdog_ms=ident.watchdog_ms,
                )
                if failing:
                    log.info("controller link recovered")
                failing = False
                self.error = None
                backoff.reset()
                await self._session()
            except ContractMismatch:
                raise
            except ControllerRestarted as exc:
                # a new session settles the parcels in flight (after the usual short delay: a
                # controller whose heads keep going back must not spin this loop)
                self.error, self.down_since = f"controller restarted: {exc}", time.time()
                self.connected.clear()
                self.pipeline.set_problems(("controller_offline",))
                log.warning("controller restarted; starting a new session", why=str(exc))
            except LinkError as exc:
                if self.error is None:
                    self.down_since = time.time()
                self.error = str(exc)
                self.connected.clear()
                self.pipeline.set_problems(("controller_offline",))
                if not failing:
                    log.error("controller link down", error=str(exc), frames=self.link.dump_frames()[-8:])
                    self.pipeline.state.alarms.condition("controller_offline", True, str(exc))
                    failing = True
                else:
                    log.debug("controller still unreachable", error=str(exc))
            self.link.close()
            self._alive = time.monotonic()
            await asyncio.sleep(backoff.next())

    def _restart_reason(self, status: c.Status) -> str | None:
        """Why the controller must have restarted since we last saw it (None: it has not)."""
        boot = self._boot if self._boot is not None else self.pipeline.controller_boot()
        if status.boot and boot and status.boot != boot:
            return f"CTRL_BOOT {boot} -> {status.boot}"
        trigger_head, result_head = self._heads or (0, self.pipeline.result_cursor() or 0)
        if c.seq_went_back(result_head, status.result_head):
            return f"RESULT_HEAD went back from {result_head} to {status.result_head}"
        if c.seq_went_back(trigger_head, status.trigger_head):
            return f"TRIGGER_HEAD went back from {trigger_head} to {status.trigger_head}"
        return None

    def _check_restart(self, status: c.Status) -> None:
        why = self._restart_reason(status)
        if why is not None:
            raise ControllerRestarted(why)

    async def _resume(self, status: c.Status) -> int:
        """Where this session's results start; also the heads the next poll is compared with.
        After a controller restart, every parcel in flight gets its record first and results count
        from the new boot's first; on a first start the position is marked durably at once, so that
        parcels passing while a killed agent is down still get their records from the ring."""
        why = self._restart_reason(status)
        self._boot = status.boot
        if why is not None:
            n = await self.pipeline.controller_restarted(status.boot)
            log.warning("controller restarted: parcels in flight recorded without a result", why=why, parcels=n)
            self.pipeline.state.alarms.event("controller_restarted", f"{why}; {n} parcels in flight had no result")
            start = 0
        elif self._heads is not None:  # a reconnect within this process: what it already read
            start = self._heads[1]
        else:
            cursor = self.pipeline.result_cursor()
            if cursor is None or self.pipeline.controller_boot() != status.boot:
                cursor = status.result_head if cursor is None else cursor
                self.pipeline.mark_results(cursor, status.boot)
            start = cursor
        self._heads = (status.trigger_head, start)
        return start

    def _take_results(self, done_up_to: int, head: int, entries: dict[int, c.ResultEntry]) -> int:
        """Hand every result after ``done_up_to`` to the line (``entries``: the slots the I/O
        thread read for them); returns the new position."""
        rseqs = c.ring_entries_between(done_up_to, head, c.RESULT_RING_LEN)
        missed = c.seq_distance(done_up_to, head) - len(rseqs)
        if missed > 0:
            self.pipeline.results_lost(missed)
        for rseq in rseqs:
            entry = entries.get(rseq)
            if entry is None:
                continue
            if entry.seq == 0 or entry.disposition not in c.DISPOSITIONS:
                self.pipeline.state.metrics.count("results_malformed")
                log.error("malformed result entry ignored", rseq=rseq, seq=entry.seq, disposition=entry.disposition)
                continue
            self.pipeline.on_result(entry)
        return head

    async def _measure_speed(self) -> c.Status:
        """Know the belt's speed before deciding anything: deadlines and the time a trigger was
        captured both come from it. Returns the last status polled."""
        status = await self.link.poll()
        self.speed = SpeedEstimator()
        self.speed.update(time.monotonic(), status.encoder)
        for _ in range(40):  # ~1 s at most; an encoder that never moves must not hang the session
            if self.speed.cps > 0.0:
                break
            await asyncio.sleep(self.speed.min_span_s / 2)
            status = await self.link.poll()
            if not status.bits & c.StatusBit.BELT_RUNNING:
                break  # a stopped belt: no parcel moves, and none can be released (belt_stopped)
            self.speed.update(time.monotonic(), status.encoder)
        return status

    # --- what sortgate status shows -------------------------------------------------------
    @property
    def alive(self) -> float:
        """The last poll in a session (the I/O thread's), else the task's own last turn."""
        poller = self._poller
        return poller.turned_at if poller is not None else self._alive

    @property
    def status(self) -> c.Status | None:
        """The last status polled: this session's, else the last session's."""
        latest = (self._poller.latest if self._poller is not None else None) or self._status
        return latest[0] if latest else None

    @property
    def polled_at(self) -> float:
        """When ``status`` was polled (monotonic)."""
        if self._poller is not None and self._poller.latest_at is not None:
            return self._poller.latest_at
        return self._status[1] if self._status else 0.0

    # --- a session --------------------------------------------------------------------------
    async def _session(self) -> None:
        cc = self.cfg.controller
        status = await self._measure_speed()
        result_head = await self._resume(status)
        # Triggers up to this head are not ours to decide (they default); frames of theirs may still
        # arrive, so the matcher must not take any trigger before this moment as known.
        self.pipeline.new_session(time.monotonic(), status.ack_counter)
        poller = Poller(
            idle_s=cc.idle_poll_ms / 1000, min_gap_s=cc.poll_interval_ms / 1000,
            heartbeat_s=cc.heartbeat_interval_ms / 1000,
            heartbeat=status.agent_heartbeat,  # continue from the register: the first write is a change
            speed=self.speed, results_read=result_head, prev_sent=time.monotonic(),
            read_results=self.link.t_read_results, edge_close=self.pipeline.intake.edge_close,
        )
        self._polls.clear()
        self._busy = self._told_fc23 = False
        self._poller = poller
        self.keep_alive(time.monotonic())
        self.link.start_polling(poller, lambda poll: self._handed_over(poller, poll))
        self.pipeline.intake.ask_poll = self.link.poll_at
        self.connected.set()
        try:
            while True:
                await self._woken.wait()
                self._woken.clear()
                while self._polls:
                    poll = self._polls.popleft()
                    if isinstance(poll, Exception):
                        raise poll
                    self._busy = True
                    try:
                        entries = self._carried_triggers(poll.status)
                        if entries is None:
                            entries = await self._read_triggers(poll.status)
                        self._take(poll, entries)
                    finally:
                        self._busy = False
        finally:
            self.pipeline.intake.ask_poll = _no_poll
            self._status = poller.latest
            self._poller = None

    def _handed_over(self, poller: Poller, poll: Poll | Exception) -> None:
        """Event loop: a poll from the I/O thread, or the error that ended polling (in order).
        A poll that needs no read of its own (most do not: the status block carries the newest
        trigger) is taken here and now, without a turn of the session task; others, and any
        poll behind one still being taken, wait for the task in order."""
        if poller is not self._poller:
            return  # a poll of a session that has ended
        if isinstance(poll, Exception) or self._polls or self._busy:
            self._polls.append(poll)
            self._woken.set()
            return
        try:
            entries = self._carried_triggers(poll.status)
            if entries is None:
                self._polls.append(poll)  # new triggers to read: the task does it
                self._woken.set()
                return
            self._take(poll, entries)
        except Exception as exc:  # noqa: BLE001 - the session task ends with it, as if it had taken the poll
            self._polls.append(exc)
            self._woken.set()

    def keep_alive(self, now: float) -> None:
        """The agent is whole (called at each housekeeping turn, after the vital tasks are
        checked): the heartbeat may go on for ``lease_s``. Only a whole agent keeps the
        controller's watchdog fed; with a dead or stuck task, or the event loop stalled, the
        heartbeat stops within ``lease_s``, the watchdog trips and the controller sends every
        parcel to inspection."""
        if self._poller is not None and self.healthy():
            self._poller.renew(now + self.lease_s)

    def _take(self, poll: Poll, entries: dict[int, c.TriggerEntry]) -> None:
        """One poll the line has a use for (its new triggers' ``entries`` in hand): problems, new
        triggers, due results, the horizon."""
        status, now = poll.status, poll.seen
        trigger_head, result_head = self._heads or (status.trigger_head, 0)
        self.pipeline.set_lane_full(status.lane_full_bits, self._per_lane)
        problems = status.problems(self.cfg.default_lane if self._per_lane else None)
        self.pipeline.set_problems(problems + (("controller_frozen",) if poll.frozen else ()))
        if status.trigger_head != trigger_head:
            seqs = c.ring_entries_between(trigger_head, status.trigger_head, c.TRIGGER_RING_LEN)
            if c.seq_distance(trigger_head, status.trigger_head) > len(seqs):
                self.pipeline.state.metrics.count("trigger_ring_overruns")
                log.error("trigger ring overrun: parcels missed (they default to inspection)")
            for seq in seqs:
                if seq in entries:
                    self.pipeline.on_trigger(entries[seq], status.encoder, poll.cps, poll.sent, now,
                                              poll.prev_sent)
            trigger_head = status.trigger_head
        if poll.results is not None:
            # results are not urgent (a record, not a decision): read in batches with a poll (the
            # poller's rule), on the I/O thread
            result_head = self._take_results(result_head, status.result_head, poll.results)
        self._heads = (trigger_head, result_head)
        self.pipeline.on_poll(poll.sent, now, poll.prev_sent, status.encoder, poll.cps, poll.history)
        if self._poller is not None:
            intake = self.pipeline.intake
            self._poller.follow(intake.trailing_edges())
            if (at := intake.wanted_poll()) is not None:  # inputs still wait: the poll that resolves them
                self.link.poll_at(at)
        if self.link.fc23 is False and not self._told_fc23:
            self._told_fc23 = True
            log.info("controller does not implement function 23: writes and reads go separately")

    def _carried_triggers(self, status: c.Status) -> dict[int, c.TriggerEntry] | None:
        """The entries of the triggers new in this poll when it carries them itself (none new, or
        one: the newest trigger is in the status block, contract 1.2); None: they must be read.
        Raises ControllerRestarted first if the poll shows the controller started again."""
        self._check_restart(status)
        trigger_head = self._trigger_head(status)
        if status.trigger_head == trigger_head:
            return {}
        newest = status.newest_trigger
        if (newest is not None and newest.seq == status.trigger_head
                and c.seq_distance(trigger_head, status.trigger_head) == 1):
            return {newest.seq: newest}
        return None

    async def _read_triggers(self, status: c.Status) -> dict[int, c.TriggerEntry]:
        """The trigger-ring entries new in this poll, read from the ring."""
        seqs = c.ring_entries_between(self._trigger_head(status), status.trigger_head, c.TRIGGER_RING_LEN)
        loop = self.pipeline.state.plan.recirculation_lane is not None
        return await self.link.read_triggers(seqs, prev=loop)

    def _trigger_head(self, status: c.Status) -> int:
        """The trigger head this session has taken (set from the first poll by ``_resume``)."""
        return self._heads[0] if self._heads else status.trigger_head


def _no_poll(at: float) -> None:
    """Outside a session there is no poll to ask for."""
