"""Commands from central: ``set_mode`` and ``status``, and their replies.

A reply goes to the command's MQTT 5 response topic only if that is ``{root}/cmd/reply`` or lies
under it (no wildcard, no NUL, at most ``MAX_TOPIC`` characters); a command naming any other
response topic is refused whole and answered on ``{root}/cmd/reply``. Tightening the mode
(``inspect_all``, ``maintenance``) is open; loosening it (``normal`` from either) needs a command
signed by a trusted central key, recent and never obeyed before. The mode is kept on disk
(``ModeStore``) before it is taken, so a restart never loosens it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from agent.central import messages
from agent.central.alarms import Alarms
from agent.central.messages import Command
from agent.central.mode_store import ModeStore
from agent.central.mqtt import MessageMeta, MqttLink
from agent.central.security import Check, KeyRing
from agent.config import Config
from agent.pipeline.decision import Mode
from firmware_bridge import contract as c
from firmware_bridge.errors import LinkError
from firmware_bridge.modbus_link import ControllerLink

log = structlog.get_logger("sortgate.commands")

__all__ = ["MAX_TOPIC", "Commands", "reply_topic_problem"]

#: the longest response topic accepted
MAX_TOPIC = 200


def reply_topic_problem(topic: str, root: str) -> str | None:
    """Why a command's response topic may not be used, or None. Replies go under
    ``{root}/cmd/reply`` only (the example ACL's grant), never anywhere with wildcards."""
    prefix = messages.topic(root, "cmd/reply")
    if len(topic) > MAX_TOPIC:
        return f"response topic longer than {MAX_TOPIC} characters"
    if any(ch in topic for ch in "+#\0"):
        return "response topic holds a wildcard or NUL"
    if topic != prefix and not topic.startswith(prefix + "/"):
        return f"response topic must be {prefix} or under it"
    return None



class Commands:
    def __init__(
        self,
        cfg: Config,
        keyring: KeyRing | None,
        alarms: Alarms,
        mqtt: MqttLink,
        link: ControllerLink,
        counters: Counter[str],
        set_mode: Callable[[Mode], None],
        status: Callable[[], dict[str, Any]],
        modes: ModeStore,
        verify_signed: Callable[[dict[str, Any]], Awaitable[Check]],
        report_invalid: Callable[[str, str], None],
    ) -> None:
        self.cfg = cfg
        self.root = cfg.topic_root
        self.keyring = keyring
        self.alarms = alarms
        self.mqtt = mqtt
        self.link = link
        self.counters = counters
        self._set_mode = set_mode
        self._status = status
        self.modes = modes
        self._verify_signed = verify_signed  # runs off the event loop
        self._report_invalid = report_invalid

    async def handle(self, payload: bytes, meta: MessageMeta) -> None:
        cmd, problem = messages.parse_model(Command, payload)
        request_id = cmd.request_id if cmd else None
        topic_problem = reply_topic_problem(meta.response_topic, self.root) if meta.response_topic else None
        if topic_problem is not None:  # refused whole: the reply goes to the line's own reply topic
            self._report_invalid(messages.topic(self.root, "cmd"), topic_problem)
            self._reply(MessageMeta(correlation=meta.correlation), request_id, False, f"refused: {topic_problem}")
            return
        if cmd is None:
            self._report_invalid(messages.topic(self.root, "cmd"), problem or "unreadable")
            self._reply(meta, None, False, f"invalid command: {problem}")
            return
        if cmd.command == "set_mode":
            await self._set_mode_command(cmd, payload, meta)
        elif cmd.command == "status":
            self._reply(meta, request_id, True, None, self._status())
        else:
            self._report_invalid(messages.topic(self.root, "cmd"), f"unknown command {cmd.command!r}")
            self._reply(meta, request_id, False, f"unknown command {cmd.command!r}; known: set_mode, status")

    async def _set_mode_command(self, cmd: Command, payload: bytes, meta: MessageMeta) -> None:
        request_id = cmd.request_id
        if cmd.mode is None:
            self._reply(meta, request_id, False, "set_mode needs a mode")
            return
        target = Mode(cmd.mode)
        loosening = target is Mode.NORMAL and self.modes.mode is not Mode.NORMAL
        if loosening:
            refusal = await self._loosening_refusal(cmd, payload)
            if refusal is not None:
                self.counters["commands_refused_unsigned"] += 1
                log.warning("loosening command refused", reason=refusal, request_id=request_id)
                self.alarms.event("command_refused", f"set_mode {cmd.mode}: {refusal}", reason=refusal)
                self._reply(meta, request_id, False, f"refused: {refusal}")
                return
        try:
            want = c.ModeRequest.MAINTENANCE if target is Mode.MAINTENANCE else c.ModeRequest.NORMAL
            if self.link.connected:
                await self.link.request_mode(want)
        except LinkError as exc:
            self._reply(meta, request_id, False, f"controller did not take the mode: {exc}")
            return
        try:
            self.modes.set(target, request_id if loosening else None)
        except OSError as exc:
            self._reply(meta, request_id, False, f"mode not kept on disk, not taken: {exc}")
            return
        self._set_mode(target)
        log.warning("mode changed by command", mode=cmd.mode, request_id=request_id, signed=loosening)
        self._reply(meta, request_id, True, None, {"mode": cmd.mode})

    async def _loosening_refusal(self, cmd: Command, payload: bytes) -> str | None:
        """Why a loosening command may not be obeyed, or None: it must be signed by a trusted
        key, recent, and never obeyed before."""
        if self.keyring is None:
            return "loosening needs a command signed by central; this agent has no trusted keys"
        if cmd.signature is None or cmd.key_id is None or cmd.issued_at is None or cmd.request_id is None:
            return "unsigned: loosening needs key_id, signature, issued_at and request_id"
        if cmd.key_id not in self.keyring.keys:
            return "unknown_key"
        age = (datetime.now(UTC) - cmd.issued_at).total_seconds()
        if age > self.cfg.mqtt.command_max_age_s or age < -self.cfg.verdicts.max_clock_skew_s:
            return f"issued_at out of range (age {age:.0f} s)"
        if self.modes.was_obeyed(cmd.request_id):
            return "replayed: this request_id was obeyed before"
        check = await self._verify_signed(messages.loads(payload))
        return None if check.ok else (check.reason or "bad_signature")

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
        # only a checked response topic (reply_topic_problem), else the line's own reply topic
        topic = meta.response_topic or messages.topic(self.root, "cmd/reply")
        if self.mqtt.publish(topic, messages.dumps(body), qos=1, correlation=meta.correlation) is None:
            self.counters["replies_failed"] += 1
