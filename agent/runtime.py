"""The agent daemon: wires config, wires and the pipeline together and runs them.

Task map (all on one asyncio loop, in one TaskGroup; see docs/code-overview.md):

  controller     ControllerSupervisor.run: connect, poll, heartbeat, rings → Line
  reader-<name>  ReaderPort.run per reader: serial bytes → frames → Line
  parcel-<seq>   Line._run_parcel per trigger: wait for reads, decide, command
  recorder       Line.run_recorder: parcel records → outbox (in result order)
  outbox         OutboxPublisher.run: outbox → MQTT, delete on PUBACK
  verdicts       verdict batches from MQTT → VerdictStore
  housekeeping   read-window expiry, missing results, systemd watchdog, stats

Threads besides the loop: paho's network thread, the outbox writer and the verdict writer (one
each, SQLite commits), and pymodbus's none (it is asyncio).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
from pathlib import Path
from typing import Any

import structlog

from agent import messages
from agent.config import Config
from agent.controller import ControllerSupervisor
from agent.health import SystemdNotifier
from agent.line import Line
from agent.mqtt import MqttLink
from agent.outbox import Outbox, OutboxPublisher
from agent.verdicts import VerdictStore
from firmware_bridge.errors import ContractMismatch
from firmware_bridge.modbus_link import ControllerLink, LinkSettings
from firmware_bridge.reader_codec import FrameDecoder
from firmware_bridge.serial_port import ReaderPort

log = structlog.get_logger("sortgate.agent")


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:12]


def link_settings(cfg: Config) -> LinkSettings:
    cc = cfg.controller
    return LinkSettings(
        transport=cc.transport, host=cc.host, port=cc.port, device=cc.device, baudrate=cc.baudrate,
        bytesize=cc.bytesize, parity=cc.parity, stopbits=cc.stopbits, unit_id=cc.unit_id,
        timeout_s=cc.timeout_ms / 1000, inter_frame_gap_s=cc.inter_frame_gap_ms / 1000,
    )


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.hash = config_hash(cfg)
        state = cfg.storage.state_dir
        self.verdicts = VerdictStore(Path(state) / "verdicts.sqlite", cfg.verdicts.default_ttl_s)
        self.outbox = Outbox(Path(state) / "outbox.sqlite")
        self.link = ControllerLink(link_settings(cfg))
        self.mqtt = MqttLink(
            host=cfg.mqtt.host, port=cfg.mqtt.port,
            client_id=cfg.mqtt.client_id or f"sortgate-{cfg.line.site}-{cfg.line.line}",
            topic_root=cfg.topic_root, keepalive_s=cfg.mqtt.keepalive_s,
            reconnect_max_s=cfg.mqtt.reconnect_max_s, on_message=self._on_mqtt,
            on_ack=self._on_ack, birth=self._birth,
        )
        self.publisher = OutboxPublisher(self.outbox, self._publish)
        self.mqtt.on_connected = self.publisher.on_connected
        self.line = Line(cfg, self.link, self.verdicts, self.publisher, self.hash)
        self.supervisor = ControllerSupervisor(cfg, self.link, self.line)
        self.notifier = SystemdNotifier()
        self._inbound: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=1000)
        self.readers = [
            ReaderPort(
                r.name, r.device,
                FrameDecoder(*r.frame_bytes, r.noread, r.multi_read_delimiter, r.max_frame_bytes),
                on_event=self.line.on_reader_event, on_state=self._reader_state,
                baudrate=r.baudrate, bytesize=r.bytesize, parity=r.parity, stopbits=r.stopbits,
            )
            for r in cfg.readers
        ]
        self._reader_up: dict[str, bool] = {}

    # --- callbacks ----------------------------------------------------------------------
    def _birth(self) -> dict[str, Any]:
        return messages.status_online(
            site=self.cfg.line.site, line=self.cfg.line.line, config_hash=self.hash,
            contract=f"{self.line.identity.contract_major}.{self.line.identity.contract_minor}"
            if self.line.identity else None,
        )

    def _publish(self, topic: str, payload: bytes) -> int:
        return self.mqtt.publish(topic, payload, qos=1)

    def _on_ack(self, mid: int) -> None:
        self.publisher.on_ack(mid)

    def _on_mqtt(self, topic: str, payload: bytes) -> None:
        try:
            self._inbound.put_nowait((topic, payload))
        except asyncio.QueueFull:
            self.line.counters["inbound_dropped_flood"] += 1
            log.warning("inbound MQTT queue full; message dropped", topic=topic)

    def _reader_state(self, name: str, up: bool, detail: str) -> None:
        if self._reader_up.get(name) != up:
            (log.info if up else log.error)("reader " + ("online" if up else "offline"), reader=name, detail=detail)
            self._reader_up[name] = up

    # --- tasks --------------------------------------------------------------------------
    async def _inbound_loop(self) -> None:
        root = self.cfg.topic_root
        while True:
            topic, payload = await self._inbound.get()
            if topic == messages.topic(root, "verdicts"):
                batch_id, items, problems = messages.parse_verdict_batch(payload)
                for p in problems:
                    log.warning("verdict batch problem", batch_id=batch_id, problem=p)
                    self.line.counters["verdicts_rejected"] += 1
                if items:
                    changed = await self.verdicts.store(items)
                    self.line.counters["verdicts_stored"] += changed
                    log.debug("verdict batch stored", batch_id=batch_id, items=len(items), changed=changed)
            else:
                log.warning("unhandled inbound topic", topic=topic)

    async def _housekeeping(self) -> None:
        # systemd restarts us if the loop stalls for WatchdogSec: ping at a quarter of it
        ping_every = self.notifier.watchdog_s / 4 if self.notifier.watchdog_s else None
        next_ping = 0.0
        next_stats = time.monotonic() + self.cfg.health.stats_interval_s
        while True:
            now = time.monotonic()
            self.line.tick(now)
            self.line.sweep_results(now)
            if ping_every and now >= next_ping:
                self.notifier.watchdog()
                next_ping = now + ping_every
            if now >= next_stats:
                next_stats = now + self.cfg.health.stats_interval_s
                self._publish_stats()
            await asyncio.sleep(0.05)

    def _publish_stats(self) -> None:
        lat = sorted(self.line.latencies_ms[-2000:])
        stats = {
            "schema": messages.SCHEMA_STATS,
            "at": messages.iso(),
            "counters": dict(self.line.counters),
            "decision_ms_p50": lat[len(lat) // 2] if lat else None,
            "decision_ms_p99": lat[int(len(lat) * 0.99)] if lat else None,
            "outbox_pending": self.outbox.count(),
            "problems": list(self.line.problems),
        }
        if self.mqtt.connected.is_set():
            self.mqtt.publish(messages.topic(self.cfg.topic_root, "stats"), json.dumps(stats), qos=0)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("sortgate starting", site=self.cfg.line.site, line=self.cfg.line.line, config_hash=self.hash)
        self.mqtt.start()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.supervisor.run(), name="controller")
                for r in self.readers:
                    tg.create_task(r.run(), name=f"reader-{r.name}")
                tg.create_task(self.line.run_recorder(), name="recorder")
                tg.create_task(self.publisher.run(), name="outbox")
                tg.create_task(self._inbound_loop(), name="verdicts")
                tg.create_task(self._housekeeping(), name="housekeeping")
                tg.create_task(self._report_readiness(), name="readiness")
                # A failing task (a contract mismatch in "controller") cancels this wait and
                # leaves the TaskGroup as an exception group; a signal ends it with _Stop.
                await stop.wait()
                raise _Stop
        except* _Stop:
            log.info("sortgate stopping")
        finally:
            self.notifier.stopping()
            self.mqtt.stop()
            self.outbox.close()
            self.verdicts.close()
            self.link.close()

    async def _report_readiness(self) -> None:
        # Ready as soon as every task runs: an agent whose PLC is off must still be up, reporting
        # "controller offline" (and the controller defaults every parcel meanwhile).
        link = self.link.settings.describe()
        self.notifier.ready(f"waiting for controller {link}")
        while True:
            await self.supervisor.connected.wait()
            self.notifier.status(f"controller {link} connected")
            while self.supervisor.connected.is_set():
                await asyncio.sleep(0.5)
            self.notifier.status(f"controller {link} offline; reconnecting")


class _Stop(Exception):
    pass


def run_agent(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    code = 0
    try:
        asyncio.run(Agent(cfg).run())
    except* ContractMismatch as eg:
        for exc in eg.exceptions:
            log.error("controller contract mismatch; refusing to run", error=str(exc))
        code = 3
    return code
