"""What the control socket answers: the agent's state for ``sortgate status``, and the
technician's commands (maintenance on/off, a gate test, a reader's live frames).

Rules a technician meets here (docs/operations.md, "At the line"):

* ``maintenance on`` is open from ``normal`` (it tightens: every parcel to inspection, gates by hand);
  ``maintenance off`` ends only a maintenance set at the box. A mode central set (``inspect_all``,
  ``maintenance``) is ended by central's signed ``set_mode normal`` alone, as before.
* A gate fires only while the agent *and* the controller are in maintenance (the controller refuses
  it otherwise anyway: contract 4.5), and only a gate the config names.
* Every mode change and gate test is logged and published as an ``audit`` alarm.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import structlog

from agent import __version__ as agent_version
from agent.central import messages
from agent.pipeline.decision import Mode
from agent.service.control import ControlError, ControlServer, encode_line, socket_path
from firmware_bridge import contract as c
from firmware_bridge.errors import LinkError

if TYPE_CHECKING:
    from agent.service.runtime import Agent

__all__ = ["FINDING_OUTCOMES", "LocalControl"]

log = structlog.get_logger("sortgate.local")

#: how long a fired gate may take to be cleared by the controller (it clears MAINT_FIRE_GATE when done)
FIRE_CLEAR_S = 2.0


#: what an officer at the inspection bench can find
FINDING_OUTCOMES = ("cleared", "seized", "referred")
MAX_NOTE = 1000


def _via(req: dict[str, Any]) -> str:
    return "console" if req.get("via") == "console" else "cli"


def _last(items: Iterable[dict[str, Any]], n: Any) -> list[dict[str, Any]]:
    """The newest ``n`` (0..50; anything else counts as 10)."""
    k = n if isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 50 else 10
    return list(items)[-k:] if k else []


def _bits(bits: int) -> list[str]:
    return [b.name or str(int(b)) for b in c.StatusBit if bits & b]


def _parcel(rec: dict[str, Any]) -> dict[str, Any]:
    d = rec.get("decision") or {}
    r = rec.get("result") or {}
    v = rec.get("verdict") or {}
    img = rec.get("image") or {}
    return {
        "record_id": rec["record_id"], "seq": rec["seq"], "recorded_at": rec["recorded_at"],
        "waybill": rec.get("waybill"), "verdict": v.get("verdict") or v.get("status"),
        "image": img.get("status"), "lane_class": d.get("lane_class"), "lane": d.get("lane"),
        "reasons": d.get("reasons", []), "decision_ms": d.get("decision_ms"),
        "ack": (rec.get("command") or {}).get("ack"), "disposition": r.get("disposition"),
        "lane_reached": r.get("lane_reached"),
    }


class LocalControl:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.started = time.time()
        self.mqtt_detail = "not connected yet"
        self.mqtt_since = time.time()
        path = socket_path(agent.cfg.storage.state_dir, agent.cfg.control.socket)
        self.server = ControlServer(
            path,
            handlers={
                "status": self.status, "set_mode": self.set_mode, "fire_gate": self.fire_gate,
                "reader_reset": self.reader_reset, "finding": self.finding, "audit": self.audit,
            },
            streamers={"reader_watch": self.reader_watch},
        )

    def mqtt_state(self, up: bool, detail: str) -> None:
        self.mqtt_detail, self.mqtt_since = detail, time.time()

    # --- status -------------------------------------------------------------------------
    async def status(self, req: dict[str, Any]) -> dict[str, Any]:
        a = self.agent
        state = a.pipeline.state
        problems = a.problems()
        outbox_pending = a.outbox.count()
        return {
            "agent": {
                "version": agent_version, "pid": os.getpid(), "up_s": round(time.time() - self.started, 1),
                "site": a.cfg.line.site, "line": a.cfg.line.line, "config_hash": a.hash,
                "mode": state.mode.value, "mode_set_by": a.modes.set_by, "plan": a.plans.info(),
            },
            "line": {"healthy": not state.problems, "problems": list(state.problems), "all_problems": problems},
            "controller": self._controller(),
            "readers": a.reader_monitor.summary(),
            "mqtt": {
                "broker": f"{a.cfg.mqtt.host}:{a.cfg.mqtt.port}", "connected": a.mqtt.connected.is_set(),
                "detail": self.mqtt_detail, "since": self.mqtt_since,
            },
            "outbox": {
                "pending": outbox_pending, "fill_pct": round(100 * a.outbox.fill, 1),
                "published": a.publisher.published, "acked": a.publisher.acked,
            },
            "alarms": {
                "active": [{"alarm": k, "subject": s, "detail": d} for (k, s), d in a.alarms.active.items()],
                "recent": _last(a.alarms.recent, req.get("alarms", 10)),
            },
            "parcels": {
                "in_flight": len(state.parcels),
                "recent": [_parcel(r) for r in _last(a.pipeline.recorder.recent, req.get("parcels", 10))],
            },
            "counters": dict(a.metrics.counters),
        }

    def _controller(self) -> dict[str, Any]:
        a = self.agent
        sup = a.supervisor
        ident = a.pipeline.state.identity
        out: dict[str, Any] = {
            "link": a.link.settings.describe(), "connected": sup.connected.is_set(),
            "error": sup.error, "down_since": sup.down_since if sup.error else None,
            "requests": a.link.requests, "fc23": a.link.fc23,
        }
        if ident is not None:
            out.update(
                contract=f"{ident.contract_major}.{ident.contract_minor}",
                firmware=".".join(map(str, ident.firmware)), gates=ident.gate_count, lanes=ident.lane_count,
                watchdog_ms=ident.watchdog_ms,
            )
        st = sup.status
        if st is not None:
            cpm = ident.counts_per_metre if ident else 0
            out["status"] = {
                "polled_ms_ago": round((time.monotonic() - sup.polled_at) * 1000, 1),
                "bits": _bits(int(st.bits)), "belt_mps": round(sup.speed.cps / cpm, 2) if cpm else None,
                "trigger_head": st.trigger_head, "result_head": st.result_head,
                "lane_full": [i + 1 for i in range(16) if st.lane_full_bits >> i & 1],
                "watchdog_trips": st.watchdog_trips, "defaulted": st.defaulted_count,
            }
        return out

    # --- commands -----------------------------------------------------------------------
    async def set_mode(self, req: dict[str, Any]) -> dict[str, Any]:
        a = self.agent
        want = req.get("mode")
        who = str(req.get("user") or "?")[:64]
        now = a.modes.mode
        if want == "maintenance":
            if now is Mode.MAINTENANCE:
                return {"mode": now.value, "changed": False}
            if now is not Mode.NORMAL:
                raise ControlError(f"the line is in {now.value}, set by central; central ends it (signed set_mode)")
            await self._controller_mode(c.ModeRequest.MAINTENANCE)
            target = Mode.MAINTENANCE
        elif want == "normal":
            if now is Mode.NORMAL:
                return {"mode": now.value, "changed": False}
            if a.modes.set_by != "local" or now is not Mode.MAINTENANCE:
                raise ControlError(
                    f"the line is in {now.value}, set by central: only central's signed set_mode normal ends it"
                )
            await self._controller_mode(c.ModeRequest.NORMAL)
            target = Mode.NORMAL
        else:
            raise ControlError('mode must be "maintenance" or "normal"')
        try:
            a.modes.set(target, set_by="local")
        except OSError as exc:
            raise ControlError(f"mode not kept on disk, not taken: {exc}") from exc
        a.pipeline.state.mode = target
        a.alarms.audit(f"mode {now.value} -> {target.value} at the box by {who}",
                       action="set_mode", mode=target.value, user=who, via=_via(req))
        return {"mode": target.value, "changed": True}

    async def _controller_mode(self, mode: c.ModeRequest) -> None:
        """Tell the controller (a maintenance the controller never heard of still sends every
        parcel to inspection on the agent's side; leaving it needs the controller to agree)."""
        a = self.agent
        if not a.link.connected:
            if mode is c.ModeRequest.MAINTENANCE:
                return  # the agent's side alone is safe; the controller learns it when asked again
            raise ControlError("controller offline: cannot take it out of maintenance")
        try:
            await a.link.request_mode(mode)
        except LinkError as exc:
            if mode is c.ModeRequest.MAINTENANCE:
                return
            raise ControlError(f"controller did not take the mode: {exc}") from exc

    async def fire_gate(self, req: dict[str, Any]) -> dict[str, Any]:
        a = self.agent
        gate = req.get("gate")
        who = str(req.get("user") or "?")[:64]
        gates = sorted(lane.gate for lane in a.cfg.lanes if lane.gate is not None)
        if not isinstance(gate, int) or isinstance(gate, bool) or gate not in gates:
            raise ControlError(f"gate must be one of the config's gates {gates}")
        if a.pipeline.state.mode is not Mode.MAINTENANCE:
            raise ControlError("not in maintenance: gates fire by hand only in maintenance (sortgate maintenance on)")
        st = a.supervisor.status
        if not a.supervisor.connected.is_set() or st is None:
            raise ControlError(f"controller offline: {a.supervisor.error}")
        if not st.bits & c.StatusBit.MAINTENANCE:
            await self._controller_mode(c.ModeRequest.MAINTENANCE)  # asked again; it must show it first
            raise ControlError("the controller does not show MAINTENANCE yet; try again in a moment")
        lane = next(la.number for la in a.cfg.lanes if la.gate == gate)
        t0 = time.monotonic()
        try:
            await a.link.write(c.REG_MAINT_FIRE_GATE, [gate])
            while True:
                if (await a.link.read(c.REG_MAINT_FIRE_GATE, 1))[0] == 0:
                    break
                if time.monotonic() - t0 > FIRE_CLEAR_S:
                    raise ControlError(
                        f"gate {gate}: the controller did not clear MAINT_FIRE_GATE within {FIRE_CLEAR_S:g} s"
                    )
                await asyncio.sleep(0.02)
        except LinkError as exc:
            raise ControlError(f"gate {gate}: {exc}") from exc
        ms = round((time.monotonic() - t0) * 1000, 1)
        a.alarms.audit(f"gate {gate} (lane {lane}) fired by hand by {who}",
                       action="fire_gate", gate=gate, user=who, via=_via(req))
        return {"gate": gate, "lane": lane, "cleared_ms": ms}

    async def finding(self, req: dict[str, Any]) -> dict[str, Any]:
        """An inspection officer's finding on one parcel: published on ``{root}/findings`` through
        the durable outbox like a record (docs/mqtt.md, Findings), and kept in the journal."""
        a = self.agent
        parcel = req.get("parcel_record_id")
        outcome = req.get("outcome")
        note = req.get("note") or ""
        officer = str(req.get("user") or "")[:64]
        if outcome not in FINDING_OUTCOMES:
            raise ControlError(f"outcome must be one of {', '.join(FINDING_OUTCOMES)}")
        if not isinstance(note, str) or len(note) > MAX_NOTE or any(ord(ch) < 0x20 and ch not in "\n\t" for ch in note):
            raise ControlError(f"note must be text of at most {MAX_NOTE} characters")
        if not officer:
            raise ControlError("a finding needs the officer's name (user)")
        rows = a.outbox.db.read(
            "SELECT waybill FROM journal WHERE record_id = ? AND kind = 'parcel'", (parcel,)
        ) if isinstance(parcel, str) else []
        if not rows:
            raise ControlError(f"no parcel record {parcel!r} in the journal")
        line = a.cfg.line
        finding_id = f"{line.site}:{line.line}:finding:{uuid.uuid4().hex[:16]}"
        body = {
            "schema": messages.SCHEMA_FINDING, "finding_id": finding_id, "site": line.site, "line": line.line,
            "parcel_record_id": parcel, "waybill": rows[0][0], "outcome": outcome, "note": note,
            "officer": officer, "at": messages.iso(),
        }
        a.pipeline.recorder.queue_message(finding_id, "findings", messages.dumps(body))
        log.warning("inspection finding recorded", parcel=parcel, outcome=outcome, officer=officer)
        return {"finding_id": finding_id}

    async def audit(self, req: dict[str, Any]) -> dict[str, Any]:
        """A console event with no other effect (a login, a failed login, a logout): logged and
        published as an ``audit`` alarm."""
        action = req.get("action")
        if action not in ("login", "login_failed", "logout"):
            raise ControlError("action must be login, login_failed or logout")
        who = str(req.get("user") or "?")[:64]
        detail = str(req.get("detail") or "")[:200]
        self.agent.alarms.audit(f"console {action} by {who}" + (f": {detail}" if detail else ""),
                                action=action, user=who, via="console")
        return {}

    async def reader_reset(self, req: dict[str, Any]) -> dict[str, Any]:
        name = req.get("reader")
        if name is not None and name not in self.agent.reader_monitor.readers:
            raise ControlError(f"no reader {name!r}; readers: {', '.join(self.agent.reader_monitor.readers)}")
        self.agent.reader_monitor.reset(name)
        who = str(req.get("user") or "?")[:64]
        self.agent.alarms.audit(f"read counters of {name or 'every reader'} reset by {who}",
                                action="reader_reset", user=who, via=_via(req), subject=name)
        return {"reset": name or "all"}

    async def reader_watch(
        self, req: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """The reader's events as they come, one JSON line each, until the client hangs up."""
        mon = self.agent.reader_monitor
        name = req.get("reader")
        if name not in mon.readers:
            raise ControlError(f"no reader {name!r}; readers: {', '.join(mon.readers)}")
        q = mon.watch(name)
        hangup = asyncio.ensure_future(reader.read(1))  # the client sends nothing more: EOF is its goodbye
        try:
            writer.write(encode_line({"ok": True, "watching": name, "device": mon.readers[name].device}))
            await writer.drain()
            while True:
                event = asyncio.ensure_future(q.get())
                await asyncio.wait((event, hangup), return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    return
                writer.write(encode_line(event.result()))
                await writer.drain()
        finally:
            hangup.cancel()
            mon.unwatch(name, q)
