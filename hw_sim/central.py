"""The central customs system, as seen from a line: pushes verdicts, collects records.

It uses its own paho client against the same broker the agent uses. Records are kept by
``record_id`` so duplicates (allowed by the at-least-once contract) are counted, not double-counted.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.central.security import sign_item


class Central:
    """``known``: waybill -> verdict for answering look-ups (a waybill not in it is unknown).
    ``signing``: (private key base64, key id) to sign every verdict it sends. ``extra``: waybill ->
    more verdict fields (``hold_reason``, ``group``) for lines with a sort plan."""

    def __init__(
        self, host: str, port: int, topic_root: str, known: dict[str, str] | None = None,
        signing: tuple[str, str] | None = None, client_id: str | None = None,
        extra: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.root = topic_root
        self.known = known or {}
        self.extra = extra or {}
        self.plan_results: list[dict[str, Any]] = []  # the agent's answers to plans (plan/result)
        self.signing = signing
        self.lookups = 0
        self.records: dict[str, dict[str, Any]] = {}
        self.record_order: list[str] = []
        self.duplicates = 0
        self.status: dict[str, Any] | None = None
        self.alarms: list[dict[str, Any]] = []
        self.findings: list[dict[str, Any]] = []  # inspection findings from the local console
        self.stats: list[dict[str, Any]] = []
        self.bad_payloads = 0
        self.replies: list[dict[str, Any]] = []
        self.reply_topics: list[str] = []  # where each reply arrived
        self.foreign: list[tuple[str, bytes]] = []  # messages on parcels/status that are not ours
        # tests: rewrite an answer before it goes out (a central with bugs, or an attacker)
        self.tamper: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self._lock = threading.Lock()
        self._connected = threading.Event()
        # A persistent session: records published while central is away (a broker restart) are
        # kept by the broker and delivered when it reconnects.
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"central-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv5)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.max_inflight_messages_set(100)
        self.client = c
        self.host, self.port = host, port

    def start(self, timeout_s: float = 10.0) -> Central:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client.connect(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()
        if not self._connected.wait(timeout_s):
            raise RuntimeError("central could not connect to the broker")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe(f"{self.root}/parcels", qos=1)
        client.subscribe(f"{self.root}/status", qos=1)
        client.subscribe(f"{self.root}/alarms", qos=1)
        client.subscribe(f"{self.root}/findings", qos=1)
        client.subscribe(f"{self.root}/stats", qos=0)
        client.subscribe(f"{self.root}/verdicts/request", qos=1)
        client.subscribe(f"{self.root}/cmd/reply/#", qos=1)  # the reply topic and everything under it
        client.subscribe(f"{self.root}/plan/result", qos=1)
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            data = json.loads(msg.payload)
        except ValueError:
            self.bad_payloads += 1
            return
        leaf = msg.topic.rsplit("/", 1)[-1]
        if msg.topic.startswith(f"{self.root}/cmd/reply"):
            leaf = "reply"
        elif msg.topic == f"{self.root}/plan/result":
            leaf = "plan_result"
        if leaf in ("parcels", "status") and data.get("schema") not in ("sortgate.parcel/1", "sortgate.status/1"):
            self.foreign.append((msg.topic, bytes(msg.payload)))
            return
        if leaf == "request":
            self._answer(data, msg)
            return
        lists = {"alarms": self.alarms, "findings": self.findings, "stats": self.stats,
                 "plan_result": self.plan_results}
        with self._lock:
            if leaf == "parcels":
                rid = data.get("record_id")
                if rid in self.records:
                    self.duplicates += 1
                else:
                    self.records[rid] = data
                    self.record_order.append(rid)
            elif leaf == "status":
                self.status = data
            elif leaf in lists:
                lists[leaf].append(data)
            elif leaf == "reply":
                self.replies.append(data)
                self.reply_topics.append(msg.topic)

    def _answer(self, request: dict[str, Any], msg: mqtt.MQTTMessage) -> None:
        """Answer a verdict look-up on its response topic, echoing the correlation data."""
        self.lookups += 1
        props_in = msg.properties
        waybill = request.get("waybill", "")
        verdict = self.known.get(waybill)
        answer: dict[str, Any] = {
            "schema": "sortgate.verdict_answer/1", "waybill": waybill, "found": verdict is not None
        }
        if verdict is not None:
            answer["verdict"] = self.item(waybill, verdict)
        if self.tamper is not None:
            answer = self.tamper(answer)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = getattr(props_in, "CorrelationData", b"")
        self.client.publish(getattr(props_in, "ResponseTopic", ""), json.dumps(answer), qos=1, properties=props)

    def item(self, waybill: str, verdict: str, ttl_s: float = 86_400, issued: datetime | None = None) -> dict[str, Any]:
        now = issued or datetime.now(UTC)
        item = {
            "waybill": waybill,
            "verdict": verdict,
            "verdict_id": uuid.uuid4().hex[:12],
            "issued_at": now.isoformat(),
            "expires_at": (now + timedelta(seconds=ttl_s)).isoformat(),
            **self.extra.get(waybill, {}),
        }
        if self.signing:
            item = sign_item(item, *self.signing)
        return item

    def records_by_parcel(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Records keyed by the parcel's identity on the line: (trigger seq, trigger encoder). Unlike
        the sequence alone, this stays unique across a controller restart (sequences start again)."""
        with self._lock:
            return {(r["seq"], int(r["record_id"].rsplit(":", 1)[1])): r for r in self.records.values()}

    def records_by_seq(self) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {r["seq"]: r for r in self.records.values()}

    def wait_status(self, state: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.status and self.status.get("state") == state:
                return True
            time.sleep(0.05)
        return False

    def push_verdicts(self, items: list[tuple[str, str]], ttl_s: float = 86_400) -> None:
        """Publish one batch of (waybill, verdict) pairs at QoS 1 and wait for the PUBACK."""
        self.push_items([self.item(w, v, ttl_s) for w, v in items])

    def plan_message(self, plan: dict[str, Any], site: str, line: str) -> dict[str, Any]:
        """A sort plan as central publishes it (sortgate.plan/1, signed when central signs)."""
        body = {"schema": "sortgate.plan/1", "site": site, "line": line,
                "issued_at": datetime.now(UTC).isoformat(), "plan": plan}
        return sign_item(body, *self.signing) if self.signing else body

    def publish_plan(self, plan: dict[str, Any], site: str, line: str) -> None:
        self.publish_raw(f"{self.root}/plan", json.dumps(self.plan_message(plan, site, line)).encode())

    def push_items(self, items: list[dict[str, Any]]) -> None:
        batch = {"schema": "sortgate.verdicts/1", "batch_id": uuid.uuid4().hex[:16], "verdicts": items}
        self.publish_raw(f"{self.root}/verdicts", json.dumps(batch).encode())

    def publish_raw(self, topic: str, payload: bytes, **props: Any) -> None:
        properties = None
        if props:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            for k, v in props.items():
                setattr(properties, k, v)
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        try:
            info.wait_for_publish(timeout=5)
        except RuntimeError:
            pass  # not connected (a broker restart): paho keeps it queued and sends it on reconnect
