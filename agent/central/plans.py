"""Sort plans from central: signed, versioned, validated whole, applied between two parcels.

A plan message (``sortgate.plan/1`` on ``{root}/plan``, docs/mqtt.md) carries a whole sort plan for
one line. It is applied only if every check passes, in this order: it parses strictly; it names
this site and line; it is signed by a key in ``verdicts.trusted_keys_file`` (a line without trusted
keys takes plans from its config only); its version is higher than the plan in force (the same
version with the same content is a redelivery, ignored); and it fits this line's lanes
(``sortplan.check``: unknown lanes, lanes of the wrong class, gaps). Then the new plan replaces the
old one in one assignment on the event loop: a parcel is placed by the plan in force when it is
decided, never by half of one and half of another. The plan is kept on disk (``plan.json`` in the
state folder) so a restart keeps it; a config plan of a higher version wins over a stored one.

Every outcome is answered on ``{root}/plan/result`` (accepted, or refused with every problem) and a
refusal is also an alarm event ``plan_refused``; the plan in force is in the status message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import Field, ValidationError

from agent.central import messages
from agent.central.alarms import Alarms
from agent.central.files import write_json_atomic
from agent.central.messages import _Inbound
from agent.central.mqtt import MqttLink
from agent.central.security import Check, KeyRing
from agent.config import Config
from agent.pipeline.sortplan import ActivePlan, SortPlan, check
from agent.pipeline.state import LineState

log = structlog.get_logger("sortgate.plans")

SCHEMA_PLAN = "sortgate.plan/1"
SCHEMA_PLAN_RESULT = "sortgate.plan_result/1"
PLAN_FILE = "plan.json"


class PlanMessage(_Inbound):
    schema_: Literal["sortgate.plan/1"] = Field(alias="schema")
    site: str = Field(min_length=1, max_length=64)
    line: str = Field(min_length=1, max_length=64)
    issued_at: datetime
    plan: SortPlan
    key_id: str | None = Field(None, min_length=1, max_length=64)
    signature: str | None = Field(None, min_length=1, max_length=200)


class PlanUpdates:
    """Takes plan messages (from ``Inbound``), keeps the plan in force and its source."""

    def __init__(
        self, cfg: Config, state: LineState, keyring: KeyRing | None, alarms: Alarms, mqtt: MqttLink,
        verify: Callable[[dict[str, Any]], Awaitable[Check]],
    ) -> None:
        self.cfg = cfg
        self.state = state
        self.keyring = keyring
        self.alarms = alarms
        self.mqtt = mqtt
        self.verify = verify
        self.path = Path(cfg.storage.state_dir) / PLAN_FILE
        self.source: Literal["default", "config", "central"] = "config" if cfg.plan else "default"
        self._raw: dict[str, Any] | None = None  # the message of the plan in force, if from central
        self.restore()

    def info(self) -> dict[str, Any]:
        """The plan in force, for the status message and ``sortgate status``."""
        plan = self.state.plan.plan
        return {"version": plan.version, "name": plan.name, "source": self.source}

    def restore(self) -> None:
        """At start: a plan central sent earlier, if it is newer than the config's and still fits."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            msg = PlanMessage.model_validate_json(json.dumps(raw))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("stored plan unreadable; the config's plan is used", path=str(self.path), error=str(exc))
            return
        if msg.plan.version <= self.state.plan.version:
            log.info("stored plan is not newer than the config's; the config's is used",
                     stored=msg.plan.version, config=self.state.plan.version)
            return
        try:
            self.state.plan = ActivePlan.build(msg.plan, self.cfg.lanes)
        except ValueError as exc:  # the lanes changed since it was sent
            log.error("stored plan does not fit this line's lanes; the config's is used", error=str(exc))
            return
        self.source, self._raw = "central", raw
        log.info("sort plan restored", version=msg.plan.version, name=msg.plan.name)

    async def offer(self, payload: bytes) -> None:
        data, problem = messages.parse_json(payload)
        msg, problems = (None, [problem or "unreadable"]) if data is None else await self._check(data)
        version = msg.plan.version if msg else _version(data)
        if problems == ["duplicate"]:
            log.info("plan redelivered; already in force", version=version)
            return
        if problems or msg is None or data is None:
            self._refuse(version, problems)
            return
        try:  # on disk first: a plan that would not survive a restart is not taken
            await asyncio.to_thread(write_json_atomic, self.path, data)
        except OSError as exc:
            self._refuse(version, [f"cannot keep it in {self.path}: {exc}"])
            return
        old = self.state.plan.version
        self.state.plan = ActivePlan.build(msg.plan, self.cfg.lanes)  # one assignment: between two parcels
        self.source, self._raw = "central", data
        log.warning("sort plan replaced", old=old, new=msg.plan.version, name=msg.plan.name)
        self._reply(msg.plan.version, True, [])

    async def _check(self, data: dict[str, Any]) -> tuple[PlanMessage | None, list[str]]:
        """The message parsed, and every reason not to apply it (["duplicate"]: it is the plan in
        force)."""
        try:
            msg = PlanMessage.model_validate_json(json.dumps(data))
        except ValidationError as exc:
            return None, [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()[:10]]
        if (msg.site, msg.line) != (self.cfg.line.site, self.cfg.line.line):
            return msg, [f"plan is for {msg.site}/{msg.line}, this is {self.cfg.line.site}/{self.cfg.line.line}"]
        if self.keyring is None:
            return msg, ["this line has no trusted keys (verdicts.trusted_keys_file): it takes plans from its "
                         "config only"]
        signed = await self.verify(data)
        if not signed.ok:
            return msg, [f"signature: {signed.reason}"]
        if msg.plan.version == self.state.plan.version and self._raw is not None:
            same = {k: v for k, v in self._raw.items() if k != "signature"} == {
                k: v for k, v in data.items() if k != "signature"}
            return msg, ["duplicate"] if same else [f"version {msg.plan.version} is in force with other content"]
        if msg.plan.version <= self.state.plan.version:
            return msg, [f"version {msg.plan.version} is not newer than the plan in force ({self.state.plan.version})"]
        return msg, check(msg.plan, self.cfg.lanes)

    def _refuse(self, version: int | None, problems: list[str]) -> None:
        log.warning("sort plan refused; the plan in force stays", version=version, problems=problems,
                    in_force=self.state.plan.version)
        self.alarms.event("plan_refused", f"plan {version}: " + "; ".join(problems)[:500])
        self._reply(version, False, problems)

    def _reply(self, version: int | None, accepted: bool, problems: list[str]) -> None:
        body = {
            "schema": SCHEMA_PLAN_RESULT, "version": version, "accepted": accepted, "problems": problems[:50],
            "in_force": self.info(), "at": messages.iso(),
        }
        self.mqtt.publish(messages.topic(self.cfg.topic_root, "plan/result"), messages.dumps(body), qos=1)


def _version(data: dict[str, Any] | None) -> int | None:
    """The plan version a message that did not parse claims, for the answer (None if it has none)."""
    plan = data.get("plan") if isinstance(data, dict) else None
    version = plan.get("version") if isinstance(plan, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None
