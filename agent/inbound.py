"""Everything central sends: verdict batches, answers to look-ups, commands.

Nothing inbound can crash the agent or change a lane by itself. Every message is size-limited,
parsed strictly and validated (``messages``); verdicts then pass the signature, validity and replay
checks (``security``) before they reach the store. What is rejected is logged, counted, and raised as
a rate-limited alarm event; a command gets an error reply.

Flood control: inbound messages are admitted by a token bucket (``max_inbound_per_s``) into a
bounded queue; beyond either, they are dropped and counted (``inbound_flood``). Answers to our own
look-ups bypass the queue so a flood of batches cannot starve a parcel's deadline.

Look-ups use MQTT 5 request/response: a request on ``{root}/verdicts/request`` with response topic
``{root}/verdicts/answer`` and a fresh correlation id; the answer must come back before the
parcel's deadline, or the parcel goes to inspection (``verdict_timeout``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from agent import messages
from agent.alarms import Alarms
from agent.config import Config
from agent.decision import Mode, VerdictLookup
from agent.messages import Command, VerdictAnswer, VerdictItem
from agent.mqtt import MessageMeta, MqttLink
from agent.security import KeyRing, check_validity
from agent.verdicts import VerdictStore
from agent.waybill import normalize
from firmware_bridge import contract as c
from firmware_bridge.errors import LinkError
from firmware_bridge.modbus_link import ControllerLink

log = structlog.get_logger("sortgate.inbound")


class TokenBucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.t = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Inbound:
    def __init__(
        self,
        cfg: Config,
        verdicts: VerdictStore,
        keyring: KeyRing | None,
        alarms: Alarms,
        mqtt: MqttLink,
        link: ControllerLink,
        counters: Any,
        set_mode: Callable[[Mode], None],
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self.cfg = cfg
        self.root = cfg.topic_root
        self.verdicts = verdicts
        self.keyring = keyring
        self.alarms = alarms
        self.mqtt = mqtt
        self.link = link
        self.counters = counters
        self._set_mode = set_mode
        self._status = status
        self.queue: asyncio.Queue[tuple[str, bytes, MessageMeta]] = asyncio.Queue(maxsize=1000)
        self.bucket = TokenBucket(cfg.mqtt.max_inbound_per_s)
        self._pending: dict[bytes, asyncio.Future[bytes]] = {}

    # --- admission (loop thread, straight from paho's callback) --------------------------
    def offer(self, topic: str, payload: bytes, meta: MessageMeta) -> None:
        if topic == messages.topic(self.root, "verdicts/answer"):
            fut = self._pending.get(meta.correlation or b"")
            if fut is not None and not fut.done():
                fut.set_result(payload)
            else:
                self.counters["answers_unexpected"] += 1
            return
        if not self.bucket.take() or self.queue.full():
            self.counters["inbound_dropped"] += 1
            limit = self.cfg.mqtt.max_inbound_per_s
            self.alarms.event("inbound_flood", f"inbound messages over {limit}/s dropped", topic=topic)
            return
        self.queue.put_nowait((topic, payload, meta))

    async def run(self) -> None:
        while True:
            topic, payload, meta = await self.queue.get()
            leaf = topic.removeprefix(self.root + "/")
            if leaf == "verdicts":
                await self._batch(payload)
            elif leaf == "cmd":
                await self._command(payload, meta)
            else:
                self._invalid(topic, "no handler for this topic")

    def _invalid(self, topic: str, problem: str) -> None:
        self.counters["inbound_invalid"] += 1
        log.warning("inbound message rejected", topic=topic, problem=problem)
        self.alarms.event("inbound_invalid", problem, topic=topic)

    # --- verdicts ----------------------------------------------------------------------
    async def _batch(self, payload: bytes) -> None:
        batch_id, items, problems = messages.parse_verdict_batch(payload)
        for p in problems:
            self._invalid(messages.topic(self.root, "verdicts"), f"batch {batch_id}: {p}")
        if items:
            accepted = await self.accept(items)
            log.debug("verdict batch", batch_id=batch_id, items=len(items), accepted=len(accepted))

    async def accept(self, items: list[tuple[VerdictItem, dict[str, Any]]]) -> list[VerdictItem]:
        """Run every check; store the items that pass. Returns the items now in the store (the
        new ones and identical redeliveries of stored ones)."""
        now = datetime.now(UTC)
        good: list[VerdictItem] = []
        duplicates: list[VerdictItem] = []
        for item, raw in items:
            reason = self._reject_reason(item, raw, now)
            if reason == "duplicate":
                self.counters["verdicts_duplicate"] += 1
                duplicates.append(item)
            elif reason is not None:
                self.counters[f"verdicts_rejected_{reason}"] += 1
                log.warning("verdict rejected", reason=reason, waybill=item.waybill, verdict_id=item.verdict_id)
                self.alarms.event(
                    "verdict_rejected", f"{reason}: verdict {item.verdict_id} for {item.waybill}", reason=reason
                )
            else:
                good.append(item)
        if good:
            self.counters["verdicts_stored"] += await self.verdicts.store(good)
        return good + duplicates

    def _reject_reason(self, item: VerdictItem, raw: dict[str, Any], now: datetime) -> str | None:
        if self.keyring is not None:
            check = self.keyring.verify(raw)
            if not check.ok:
                return check.reason
        validity = check_validity(item.issued_at, item.expires_at, now, self.cfg.verdicts.max_clock_skew_s)
        if not validity.ok:
            return validity.reason
        return self.verdicts.replay_check(item)

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
            payload = await asyncio.wait_for(fut, timeout_s)
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

    # --- commands -----------------------------------------------------------------------
    async def _command(self, payload: bytes, meta: MessageMeta) -> None:
        cmd, problem = messages.parse_model(Command, payload)
        request_id = cmd.request_id if cmd else None
        if cmd is None:
            self._invalid(messages.topic(self.root, "cmd"), problem or "unreadable")
            self._reply(meta, None, False, f"invalid command: {problem}")
            return
        if cmd.command == "set_mode":
            if cmd.mode is None:
                self._reply(meta, request_id, False, "set_mode needs a mode")
                return
            try:
                want = c.ModeRequest.MAINTENANCE if cmd.mode == "maintenance" else c.ModeRequest.NORMAL
                if self.link.connected:
                    await self.link.request_mode(want)
            except LinkError as exc:
                self._reply(meta, request_id, False, f"controller did not take the mode: {exc}")
                return
            self._set_mode(Mode(cmd.mode))
            log.warning("mode changed by command", mode=cmd.mode, request_id=request_id)
            self._reply(meta, request_id, True, None, {"mode": cmd.mode})
        elif cmd.command == "status":
            self._reply(meta, request_id, True, None, self._status())
        else:
            self._invalid(messages.topic(self.root, "cmd"), f"unknown command {cmd.command!r}")
            self._reply(meta, request_id, False, f"unknown command {cmd.command!r}; known: set_mode, status")

    def _reply(
        self, meta: MessageMeta, request_id: str | None, ok: bool, error: str | None,
        result: dict[str, Any] | None = None,
    ) -> None:
        body = {
            "schema": messages.SCHEMA_COMMAND_REPLY,
            "request_id": request_id,
            "ok": ok,
            "error": error,
            "result": result,
            "at": messages.iso(),
        }
        # Replies stay under this line's root: a command cannot make the agent publish elsewhere.
        topic = meta.response_topic if (meta.response_topic or "").startswith(self.root + "/") else None
        topic = topic or messages.topic(self.root, "cmd/reply")
        self.mqtt.publish(topic, messages.dumps(body), qos=1, correlation=meta.correlation)
