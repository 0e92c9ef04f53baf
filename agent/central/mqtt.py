"""MQTT link: paho-mqtt's network thread, bridged to the agent's asyncio loop.

paho runs its own thread (``loop_start``); every callback hops to the event loop with
``call_soon_threadsafe`` so all agent state stays on one thread. ``connected`` is set only after a
successful CONNACK (not when a socket opens: Frigate's mistake), and the retained status topic gets
a birth message on every connect and a last will that marks the agent offline.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.central import messages
from firmware_bridge.backoff import Backoff

log = structlog.get_logger("sortgate.mqtt")


@dataclass(frozen=True, slots=True)
class TlsSettings:
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class MessageMeta:
    """MQTT 5 properties of an inbound message that the contract uses."""

    response_topic: str | None = None
    correlation: bytes | None = None
    retain: bool = False  # a retained message (the broker replays it at every subscription)


class MqttLink:
    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        topic_root: str,
        keepalive_s: int,
        reconnect_max_s: float,
        on_message: Callable[[str, bytes, MessageMeta], None],
        on_ack: Callable[[int], None],
        birth: Callable[[], dict[str, Any]],
        tls: TlsSettings | None = None,
        username: str | None = None,
        password: str | None = None,
        acks_on_paho_thread: bool = False,
    ) -> None:
        """``on_ack(mid)`` runs on the event loop, or with ``acks_on_paho_thread`` on paho's own
        thread (then it must be thread-safe: OutboxPublisher.ack_from_thread)."""
        self.host, self.port = host, port
        self.root = topic_root
        self._on_message = on_message
        self._on_ack = on_ack
        self._acks_on_paho_thread = acks_on_paho_thread
        self._birth = birth
        self.connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_connected: Callable[[], None] | None = None
        # the link's state as people need it: (up, what is wrong), once per change
        self.on_state: Callable[[bool, str], None] = lambda up, detail: None
        self._failing = False  # paho thread: a failure streak is under way (diagnosed once)
        # paho's own delay doubles without jitter: every line of a site would retry in step after a
        # broker restart. Our helper sets paho's next delay after each failed attempt instead.
        self._backoff = Backoff(1.0, max(1.0, reconnect_max_s))
        self.on_publish_error: Callable[[str, str], None] = lambda topic, error: None
        self.stopping = False
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
            reconnect_on_failure=True,
        )
        c.max_inflight_messages_set(200)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=1, max_delay=max(1, int(reconnect_max_s)))
        c.will_set(
            messages.topic(topic_root, "status"),
            json.dumps(messages.status_offline(reason="connection lost")),
            qos=1, retain=True,
        )
        if tls is not None:
            c.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)
        if username is not None:
            c.username_pw_set(username, password)
        c.on_connect = self._cb_connect
        c.on_connect_fail = self._cb_connect_fail
        c.on_disconnect = self._cb_disconnect
        c.on_message = self._cb_message
        c.on_publish = self._cb_publish
        self.keepalive_s = keepalive_s
        self.client = c

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600  # keep our subscriptions across short outages
        self.client.connect_async(
            self.host, self.port, keepalive=self.keepalive_s, clean_start=False, properties=props
        )
        self.client.loop_start()

    def stop(self, reason: str = "shutdown") -> None:
        self.stopping = True
        if self.connected.is_set():
            info = self.client.publish(
                messages.topic(self.root, "status"),
                json.dumps(messages.status_offline(reason=reason)), qos=1, retain=True,
            )
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def thread_alive(self) -> bool:
        """paho's network thread runs (it dies if a callback raises)."""
        thread = getattr(self.client, "_thread", None)  # paho 2.x keeps it here; no public accessor
        return thread is not None and thread.is_alive()

    # --- publishing (thread-safe in paho) -----------------------------------------------
    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> int | None:
        """Queue a message; its mid, or None when paho refused it (logged, never raised)."""
        try:
            props = None
            if response_topic is not None or correlation is not None:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                if response_topic is not None:
                    props.ResponseTopic = response_topic
                if correlation is not None:
                    props.CorrelationData = correlation
            info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except Exception as exc:  # noqa: BLE001 - a bad topic or property must never kill a caller
            log.error("mqtt publish refused", topic=topic[:200], error=repr(exc))
            self.on_publish_error(topic, repr(exc))
            return None
        return info.mid

    # --- paho callbacks (paho thread) ---------------------------------------------------
    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _cb_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            # paho retries on its own (reconnect_on_failure; on_disconnect follows and sets the
            # delay); say so once per streak
            self._fail(f"broker {self.host}:{self.port} refused the connection: {rc}")
            return
        self._failing = False
        self._backoff.reset()
        for leaf in ("verdicts", "verdicts/answer", "cmd", "plan"):
            client.subscribe(messages.topic(self.root, leaf), qos=1)
        client.publish(
            messages.topic(self.root, "status"), json.dumps(self._birth()), qos=1, retain=True
        )
        self._call(self._set_connected, True)

    def _retry_later(self) -> None:
        """After a failed attempt or a lost connection: paho's next wait, jittered, doubling."""
        delay = self._backoff.next()
        self.client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]

    def _cb_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._retry_later()
        if not self._failing:
            self._fail(f"cannot connect to broker {self.host}:{self.port}: {self._diagnose()}")

    def _diagnose(self) -> str:
        """Why the broker cannot be reached (paho does not say): resolve and try the port once."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return "the port answers now; the MQTT handshake failed"
        except OSError as exc:
            return str(exc) or type(exc).__name__

    def _fail(self, detail: str) -> None:
        first = not self._failing
        self._failing = True
        if first:
            self._call(functools.partial(log.error, "mqtt link failing; retrying", detail=detail))
            self._call(self.on_state, False, detail)

    def _cb_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not self.stopping:
            self._retry_later()
        self._call(self._set_connected, False, str(rc))

    def _set_connected(self, up: bool, reason: str = "") -> None:
        if up and not self.connected.is_set():
            log.info("mqtt connected", broker=f"{self.host}:{self.port}")
            self.connected.set()
            self.on_state(True, f"connected to broker {self.host}:{self.port}")
            if self.on_connected:
                self.on_connected()
        elif not up and self.connected.is_set():
            level = log.info if self.stopping else log.error
            level("mqtt disconnected", broker=f"{self.host}:{self.port}", reason=reason)
            self.connected.clear()
            if not self.stopping:
                self.on_state(False, f"disconnected from broker {self.host}:{self.port}: {reason}")

    def _cb_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        meta = MessageMeta(
            response_topic=getattr(props, "ResponseTopic", None),
            correlation=getattr(props, "CorrelationData", None),
            retain=bool(msg.retain),
        )
        self._call(self._on_message, msg.topic, bytes(msg.payload), meta)

    def _cb_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        if self._acks_on_paho_thread:
            self._on_ack(mid)  # the receiver is thread-safe and wakes the loop itself when it must
        else:
            self._call(self._on_ack, mid)
