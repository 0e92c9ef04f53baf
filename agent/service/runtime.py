"""The agent daemon: wires config, wires and the pipeline together and runs them.

Task map (all on one asyncio loop, in one TaskGroup; see docs/code-overview.md):

  controller     ControllerSupervisor.run: connect, poll, heartbeat, rings → Pipeline (intake)
  reader-<name>  ReaderPort.run per reader: serial bytes → frames → Pipeline (intake)
  parcel-<seq>   ParcelRunner.run per trigger: wait for reads, decide, command
  recorder       Recorder.run: parcel records and alarms → outbox (in order)
  outbox         OutboxPublisher.run: outbox → MQTT, delete on PUBACK
  inbound        Inbound.run: verdict batches (checked, then stored) and commands
  housekeeping   read-window expiry, missing results, systemd watchdog, stats, outbox fill
  readiness      sd_notify READY / STATUS as the controller link comes and goes
  images         FolderSource / CaptureSource: X-ray images → Pipeline (intake; vision on)
  control        ControlServer: the local socket of sortgate status and the technician commands

Threads besides the loop: paho's network thread, the outbox writer and the verdict writer (one
each, SQLite commits), the vision worker (inference, image files), a capture reader when the image
source is a camera; pymodbus adds none (it is asyncio).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent.central import messages
from agent.central.alarms import Alarms
from agent.central.inbound import Inbound
from agent.central.mode_store import ModeStore
from agent.central.mqtt import MessageMeta, MqttLink, TlsSettings
from agent.central.outbox import Outbox, OutboxPublisher
from agent.central.plans import PlanUpdates
from agent.central.security import KeyRing, read_secret, resolve_secret
from agent.central.sqlite_store import SchemaTooNew
from agent.central.verdicts import VerdictStore
from agent.config import Config
from agent.pipeline.decision import Mode
from agent.pipeline.pipeline import Pipeline
from agent.pipeline.state import Metrics
from agent.service.controller import ControllerSupervisor
from agent.service.health import ClockWatch, SystemdNotifier, Vitals
from agent.service.local import LocalControl
from agent.service.monitor import ReaderMonitor
from agent.service.stats import StatsReporter
from firmware_bridge.errors import ContractMismatch
from firmware_bridge.modbus_link import ControllerLink, LinkSettings
from firmware_bridge.reader_codec import Event as ReaderEvent
from firmware_bridge.reader_codec import FrameDecoder
from firmware_bridge.serial_port import ReaderPort

if TYPE_CHECKING:
    from agent.vision.check import CaptureSource, FolderSource, VisionCheck

log = structlog.get_logger("sortgate.agent")

#: a vital task that shows no progress this long stops the heartbeats
VITAL_STALL_S = 2.0
#: ... and this long ends the process (exit 1), for systemd to restart it
VITAL_EXIT_S = 10.0
#: SIGTERM ends the process within this, cleanly or not
STOP_HARD_S = 5.0
#: the housekeeping turn: results overdue, vital tasks, watchdog pings, stats (read windows close on
#: the intake's own timer, so nothing here needs a faster turn)
HOUSEKEEPING_S = 0.2
#: the interpreter lock changes hands at least this often between threads that both want it
#: (Python's default: 5 ms). A worker busy with Python work (a flood's signature checks, the
#: outbox writer, paho) would otherwise keep the event loop waiting up to 5 ms at each step; a
#: reader frame is timed when the loop reads it, so it could slip past its own window. (The late
#: frames under a forged-verdict flood came mostly from a burst of log lines on the loop, fixed in
#: ``inbound``; this bound stays. It costs no measurable CPU: docs/performance.md, session 9.)
GIL_SWITCH_S = 0.001


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:12]


def link_settings(cfg: Config) -> LinkSettings:
    cc = cfg.controller
    return LinkSettings(
        transport=cc.transport, host=cc.host, port=cc.port, device=cc.device, serial=cc.serial_line,
        unit_id=cc.unit_id,
        timeout_s=cc.timeout_ms / 1000, inter_frame_gap_s=cc.inter_frame_gap_ms / 1000,
    )


class StartupError(Exception):
    """The agent cannot start: a secret, key, model or state file is missing, unreadable or unusable.
    The message starts with the config key it comes from. Exit code 2, like an invalid config."""


def _security(cfg: Config) -> tuple[KeyRing | None, TlsSettings | None, str | None]:
    """Load keys and secrets named by the config; every problem is a StartupError naming the file."""
    keyring = None  # verdicts (with require_signatures) and loosening commands are checked against it
    if cfg.verdicts.trusted_keys_file is not None:
        try:
            keyring = KeyRing.load(cfg.verdicts.trusted_keys_file)
        except (OSError, ValueError) as exc:
            raise StartupError(f"verdicts.trusted_keys_file: {exc}") from exc
    tls = None
    if cfg.mqtt.tls is not None:
        t = cfg.mqtt.tls
        files = {"ca_file": t.ca_file, "cert_file": t.cert_file, "key_file": t.key_file}
        resolved = {k: str(resolve_secret(v)) if v else None for k, v in files.items()}
        for key, path in resolved.items():
            if path and not Path(path).is_file():
                raise StartupError(f"mqtt.tls.{key}: {path} does not exist")
        tls = TlsSettings(resolved["ca_file"] or "", resolved["cert_file"], resolved["key_file"])
    password = None
    if cfg.mqtt.password_file:
        try:
            password = read_secret(cfg.mqtt.password_file)
        except OSError as exc:
            raise StartupError(f"mqtt.password_file: {exc}") from exc
    return keyring, tls, password


def _vision(cfg: Config) -> VisionCheck | None:
    if cfg.vision.mode == "off":
        return None  # and OpenCV and LiteRT are never imported
    from agent.vision.check import ModelError, VisionCheck

    try:
        return VisionCheck(
            cfg.vision.model, cfg.vision.thresholds.model_dump(), cfg.vision.keep_dir, cfg.vision.keep_max_mb
        )
    except ModelError as exc:
        raise StartupError(f"vision.model: {exc}") from exc


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.hash = config_hash(cfg)
        keyring, tls, password = _security(cfg)
        self.vision = _vision(cfg)
        state = Path(cfg.storage.state_dir)
        try:
            self.verdicts = VerdictStore(state / "verdicts.sqlite", cfg.verdicts.default_ttl_s)
            self.outbox = Outbox(state / "outbox.sqlite", cfg.outbox.max_records, cfg.outbox.max_mb * 1024 * 1024)
        except (OSError, sqlite3.Error, SchemaTooNew) as exc:
            raise StartupError(f"storage.state_dir: {state}: {exc}") from exc
        self.link = ControllerLink(link_settings(cfg))
        self.mqtt = MqttLink(
            host=cfg.mqtt.host, port=cfg.mqtt.port,
            client_id=cfg.mqtt.client_id or f"sortgate-{cfg.line.site}-{cfg.line.line}",
            topic_root=cfg.topic_root, keepalive_s=cfg.mqtt.keepalive_s,
            reconnect_max_s=cfg.mqtt.reconnect_max_s, on_message=self._on_mqtt,
            on_ack=self._on_ack, birth=self._birth, tls=tls, username=cfg.mqtt.username,
            password=password, acks_on_paho_thread=True,
        )
        self.publisher = OutboxPublisher(self.outbox, self._publish)
        self.mqtt.on_connected = self.publisher.on_connected
        self.mqtt.on_state = self._mqtt_state
        self.alarms = Alarms(cfg.line.site, cfg.line.line, self._alarm_sink)
        try:
            self.modes = ModeStore(state)
        except OSError as exc:
            raise StartupError(f"storage.state_dir: {state}: {exc}") from exc
        self.metrics = Metrics()
        self.inbound = Inbound(
            cfg, self.verdicts, keyring, self.alarms, self.mqtt, self.link, self.metrics.counters,
            set_mode=self._set_mode, status=self._status_info, modes=self.modes,
        )
        self.pipeline = Pipeline(
            cfg, self.alarms, self.link, self.verdicts, self.publisher, self.hash, self.vision,
            ask=self.inbound.ask if cfg.verdicts.lookup else None, metrics=self.metrics,
        )
        self.pipeline.state.mode = self.modes.mode  # a restart never loosens the mode
        self.plans = PlanUpdates(cfg, self.pipeline.state, keyring, self.alarms, self.mqtt,
                                 verify=self.inbound.verify_signed)
        self.inbound.plans = self.plans
        self.image_source: FolderSource | CaptureSource | None = None
        if self.vision is not None:
            from agent.vision.check import CaptureSource, FolderSource

            v = cfg.vision
            on_image = self.pipeline.intake.on_image
            if v.source == "folder":
                assert v.folder is not None
                self.image_source = FolderSource(v.folder, v.pattern, v.poll_ms / 1000, on_image)
            else:
                assert v.capture_url is not None
                capture = CaptureSource(v.capture_url, v.capture_delay_ms / 1000, on_image)
                self.pipeline.intake.trigger_hooks.append(capture.on_trigger)
                self.image_source = capture
        self.vitals = Vitals(VITAL_STALL_S, VITAL_EXIT_S)
        self.clock = ClockWatch()
        self.supervisor = ControllerSupervisor(
            cfg, self.link, self.pipeline, healthy=lambda: not self.vitals.stalled, lease_s=2 * HOUSEKEEPING_S,
        )
        # each vital loop marks every turn (at least twice a second); paho's thread must be alive
        self.vitals.watch("inbound", self.inbound.last_turn)
        self.vitals.watch("recorder", self.pipeline.recorder.last_turn)
        self.vitals.watch("controller", lambda: self.supervisor.alive, slack_s=cfg.controller.reconnect_max_s)
        self.vitals.require("mqtt", lambda: self.mqtt.thread_alive or self.mqtt.stopping)
        self.stats = StatsReporter(cfg, self.metrics, self.pipeline.state)
        self.notifier = SystemdNotifier()
        self.readers = [
            ReaderPort(
                r.name, r.device,
                FrameDecoder(*r.frame_bytes, r.noread, r.multi_read_delimiter, r.max_frame_bytes, r.counter_format),
                on_event=self._reader_event, on_state=self._reader_state,
                line=r.serial_line,
            )
            for r in cfg.readers
        ]
        self._reader_up: dict[str, bool] = {}
        self.reader_monitor = ReaderMonitor({r.name: r.device for r in cfg.readers})
        self.local = LocalControl(self)

    # --- callbacks ----------------------------------------------------------------------
    def _birth(self) -> dict[str, Any]:
        ident = self.pipeline.state.identity
        return messages.status_online(
            site=self.cfg.line.site, line=self.cfg.line.line, config_hash=self.hash,
            contract=f"{ident.contract_major}.{ident.contract_minor}" if ident else None,
            controller_firmware=".".join(map(str, ident.firmware)) if ident else None,
            model_version=self.vision.model_version if self.vision else None, mode=self.pipeline.state.mode.value,
            plan=self.plans.info(),
        )

    def _status_info(self) -> dict[str, Any]:
        return {
            **self._birth(),
            "problems": self.problems(),
            "alarms": [{"alarm": k, "subject": s, "detail": d} for (k, s), d in self.alarms.active.items()],
            "outbox_pending": self.outbox.count(),
            "outbox_published": self.publisher.published,
            "outbox_acked": self.publisher.acked,
            "verdicts_stored": self.verdicts.count(),
            "controller_requests": self.link.requests,
            "reader_bytes": {r.name: r.bytes_in for r in self.readers},
            "counters": dict(self.metrics.counters),
        }

    def problems(self) -> list[str]:
        """Everything wrong now: the line's problems (any of them sends every parcel to
        inspection), then the other active alarm conditions (``kind`` or ``kind:subject``), such
        as a reader or the MQTT link offline."""
        out = list(self.pipeline.state.problems)
        for kind, subject in self.alarms.active:
            name = f"{kind}:{subject}" if subject else kind
            if name not in out:
                out.append(name)
        return out

    def _mqtt_state(self, up: bool, detail: str) -> None:
        self.local.mqtt_state(up, detail)
        self.alarms.condition("mqtt_offline", not up, detail)

    def _set_mode(self, mode: Mode) -> None:
        self.pipeline.state.mode = mode

    def _alarm_sink(self, alarm_id: str, payload: bytes) -> None:
        if self.pipeline.state.outbox_ok:
            self.pipeline.recorder.queue_alarm(alarm_id, payload)
        elif self.mqtt.connected.is_set():
            # the outbox cannot store: say so anyway, best effort
            self.mqtt.publish(messages.topic(self.cfg.topic_root, "alarms"), payload, qos=1)

    def _publish(self, topic: str, payload: bytes) -> int | None:
        return self.mqtt.publish(topic, payload, qos=1)

    def _on_ack(self, mid: int) -> None:  # paho's thread
        self.publisher.ack_from_thread(mid)

    def _on_mqtt(self, topic: str, payload: bytes, meta: MessageMeta) -> None:
        self.inbound.offer(topic, payload, meta)

    def _reader_event(self, name: str, event: ReaderEvent, t: float) -> None:
        self.reader_monitor.on_event(name, event)
        self.pipeline.intake.on_reader_event(name, event, t)

    def _reader_state(self, name: str, up: bool, detail: str) -> None:
        self.reader_monitor.on_state(name, up, detail)
        if self._reader_up.get(name) != up:
            (log.info if up else log.error)("reader " + ("online" if up else "offline"), reader=name, detail=detail)
            if name in self._reader_up or not up:
                self.alarms.condition("reader_offline", not up, detail, subject=name)
            self._reader_up[name] = up
        elif not up:  # each reopen attempt, so that a technician sees the agent trying
            log.info("reader still offline", reader=name, detail=detail)

    # --- tasks --------------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        # systemd restarts us if the loop stalls for WatchdogSec: ping at a quarter of it
        ping_every = self.notifier.watchdog_s / 4 if self.notifier.watchdog_s else None
        next_ping = 0.0
        next_stats = time.monotonic() + self.cfg.health.stats_interval_s
        while True:
            now = time.monotonic()
            self.pipeline.housekeeping(now)
            self.vitals.check(now)
            self.supervisor.keep_alive(now)  # the heartbeat goes on while every vital task runs
            step = self.clock.check()
            if step is not None:
                log.warning("system clock stepped", by_s=round(step, 1))
                self.alarms.event("clock_jump", f"the system clock stepped by {step:+.1f} s")
            if ping_every and now >= next_ping and not self.vitals.stalled:
                self.notifier.watchdog()
                next_ping = now + ping_every
            if now >= next_stats:
                next_stats = now + self.cfg.health.stats_interval_s
                self._publish_stats()
                fill = self.outbox.fill
                if fill >= self.cfg.outbox.alarm_at or fill < self.cfg.outbox.alarm_at - 0.1:
                    self.alarms.condition(
                        "outbox_filling", fill >= self.cfg.outbox.alarm_at,
                        f"outbox at {fill:.0%} of its budget ({self.outbox.count()} records)",
                    )
            await asyncio.sleep(HOUSEKEEPING_S)

    def _publish_stats(self) -> None:
        if self.mqtt.connected.is_set():
            stats = self.stats.report(time.monotonic(), self.outbox.count(), self.problems())
            self.mqtt.publish(messages.topic(self.cfg.topic_root, "stats"), messages.dumps(stats), qos=0)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, stop)
        log.info("sortgate starting", site=self.cfg.line.site, line=self.cfg.line.line, config_hash=self.hash)
        self.mqtt.start()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.supervisor.run(), name="controller")
                for r in self.readers:
                    tg.create_task(r.run(), name=f"reader-{r.name}")
                tg.create_task(self.pipeline.recorder.run(), name="recorder")
                tg.create_task(self.publisher.run(), name="outbox")
                tg.create_task(self.inbound.run(), name="inbound")
                tg.create_task(self.outbox.prune_decisions(older_than_s=3600), name="prune")
                tg.create_task(self._housekeeping(), name="housekeeping")
                tg.create_task(self._report_readiness(), name="readiness")
                tg.create_task(self.local.server.run(), name="control")
                tg.create_task(self._prune_journal(), name="journal")
                if self.image_source is not None:
                    tg.create_task(self.image_source.run(), name="images")
                # A failing task (a contract mismatch in "controller") cancels this wait and
                # leaves the TaskGroup as an exception group; a signal ends it with _Stop.
                await stop.wait()
                raise _Stop
        except* _Stop:
            log.info("sortgate stopping")
        finally:
            self.notifier.stopping()
            await self.pipeline.stop()  # parcel tasks and decision saves end before the stores close
            self.mqtt.stop()
            try:
                await self.publisher.flush()
            except Exception as exc:  # noqa: BLE001 - a full or failed disk: the rows are only resent
                log.warning("acknowledged records not deleted; they will be sent again", error=str(exc))
            self.outbox.close()
            self.verdicts.close()
            self.link.close()
            if self.vision is not None:
                self.vision.close()

    async def _prune_journal(self) -> None:
        """The console's local history keeps ``console.journal_days`` and at most
        ``console.journal_max_records``; pruned a batch a minute
        (a disk error here is logged: the journal is a convenience, the outbox is the record)."""
        keep_s = self.cfg.console.journal_days * 86400
        while True:
            pause = 60.0
            try:
                if await self.outbox.prune_journal(keep_s, self.cfg.console.journal_max_records) >= 5000:
                    pause = 1.0  # more to go: the next batch soon
            except (OSError, sqlite3.Error) as exc:
                log.warning("journal not pruned", error=str(exc))
            await asyncio.sleep(pause)

    async def _report_readiness(self) -> None:
        # Ready as soon as every task runs: an agent whose PLC is off must still be up, reporting
        # "controller offline" (and the controller defaults every parcel meanwhile).
        link = self.link.settings.describe()
        self.notifier.ready(f"waiting for controller {link}")
        shown = ""
        while True:
            text = f"controller {link} " + ("connected" if self.supervisor.connected.is_set() else "offline")
            problems = self.problems()
            text += f"; problems: {', '.join(problems)}" if problems else "; line healthy"
            if text != shown:
                self.notifier.status(text)
                shown = text
            await asyncio.sleep(0.5)

    def _on_signal(self, stop: asyncio.Event) -> None:
        """SIGTERM/SIGINT: stop cleanly, and in any case within STOP_HARD_S (a stuck shutdown must
        not keep a deaf agent alive)."""
        if not stop.is_set():
            stop.set()
            timer = threading.Timer(STOP_HARD_S, _hard_exit)
            timer.daemon = True
            timer.start()


def _hard_exit() -> None:
    log.error("clean stop took too long; exiting now", limit_s=STOP_HARD_S)
    os._exit(1)


class _Stop(Exception):
    pass




async def _main(cfg: Config) -> None:
    await Agent(cfg).run()


def run_agent(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    code = 0
    sys.setswitchinterval(GIL_SWITCH_S)
    try:
        asyncio.run(_main(cfg))
    except* StartupError as starting:
        for exc in starting.exceptions:
            log.error("cannot start", error=str(exc))
        code = 2
    except* ContractMismatch as mismatch:
        for why in mismatch.exceptions:
            log.error("controller contract mismatch; refusing to run", error=str(why))
        code = 3
    except* Exception as failed:  # a vital task died: exit non-zero so that systemd restarts the agent
        for err in failed.exceptions:
            log.error("vital task failed; agent exits", error=repr(err), exc_info=err)
        code = 1
    return code
