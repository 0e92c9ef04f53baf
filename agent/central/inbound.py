"""Everything central sends: verdict batches, answers to look-ups, commands.

Nothing inbound can crash, stall, deafen or loosen the agent. Every message is size-limited,
parsed strictly and validated (``messages``); verdicts then pass the cheap checks (known key, scope,
lifetime, expiry, replay) and only then the signature check, which runs on a worker thread so the
event loop keeps its heartbeat. What is rejected is counted, logged (rejected verdict items a few
per reason at a time: ``REJECT_LOG_MAX``), and raised as a rate-limited alarm event; a command
gets an error reply on an allowed reply topic. A failure inside a handler is logged and counted,
never raised. Retained messages on input topics are ignored: a command or batch must not replay
itself at every reconnect.

Flood control: inbound messages are admitted by a token bucket (``max_inbound_per_s``) into a
bounded queue, and pushed verdict items by a second one (``max_verdict_items_per_s``); beyond
either, they are dropped and counted (``inbound_flood``). Answers to our own look-ups bypass both,
so a flood of batches cannot starve a parcel's deadline.

Commands (``set_mode``, ``status``) are routed to ``commands.Commands``: loosening the mode needs
central's signature, and replies go only to allowed topics. Sort plans go to
``plans.PlanUpdates`` (signed, whole, or refused).

Look-ups use MQTT 5 request/response: a request on ``{root}/verdicts/request`` with response topic
``{root}/verdicts/answer`` and a fresh correlation id; the answer must come back before the
parcel's deadline, or the parcel goes to inspection (``verdict_timeout``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from agent.central import messages
from agent.central.alarms import Alarms
from agent.central.commands import Commands
from agent.central.messages import VerdictAnswer, VerdictItem
from agent.central.mode_store import ModeStore
from agent.central.mqtt import MessageMeta, MqttLink
from agent.central.security import Check, KeyRing, check_validity
from agent.central.verdicts import VerdictStore
from agent.config import Config
from agent.pipeline.decision import Mode, VerdictLookup
from agent.pipeline.waybill import normalize
from firmware_bridge.modbus_link import ControllerLink

if TYPE_CHECKING:
    from agent.central.plans import PlanUpdates

log = structlog.get_logger("sortgate.inbound")


#: signature checks handed to the worker thread at once (an answer waits behind one chunk at most)
VERIFY_CHUNK = 128
#: rejected verdict items logged one by one, per reason, within each REJECT_LOG_S; beyond that one
#: line says the rest are counted only (a flood of forged items must not become a flood of log
#: lines: thousands written in a burst hold the event loop long enough to time a reader frame
#: outside its window, and fill the journal)
REJECT_LOG_MAX = 5
REJECT_LOG_S = 10.0


class TokenBucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.t = time.monotonic()

    def take(self, n: int = 1) -> int:
        """Take up to ``n`` tokens; returns how many were available."""
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.t) * self.rate)
        self.t = now
        got = min(n, int(self.tokens))
        self.tokens -= got
        return got


class Inbound:
    def __init__(
        self,
        cfg: Config,
        verdicts: VerdictStore,
        keyring: KeyRing | None,
        alarms: Alarms,
        mqtt: MqttLink,
        link: ControllerLink,
        counters: Counter[str],
        set_mode: Callable[[Mode], None],
        status: Callable[[], dict[str, Any]],
        modes: ModeStore,
    ) -> None:
        self.cfg = cfg
        self.root = cfg.topic_root
        self.verdicts = verdicts
        self.keyring = keyring
        self.alarms = alarms
        self.mqtt = mqtt
        self.counters = counters
        self.check_signatures = keyring is not None and cfg.verdicts.require_signatures
        self.queue: asyncio.Queue[tuple[str, bytes, MessageMeta]] = asyncio.Queue(maxsize=1000)
        self.bucket = TokenBucket(cfg.mqtt.max_inbound_per_s)
        self.items = TokenBucket(cfg.mqtt.max_verdict_items_per_s)
        self._pending: dict[bytes, asyncio.Future[bytes]] = {}
        self._verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verdict-verify")
        self.alive = time.monotonic()  # the handler loop's last turn (for the liveness check)
        self._waiting = False
        self._reject_log: dict[str, tuple[float, int]] = {}  # reason -> (window start, logged in it)
        self.commands = Commands(
            cfg, keyring, alarms, mqtt, link, counters, set_mode, status, modes,
            verify_signed=self.verify_signed, report_invalid=self._invalid,
        )
        self.plans: PlanUpdates | None = None  # set by the runtime (it needs the pipeline's state)

    # --- admission (loop thread, straight from paho's callback) --------------------------
    def offer(self, topic: str, payload: bytes, meta: MessageMeta) -> None:
        if meta.retain:
            self.counters["inbound_retained"] += 1
            self._invalid(topic, "retained message on an input topic: ignored")
            return
        if topic == messages.topic(self.root, "verdicts/answer"):
            fut = self._pending.get(meta.correlation or b"")
            if fut is not None and not fut.done():
                fut.set_result(payload)
            else:  # late, unsolicited or a second answer: nobody waits for it
                self.counters["answers_unexpected"] += 1
                log.info("look-up answer nobody waits for; ignored", topic=topic)
            return
        if not self.bucket.take() or self.queue.full():
            self.counters["inbound_dropped"] += 1
            limit = self.cfg.mqtt.max_inbound_per_s
            self.alarms.event("inbound_flood", f"inbound messages over {limit}/s dropped", topic=topic)
            return
        self.queue.put_nowait((topic, payload, meta))

    def last_turn(self) -> float:
        """For the vital-task check: now while it waits for a message, else its last turn."""
        return time.monotonic() if self._waiting else self.alive

    async def run(self) -> None:
        try:
            while True:
                self.alive = time.monotonic()
                self._waiting = True  # waiting for a message is not being stuck (and needs no timer)
                topic, payload, meta = await self.queue.get()
                self._waiting, self.alive = False, time.monotonic()  # its turn starts now, not when it began to wait
                try:
                    await self._handle(topic, payload, meta)
                except Exception as exc:  # one message must never stop the others (logged with its trace)
                    self.counters["inbound_errors"] += 1
                    log.error("inbound message failed; ignored", topic=topic[:200], error=repr(exc), exc_info=True)
        finally:
            self._verifier.shutdown(wait=False, cancel_futures=True)

    async def _handle(self, topic: str, payload: bytes, meta: MessageMeta) -> None:
        leaf = topic.removeprefix(self.root + "/")
        if leaf == "verdicts":
            await self._batch(payload)
        elif leaf == "cmd":
            await self.commands.handle(payload, meta)
        elif leaf == "plan" and self.plans is not None:
            await self.plans.offer(payload)
        else:
            self._invalid(topic, "no handler for this topic")

    def _invalid(self, topic: str, problem: str) -> None:
        self.counters["inbound_invalid"] += 1
        log.warning("inbound message rejected", topic=topic, problem=problem)
        self.alarms.event("inbound_invalid", problem, topic=topic)

    # --- verdicts ----------------------------------------------------------------------
    async def _batch(self, payload: bytes) -> None:
        """A pushed batch, a slice of ``VERIFY_CHUNK`` items at a time with the loop given back
        between slices: a 1 MB batch parsed in one go holds the loop for about 30 ms, long enough
        to timestamp a reader frame outside its parcel's window. Items over the budget are dropped
        before they cost a parse."""
        where = messages.topic(self.root, "verdicts")
        batch_id, raws, problem = messages.parse_verdict_envelope(payload)
        if problem is not None:
            self._invalid(where, f"batch {batch_id}: {problem}")
            return
        admitted = self.items.take(len(raws))
        if admitted < len(raws):
            dropped = len(raws) - admitted
            self.counters["verdicts_dropped_flood"] += dropped
            limit = self.cfg.mqtt.max_verdict_items_per_s
            log.warning("verdict items over the budget dropped", batch_id=batch_id, dropped=dropped)
            self.alarms.event("inbound_flood", f"{dropped} verdict items over {limit}/s dropped", reason="items")
        reported = accepted = 0
        for start in range(0, admitted, VERIFY_CHUNK):
            if start:
                await asyncio.sleep(0)
            items, problems = messages.parse_verdict_items(raws[start : min(start + VERIFY_CHUNK, admitted)], start)
            for p in problems[: max(0, 5 - reported)]:
                self._invalid(where, f"batch {batch_id}: {p}")
            reported += len(problems)
            if items:
                accepted += len(await self.accept(items))
        log.debug("verdict batch", batch_id=batch_id, items=admitted, accepted=accepted)

    async def accept(self, items: list[tuple[VerdictItem, dict[str, Any]]]) -> list[VerdictItem]:
        """Run every check, cheap ones first and signatures off the loop; store the items that
        pass. Returns the items now in the store (new ones and identical redeliveries)."""
        now = datetime.now(UTC)
        passed: list[tuple[VerdictItem, dict[str, Any]]] = []
        duplicates: list[VerdictItem] = []
        for item, raw in items:
            reason = self._cheap_reason(item, raw, now)
            if reason == "duplicate":
                self.counters["verdicts_duplicate"] += 1
                duplicates.append(item)
            elif reason is not None:
                self._rejected(item, reason)
            else:
                passed.append((item, raw))
        good: list[VerdictItem] = []
        if self.check_signatures and passed:
            loop = asyncio.get_running_loop()
            for i in range(0, len(passed), VERIFY_CHUNK):
                chunk = passed[i : i + VERIFY_CHUNK]
                checks = await loop.run_in_executor(self._verifier, self._verify, [raw for _, raw in chunk])
                for (item, _), check in zip(chunk, checks, strict=True):
                    if check.ok:
                        good.append(item)
                    else:
                        self._rejected(item, check.reason or "bad_signature")
        else:
            good = [item for item, _ in passed]
        if good:
            await self._store(good)
        return good + duplicates

    async def _store(self, items: list[VerdictItem]) -> None:
        """Keep verdicts; a disk that cannot take them (full, failing) is an alarm until it can.
        Those verdicts are then not kept: their parcels are asked for (look-up) or inspected."""
        try:
            self.counters["verdicts_stored"] += await self.verdicts.store(items)
        except (sqlite3.Error, OSError) as exc:
            self.counters["verdicts_store_failed"] += len(items)
            log.error("cannot store verdicts; they are not kept", items=len(items), error=str(exc))
            self.alarms.condition("verdict_store_failed", True, f"{len(items)} verdicts not stored: {exc}")
            return
        self.alarms.condition("verdict_store_failed", False, "verdicts are stored again")

    async def verify_signed(self, raw: dict[str, Any]) -> Check:
        """One signature check on the worker thread (a signed command or plan)."""
        loop = asyncio.get_running_loop()
        return (await loop.run_in_executor(self._verifier, self._verify, [raw]))[0]

    def _verify(self, raws: list[dict[str, Any]]) -> list[Check]:
        """Worker thread: signature checks only (pure CPU, no agent state)."""
        assert self.keyring is not None
        return [self.keyring.verify(raw) for raw in raws]

    def _cheap_reason(self, item: VerdictItem, raw: dict[str, Any], now: datetime) -> str | None:
        """Every check but the signature's, cheapest first."""
        v = self.cfg.verdicts
        if self.check_signatures:
            assert self.keyring is not None
            if not isinstance(raw.get("signature"), str) or not isinstance(raw.get("key_id"), str):
                return "unsigned"
            if raw["key_id"] not in self.keyring.keys:
                return "unknown_key"
        if item.site not in (None, self.cfg.line.site) or item.line not in (None, self.cfg.line.line):
            return "out_of_scope"
        if v.require_scope and (item.site is None or item.line is None):
            return "out_of_scope"
        if v.max_lifetime_s is not None:
            expires = item.expires_at.timestamp() if item.expires_at else item.issued_at.timestamp() + v.default_ttl_s
            if expires - item.issued_at.timestamp() > v.max_lifetime_s:
                return "lifetime"
        validity = check_validity(item.issued_at, item.expires_at, now, v.max_clock_skew_s)
        if not validity.ok:
            return validity.reason
        return self.verdicts.replay_check(item)

    def _rejected(self, item: VerdictItem, reason: str) -> None:
        self.counters[f"verdicts_rejected_{reason}"] += 1
        now = time.monotonic()
        start, logged = self._reject_log.get(reason, (now, 0))
        if now - start >= REJECT_LOG_S:
            start, logged = now, 0
        if logged < REJECT_LOG_MAX:
            log.warning("verdict rejected", reason=reason, waybill=item.waybill, verdict_id=item.verdict_id)
        elif logged == REJECT_LOG_MAX:
            log.warning("more verdicts rejected; counted, not logged one by one", reason=reason,
                        counter=f"verdicts_rejected_{reason}", for_s=round(REJECT_LOG_S - (now - start), 1))
        self._reject_log[reason] = (start, logged + 1)
        self.alarms.event("verdict_rejected", f"{reason}: verdict {item.verdict_id} for {item.waybill}", reason=reason)

    async def ask(self, waybill: str, timeout_s: float) -> VerdictLookup:
        """Ask central for a verdict, waiting at most ``timeout_s``."""
        if timeout_s <= 0.005 or not self.mqtt.connected.is_set():
            return VerdictLookup("timeout")
        corr = uuid.uuid4().bytes
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        self.counters["lookups"] += 1
        request = {
            "schema": messages.SCHEMA_VERDICT_REQUEST,
            "waybill": waybill,
            "site": self.cfg.line.site,
            "line": self.cfg.line.line,
            "request_id": corr.hex(),
            "deadline_ms": int(timeout_s * 1000),
        }
        self.mqtt.publish(
            messages.topic(self.root, "verdicts/request"), messages.dumps(request), qos=1,
            response_topic=messages.topic(self.root, "verdicts/answer"), correlation=corr,
        )
        try:
            async with asyncio.timeout(timeout_s):
                payload = await fut
        except TimeoutError:
            self.counters["lookups_timeout"] += 1
            return VerdictLookup("timeout")
        finally:
            self._pending.pop(corr, None)
        answer, problem = messages.parse_model(VerdictAnswer, payload)
        if answer is None:
            self._invalid(messages.topic(self.root, "verdicts/answer"), problem or "unreadable")
            return VerdictLookup("invalid")
        if not answer.found or answer.verdict is None:
            return VerdictLookup("miss")
        item, problem = messages.parse_verdict_item(answer.verdict)
        if item is None or normalize(item.waybill) != normalize(waybill):
            self._invalid(messages.topic(self.root, "verdicts/answer"), problem or "answer is for another waybill")
            return VerdictLookup("invalid")
        if not await self.accept([(item, answer.verdict)]):
            return VerdictLookup("rejected")
        return self.verdicts.lookup(waybill)
