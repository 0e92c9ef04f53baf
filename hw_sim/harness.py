"""Run the whole line: simulator, broker, central system and the agent as its own process.

``LineRun`` is what ``sortgate sim``, ``sortgate bench line`` and the integration tests share. It
starts the simulated controller (Modbus TCP on a free loopback port, or RTU over a pty null-modem),
one pty per barcode reader, a mosquitto on loopback (unless given one), the central system, and then
``sortgate run`` as a child process with a generated config. It feeds the planned parcels onto the
belt in real time and measures everything on the simulator's side of the wires.

Figures (``LineRun.metrics``):
  decision_ms  from the moment the last input for a parcel was on the wire (trigger captured, reader
               frame written) to the lane command arriving at the controller
  late         parcels the controller defaulted because no command had arrived by the decision point
  missorted    parcels whose physical lane differs from the lane commanded
  wrongly_released  parcels that reached the release lane although ground truth says inspection
  wrong_identity    records whose waybill is not printed on that parcel, or whose reads carry a
               code printed on another parcel
  needless_inspections  parcels that deserved release but were inspected, counted per reason in
               their records (a parcel with several reasons counts under each)
With a sort plan (``RunSpec.sort_plan``, the line of ``hw_sim.sortline``), also:
  wrong_lane   passes that reached a lane ground truth does not allow them under any plan of the
               run (another class, another group, a hold lane for another reason; the loop is
               allowed for a pass the agent could not read, whatever the cause)
  overflowed   records placed in an overflow lane (the rule's first lane was full or disabled)
  recirculated passes sent round the loop (each comes back as a new trigger, a new record)
  lane_full_events  times a lane became full
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import functools
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

from agent.central.security import generate_keypair, sign_item
from agent.pipeline.sortplan import UNREAD, PlaceReason
from agent.service.stats import percentile
from firmware_bridge import contract as c
from hw_sim import chaos as faults
from hw_sim import sortline, waybills
from hw_sim.broker import Mosquitto
from hw_sim.central import Central
from hw_sim.console_load import DEFAULT_PORT, ConsoleProcess, LoadClients, free_port
from hw_sim.controller import ControllerModel, ControllerParams, Tracked, run_cycle, serve_rtu, serve_tcp
from hw_sim.plan import Plan, PlannedParcel, make_plan
from hw_sim.reader_faults import BOOT_GARBAGE, RESTART_S, pick_faults, plan_cycles
from hw_sim.readers import SIM_COUNTER, NullModem, SimReader

RELEASE_LANE, INSPECTION_LANE = 2, 1
TWO_LANES = {RELEASE_LANE: "release", INSPECTION_LANE: "inspection"}
CLEARED = sortline.CLEARED
#: a record with only these reasons: the agent read nothing for that pass
READ_NOTHING = UNREAD | {PlaceReason.RECIRCULATED, PlaceReason.RECIRCULATION_LIMIT}


@dataclass
class RunSpec:
    parcels: int = 200
    rate: float = 5.0
    seed: int = 1
    speed_mps: float = 3.0
    readers: int = 1
    transport: str = "tcp"  # "tcp" | "rtu"
    framing: str = "crlf"  # "crlf" | "stx_etx"
    decision_distance_m: float = 1.5
    watchdog_ms: int = 500
    reader_noise: dict[int, bytes] = field(default_factory=dict)  # parcel index -> bytes sent before its frame
    plan: Plan | None = None
    agent_log_level: str = "info"
    site: str = "SIM"
    line: str = "L1"
    extra_config: str = ""  # appended TOML (tests of config handling)
    controller_overrides: dict[str, Any] = field(default_factory=dict)  # ControllerParams fields
    signing: tuple[str, str] | None = None  # central signs verdicts: (private key b64, key id)
    require_signatures: bool = False  # the agent trusts only central's key (made for the run if unset)
    forged: list[list[dict[str, Any]]] = field(default_factory=list)  # verdict-flood batches, signed ahead
    # timed faults, (seconds after the first parcel, action): "agent-kill" (SIGKILL), "agent-start",
    # "broker-stop", "broker-start", or a callable run(LineRun) in a worker thread
    chaos_steps: list[tuple[float, Any]] = field(default_factory=list)
    # named far-side faults (hw_sim.chaos), spread over the run; reported per fault
    chaos: list[str] = field(default_factory=list)
    push_fraction: float = 1.0  # share of known verdicts pushed ahead; the rest only by look-up
    images: bool = False  # a scanner writes each parcel's X-ray image; the agent's check is required
    vision_extra: str = ""  # extra keys for the agent's [vision] table (tests)
    model: Path | None = None  # the agent's model file (default: the shipped int8 model)
    image_faults: dict[int, str] = field(default_factory=dict)  # parcel index -> "missing" | "corrupt" | "late"
    reader_counter: bool = True  # readers prefix their trigger counter (the recommended setting)
    reader_faults: list[str] = field(default_factory=list)  # drawn at fault_rate (hw_sim.reader_faults)
    fault_rate: float = 0.01  # share of parcel-reader pairs that get one of reader_faults
    fault_plan: dict[tuple[int, int], str] = field(default_factory=dict)  # (parcel, reader) -> fault, exact
    reader_window_ms: tuple[int, int] = (2, 16)  # the agent's window after the trailing edge
    idle_s: float = 0.0  # the belt runs this long with no parcel first: the agent's idle CPU is measured
    console: bool = False  # run the local web console beside the agent (read-only, no users)
    console_clients: int = 0  # live clients on the console during the run (implies console)
    # a line with a sort plan (hw_sim.sortline's lanes): the plan the config starts with, and one
    # central sends (signed) ``plan_update_at`` seconds after the first parcel
    sort_plan: dict[str, Any] | None = None
    plan_update: dict[str, Any] | None = None
    plan_update_at: float = 0.0


@dataclass
class Truth:
    """Ground truth and measurements for one parcel, on the simulator's side."""

    planned: PlannedParcel
    tracked: Tracked | None = None
    t_frames: list[float] = field(default_factory=list)
    lane_reached: int | None = None
    disposition: str | None = None
    faults: list[str] = field(default_factory=list)  # reader faults that hit this parcel
    after_kill: bool = False  # triggered after the agent was first killed
    t_image: float | None = None  # when the scanner's image file appeared
    classes: dict[int, str] = field(default_factory=lambda: TWO_LANES)  # lane -> class on this line
    pass_no: int = 0  # rounds of the recirculation loop before this pass
    prev_seq: int = 0  # the trigger of its previous pass

    @property
    def last_input(self) -> float | None:
        if self.tracked is None:
            return None
        return max([self.tracked.t_trigger, *self.t_frames, *([self.t_image] if self.t_image else [])])

    @property
    def key(self) -> tuple[int, int]:
        """The parcel's identity on the line, as its record carries it ((0, -1), which no record
        has, for a parcel the controller never tracked)."""
        return (self.tracked.seq, self.tracked.encoder) if self.tracked else (0, -1)

    @property
    def decision_ms(self) -> float | None:
        t = self.tracked
        if t is None or t.t_cmd is None or self.last_input is None:
            return None
        return (t.t_cmd - self.last_input) * 1000

    @property
    def reached(self) -> str:
        """The class of the lane it reached ("lost" if none)."""
        return self.classes.get(self.lane_reached or 0, "lost")

    @property
    def cleared(self) -> bool:
        """Ground truth lets it out of customs: a label a reader can read on this pass and a
        release verdict."""
        return sortline.readable(self.planned, self.pass_no) and self.planned.verdict == "release"


def agent_config(spec: RunSpec, *, controller: str, readers: list[SimReader], mqtt_port: int, state_dir: Path,
                 scan_dir: Path | None = None, mqtt_auth: tuple[str, Path] | None = None) -> str:
    vision = ""
    if spec.images:
        vision = f"""
[vision]
mode = "required"
model = "{spec.model or 'xray_int8.tflite'}"
source = "folder"
folder = "{scan_dir}"
window_ms = 300
poll_ms = 3
name_seq_regex = '^seq(?P<seq>\\d+)-'
keep_dir = "{state_dir / 'flagged'}"
{spec.vision_extra}
"""
    counter = (
        f"""[readers.counter]
position = "{SIM_COUNTER.position}"
separator = "{SIM_COUNTER.separator}"
width = {SIM_COUNTER.width}
modulus = {SIM_COUNTER.modulus}
"""
        if spec.reader_counter else ""
    )
    reader_blocks = "".join(
        f"""
[[readers]]
name = "{r.name}"
device = "{r.path}"
baudrate = 115200
framing = "{spec.framing}"
window_ms = [{spec.reader_window_ms[0]}, {spec.reader_window_ms[1]}]
window_from = "trailing_edge"
{counter}"""
        for r in readers
    )
    return f"""# generated by hw_sim.harness for one simulated run
[line]
site = "{spec.site}"
line = "{spec.line}"

[controller]
{controller}
poll_interval_ms = 4
trigger_publish_ms = 1
heartbeat_interval_ms = 100
timeout_ms = 250
reconnect_max_s = 1.0
{reader_blocks}
{_lanes(spec)}

[decision]
safety_margin_ms = 60

[storage]
state_dir = "{state_dir}"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
{f'username = "{mqtt_auth[0]}"{chr(10)}password_file = "{mqtt_auth[1]}"' if mqtt_auth else ""}

[logging]
level = "{spec.agent_log_level}"
format = "json"

[health]
stats_interval_s = 5
{vision}
{spec.extra_config}
"""


def _lanes(spec: RunSpec) -> str:
    if spec.sort_plan is not None:
        return sortline.lanes_toml() + sortline.plan_toml(spec.sort_plan)
    return f"""
[[lanes]]
number = {INSPECTION_LANE}
name = "inspection"
role = "inspection"

[[lanes]]
number = {RELEASE_LANE}
name = "release"
role = "release"
gate = 1
"""


class LineRun:
    def __init__(
        self,
        spec: RunSpec,
        broker: Mosquitto | None = None,
        on_progress: Callable[[LineRun], None] | None = None,
    ) -> None:
        self.spec = spec
        self.plan = spec.plan or make_plan(spec.parcels, spec.rate, spec.seed, spec.speed_mps, spec.readers)
        self._own_broker = broker is None
        self.broker = broker
        self.on_progress = on_progress
        self.dir = Path(tempfile.mkdtemp(prefix="sortgate-run-"))
        lanes: dict[str, Any] = {}
        self.classes = TWO_LANES
        if spec.sort_plan is not None:
            self.classes = sortline.CLASSES
            lanes = {
                "gate_for_lane": {n: g for n, _, _, g, _ in sortline.LANES if g is not None},
                "lane_count": len(sortline.LANES), "lane_capacity": dict(sortline.CAPACITY),
                "recirculation_lane": sortline.LOOP_LANE,
            }
        self.truth = [Truth(p, classes=self.classes) for p in self.plan.parcels]
        self.model = ControllerModel(
            ControllerParams(
                speed_mps=spec.speed_mps, decision_distance_m=spec.decision_distance_m,
                watchdog_ms=spec.watchdog_ms, **{**lanes, **spec.controller_overrides},
            )
        )
        self._returns: list[asyncio.Future[None]] = []  # passes back from the loop, still on the belt
        # (start, end) at the scan point of every parcel: the planned ones (from the run's start), and
        # those back from the loop as they are merged in; sorted
        self._busy: list[tuple[float, float]] = []
        self.plans_used = [spec.sort_plan] if spec.sort_plan else []
        counter = SIM_COUNTER if spec.reader_counter else None
        self.readers = [
            SimReader(f"reader{i + 1}", *self._framing(), counter=counter, link=self.dir / f"reader{i + 1}.tty")
            for i in range(spec.readers)
        ]
        self.fault_plan = dict(spec.fault_plan) or pick_faults(
            len(self.plan.parcels), spec.readers, spec.reader_faults, spec.fault_rate, spec.seed
        )
        self._reader_down_until = [0.0] * spec.readers
        self._fault_rng = random.Random(spec.seed + 4242)
        self.central: Central | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_rusage: Any = None
        self._rusage_parts: list[Any] = []  # one per agent process that has ended
        self.chaos_log: list[tuple[float, str]] = []
        self.agent_starts = 0
        self.killed_at: float | None = None
        self.exited = 0
        self.metrics: dict[str, Any] = {}
        self.config_path = self.dir / "agent.toml"
        self.agent_log = self.dir / "agent.log"
        self.scan_dir = self.dir / "xray"
        self.scan_dir.mkdir()
        self._render = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xray-render") if spec.images else None
        self._scans = 0
        self.state_dir = self.dir / "state"
        self.faults = faults.parse(",".join(spec.chaos)) if spec.chaos else []
        self.injected: list[faults.Injected] = []
        needs = {f.needs for f in self.faults}
        self.mqtt_user, self.mqtt_password = "sortgate", "agent-secret"
        self.mqtt_auth = "auth" in needs
        if self.mqtt_auth and broker is not None:
            raise ValueError("broker-auth needs the run's own broker (with a password file)")
        self._tmpfs = faults.Tmpfs(self.state_dir) if "tmpfs" in needs else None
        self.server: ModbusTcpServer | ModbusSerialServer | None = None
        self.controller_port = 0
        self.idle_cpu_pct: float | None = None
        self._cpu_at_start: tuple[float | None, float] = (None, 0.0)
        self._cpu_at_end: tuple[float | None, float] = (None, 0.0)
        self.console: ConsoleProcess | None = None
        self._console_port = 0
        self.console_load: LoadClients | None = None
        self.on_console: Callable[[str], None] | None = None  # told the console's address when it listens

    def _framing(self) -> tuple[bytes, bytes]:
        return (b"\x02", b"\x03") if self.spec.framing == "stx_etx" else (b"", b"\r\n")

    @property
    def topic_root(self) -> str:
        return f"sortgate/{self.spec.site}/{self.spec.line}"

    # --- set-up -------------------------------------------------------------------------
    async def _start_controller(self) -> tuple[ModbusTcpServer | ModbusSerialServer, str, NullModem | None]:
        if self.spec.transport == "rtu":
            modem = NullModem()
            modem.start()
            # Linux ptys drop the parity flag (and pyserial's re-configure then fails), so the
            # simulated RS-485 line runs 8N1, a common RTU setting; real ports keep their parity.
            rtu = await serve_rtu(self.model, modem.a, baudrate=115200, parity="N")
            return rtu, f'transport = "rtu"\ndevice = "{modem.b}"\nbaudrate = 115200\nparity = "N"', modem
        tcp, port = await serve_tcp(self.model)
        self.controller_port = port
        return tcp, f'transport = "tcp"\nhost = "127.0.0.1"\nport = {port}', None

    def start_agent(self) -> None:
        self.agent_starts += 1
        log = open(self.agent_log, "ab")  # closed with the process
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config_path)],
            stdout=log, stderr=log, env=env,
        )

    async def _wait_ready(self, timeout_s: float = 30.0) -> None:
        assert self.central is not None and self.agent is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.agent.poll() is not None:
                raise RuntimeError(f"agent exited with {self.agent.returncode}:\n{self.agent_log_tail()}")
            online = self.central.status and self.central.status.get("state") == "online"
            if online and not self.model.status & c.StatusBit.WATCHDOG_TRIPPED:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"agent not ready in {timeout_s}s:\n{self.agent_log_tail()}")

    def agent_log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.agent_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- the run ------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        # the simulated controller's side: connections the chaos closes are expected, not news
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        auth = self._prepare()
        assert self.broker is not None
        server, controller_toml, modem = await self._start_controller()
        self.server = server
        cycle = asyncio.create_task(run_cycle(self.model), name="plc-cycle")
        config = agent_config(self.spec, controller=controller_toml, readers=self.readers,
                              mqtt_port=self.broker.port, state_dir=self.state_dir, scan_dir=self.scan_dir,
                              mqtt_auth=auth)
        if self.spec.require_signatures or self.spec.plan_update is not None:
            config += self._trust_central()
        if self.spec.console or self.spec.console_clients:  # the console reads its port from this config
            self._console_port = free_port(DEFAULT_PORT)
            config += f"\n[console]\nport = {self._console_port}\n"
        self.config_path.write_text(config)
        known = {p.waybill: p.verdict for p in self.plan.parcels if p.waybill and p.verdict != "none"}
        extra = {p.waybill: {k: v for k, v in (("hold_reason", p.hold_reason), ("group", p.group)) if v}
                 for p in self.plan.parcels if p.waybill and (p.hold_reason or p.group)}
        self.central = Central(
            "127.0.0.1", self.broker.port, self.topic_root, known=known, signing=self.spec.signing,
            client_id=f"central-{self.spec.site}-{self.spec.line}", extra=extra,
        ).start()
        self.model.on_command = None
        try:
            self.start_agent()
            await self._wait_ready()
            await self._start_console()
            if self._render is not None:  # the first render imports OpenCV (about 0.1 s, far more on a
                # busy machine): done before the belt starts, so the first parcel's image is not late
                await asyncio.wrap_future(self._render.submit(_scan_png, 0, "clean"))
            await self._measure_idle()
            t0 = loop.time() + 0.5
            pusher = asyncio.create_task(self._push_verdicts(t0), name="central-push")
            await asyncio.sleep(0.3)  # first verdict batches are in the agent's store
            feeder = asyncio.create_task(self._feed(t0), name="feeder")
            progress = asyncio.create_task(self._progress(), name="progress")
            chaos = asyncio.create_task(self._chaos(t0), name="chaos")
            update = asyncio.create_task(self._update_plan(t0), name="plan-update")
            await feeder
            await chaos
            await update
            await self._settle()
            self._cpu_at_end = (self._agent_cpu_s(), time.monotonic())
            if progress.done():
                progress.result()  # a failing progress callback must not fail silently
            progress.cancel()
            pusher.cancel()
            return self._compute()
        finally:
            cycle.cancel()
            self._stop_console()
            if self._render is not None:
                self._render.shutdown(wait=False, cancel_futures=True)
            await self.stop_agent()
            if self.central:
                self.central.stop()
            if self.server is not None:
                await self.server.shutdown()  # type: ignore[no-untyped-call]
            if modem:
                modem.close()
            for r in self.readers:
                r.close()
            if self._own_broker and self.broker:
                self.broker.close()
            if self._tmpfs is not None:
                self._tmpfs.unmount()

    async def _start_console(self) -> None:
        if not (self.spec.console or self.spec.console_clients):
            return
        port = self._console_port
        self.console = ConsoleProcess(self.config_path, port, self.dir / "console.log")
        await asyncio.to_thread(self.console.start)
        if self.on_console:
            self.on_console(self.console.url)
        if self.spec.console_clients:
            self.console_load = LoadClients(port, self.spec.console_clients)
            self.console_load.start()

    def _stop_console(self) -> None:
        if self.console_load is not None:
            self.console_load.stop()
            self.metrics["console"] = {
                "clients": self.console_load.n, "events_received": self.console_load.events,
                "pages_loaded": self.console_load.pages, "errors": len(self.console_load.errors),
                "first_errors": self.console_load.errors[:3],
            }
        if self.console is not None:
            self.console.stop()

    def _agent_cpu_s(self) -> float | None:
        """CPU seconds (user + system) the running agent process has used so far (Linux)."""
        if self.agent is None:
            return None
        try:
            fields = Path(f"/proc/{self.agent.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def _measure_idle(self) -> None:
        """The belt runs empty for ``idle_s``: the agent's CPU then, as % of one core; and the CPU
        it has used when the parcels start (for the marginal cost per parcel)."""
        if self.spec.idle_s > 0:
            cpu0, w0 = self._agent_cpu_s(), time.monotonic()
            await asyncio.sleep(self.spec.idle_s)
            cpu1, w1 = self._agent_cpu_s(), time.monotonic()
            if cpu0 is not None and cpu1 is not None:
                self.idle_cpu_pct = round((cpu1 - cpu0) / (w1 - w0) * 100, 2)
        self._cpu_at_start = (self._agent_cpu_s(), time.monotonic())

    def _prepare(self) -> tuple[str, Path] | None:
        """The broker (with the agent's password when a fault needs one) and the state folder
        (a tmpfs that can be filled, for disk-full). Returns the agent's MQTT user and password file."""
        if self._tmpfs is not None:  # first: without root it fails before anything has started
            self._tmpfs.mount()
        if self.broker is None:
            passwords = {self.mqtt_user: self.mqtt_password} if self.mqtt_auth else None
            self.broker = Mosquitto(passwords=passwords).start()
        if not self.mqtt_auth:
            return None
        secret = self.dir / "mqtt.password"
        secret.write_text(self.mqtt_password + "\n")
        return self.mqtt_user, secret

    def _trust_central(self) -> str:
        """Central signs with a key the agent trusts: the config lines that say so."""
        if self.spec.signing is None:
            private, public = generate_keypair()
            self.spec.signing = (private, "central-1")
        else:
            public = base64.b64encode(
                Ed25519PrivateKey.from_private_bytes(base64.b64decode(self.spec.signing[0]))
                .public_key().public_bytes_raw()
            ).decode()
        keys = self.dir / "trusted.keys"
        keys.write_text(f"{self.spec.signing[1]} {public}\n")
        return f'\n[verdicts]\nrequire_signatures = true\ntrusted_keys_file = "{keys}"\n'

    async def _faults(self, t0: float) -> None:
        """The named faults, one after the other, at their times."""
        loop = asyncio.get_running_loop()
        for at, fault in faults.schedule(self.faults, self.plan.duration_s):
            await asyncio.sleep(max(0.0, t0 + at - loop.time()))
            inj = faults.Injected(fault, loop.time() - t0, time.time())
            self.injected.append(inj)
            self.chaos_log.append((round(inj.at_s, 2), fault.name))
            await fault.run(self)
            inj.end_wall = time.time()

    def drop_controller_connections(self) -> None:
        """The controller closes every client connection (a PLC's comms module resetting)."""
        server = self.server
        for conn in list(getattr(server, "active_connections", {}).values()):
            conn.close()

    async def controller_power_cycle(self, off_s: float) -> None:
        """Power off (no Modbus, nothing tracked), then the documented power-up state."""
        assert self.spec.transport == "tcp", "power cycles are simulated on Modbus TCP"
        if self.server is not None:
            await self.server.shutdown()  # type: ignore[no-untyped-call]
            self.server = None
        self.model.halt(True)
        await asyncio.sleep(off_s)
        self.model.power_up()
        self.server, _ = await serve_tcp(self.model, port=self.controller_port)

    async def _chaos(self, t0: float) -> None:
        """Run the timed faults. Blocking steps run in a thread so the belt keeps moving."""
        loop = asyncio.get_running_loop()
        if self.faults:
            await self._faults(t0)
        for at, action in sorted(self.spec.chaos_steps, key=lambda step: step[0]):
            await asyncio.sleep(max(0.0, t0 + at - loop.time()))
            self.chaos_log.append((round(loop.time() - t0, 2), getattr(action, "__name__", action)))
            if asyncio.iscoroutinefunction(action):
                await action(self)
            elif callable(action):
                await asyncio.to_thread(action, self)
            elif action == "agent-kill":
                await asyncio.to_thread(self.kill_agent, True)
            elif action == "agent-start":
                self.start_agent()
            elif action == "broker-stop":
                assert self.broker is not None
                await asyncio.to_thread(self.broker.stop)
            elif action == "broker-start":
                assert self.broker is not None
                await asyncio.to_thread(self.broker.start)
            else:
                raise ValueError(f"unknown chaos action {action!r}")

    async def _push_verdicts(self, t0: float) -> None:
        assert self.central is not None
        loop = asyncio.get_running_loop()
        batch = 100
        lead_s = 5.0
        parcels = [p for p in self.plan.parcels if p.verdict != "none" and p.waybill]
        if self.spec.push_fraction < 1.0:
            # the others are known to central only when the agent asks (MQTT 5 look-up)
            pick = random.Random(self.spec.seed)
            parcels = [p for p in parcels if pick.random() < self.spec.push_fraction]
        for i in range(0, len(parcels), batch):
            chunk = parcels[i : i + batch]
            wait = t0 + chunk[0].offset_s - lead_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            items = [(p.waybill, p.verdict) for p in chunk if p.waybill]
            await asyncio.to_thread(self.central.push_verdicts, items)

    async def _update_plan(self, t0: float) -> None:
        """Central replaces the sort plan mid-run (signed like its verdicts)."""
        if self.spec.plan_update is None:
            return
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, t0 + self.spec.plan_update_at - loop.time()))
        assert self.central is not None and self.spec.signing is not None
        self.plans_used.append(self.spec.plan_update)
        self.chaos_log.append((round(loop.time() - t0, 2), f"plan-update v{self.spec.plan_update['version']}"))
        await asyncio.to_thread(self.central.publish_plan, self.spec.plan_update, self.spec.site, self.spec.line)

    async def _feed(self, t0: float) -> None:
        loop = asyncio.get_running_loop()
        speed = self.spec.speed_mps
        self._busy = [(t0 + p.offset_s, t0 + p.offset_s + p.length_m / speed) for p in self.plan.parcels]
        pending: list[asyncio.Future[None]] = []
        for truth in list(self.truth):
            p = truth.planned
            when = t0 + p.offset_s
            await asyncio.sleep(max(0.0, when - loop.time()))
            done: asyncio.Future[None] = loop.create_future()
            pending.append(done)
            self._trigger(truth, done)
        await asyncio.gather(*pending)
        while self._returns:  # parcels back from the loop may send others round again
            await self._returns.pop(0)

    def _trigger(self, truth: Truth, done: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        p = truth.planned
        truth.after_kill = self.killed_at is not None
        tracked = self.model.trigger(round(p.length_m * 1000), truth.prev_seq)
        truth.tracked = tracked
        noise = self.spec.reader_noise.get(p.index)
        for r, (reader, decode_ms) in enumerate(zip(self.readers, p.decode_ms, strict=True)):
            self._read_cycles(truth, r, reader, decode_ms, noise)  # the readers read it anyway
        if tracked is None:  # the controller program is not running: never tracked
            truth.lane_reached, truth.disposition = INSPECTION_LANE, "untracked"
            loop.call_later(self.model.exit_delay_s(), self._untracked_exit, done)
            return
        fault = self.spec.image_faults.get(p.index)
        if self._render is not None and fault != "missing":
            image = self._render.submit(_scan_png, p.index + 1_000_000_000, p.item or "clean")
            delay = p.scan_ms / 1000 if fault != "late" else self.model.decision_delay_s() + 0.1
            loop.call_later(delay, self._export_image, truth, image)
        loop.call_later(self.model.decision_delay_s(), self.model.decision_point, tracked)
        loop.call_later(self.model.exit_delay_s(), self._exit, truth, done)

    def _read_cycles(self, truth: Truth, r: int, reader: SimReader, decode_ms: float, noise: bytes | None) -> None:
        """Schedule what reader ``r`` sends for this parcel: its read cycles, faults included."""
        loop = asyncio.get_running_loop()
        p = truth.planned
        fault = self.fault_plan.get((p.index, r))
        if fault:
            truth.faults.append(fault)
        now = time.monotonic()
        if fault == "restart":
            reader.send_raw(BOOT_GARBAGE)
            reader.counter = 0
            self._reader_down_until[r] = now + RESTART_S
            return
        if now < self._reader_down_until[r]:
            return  # still booting: this parcel is never read by it
        if p.label == "noread" and not sortline.readable(p, truth.pass_no):
            codes: tuple[str, ...] | None = None
        elif p.reader_misread:
            codes = (waybills.misread(p.codes[0], _rng(p.index)),)
        else:
            codes = p.codes
        speed = self.spec.speed_mps
        # (a pass back from the loop is between two planned parcels: no next parcel to plan around)
        nxt = self.plan.parcels[p.index + 1] if p.index + 1 < len(self.plan.parcels) and not truth.pass_no else None
        pitch = (nxt.offset_s - p.offset_s) if nxt else 1.0
        next_frame = pitch + nxt.length_m / speed + nxt.decode_ms[r] / 1000 if nxt else pitch
        cycles = plan_cycles(
            codes, p.length_m / speed, decode_ms / 1000, pitch, next_frame, fault, self._fault_rng
        )
        for cycle in cycles:
            counter = reader.next_cycle()
            if cycle.send:
                loop.call_later(cycle.at, self._send_frame, truth, reader, cycle.codes, counter, noise)
                if cycle.repeat_after is not None:
                    loop.call_later(cycle.at + cycle.repeat_after, self._send_frame, truth, reader,
                                    cycle.codes, counter, None)

    def _send_frame(
        self, truth: Truth, reader: SimReader, codes: tuple[str, ...] | None, counter: int, noise: bytes | None
    ) -> None:
        if noise:
            reader.send_raw(noise)
        truth.t_frames.append(reader.send(list(codes) if codes else None, counter))

    def _export_image(self, truth: Truth, image: Future[bytes]) -> None:
        """The scanner writes the parcel's image: under a temporary name, then renamed into place."""
        if not image.done():  # rendering fell behind: write as soon as it is ready
            loop = asyncio.get_running_loop()
            image.add_done_callback(lambda f: loop.call_soon_threadsafe(self._export_image, truth, f))
            return
        self._scans += 1
        assert truth.tracked is not None
        # the controller hands the scanner each parcel's trigger sequence; it names the file by it
        final = self.scan_dir / f"seq{truth.tracked.seq:05d}-{self._scans:08d}.png"
        tmp = self.scan_dir / f".scan{self._scans:08d}.tmp"
        data = image.result()
        if self.spec.image_faults.get(truth.planned.index) == "corrupt":
            data = data[: len(data) // 3]  # a truncated export
        tmp.write_bytes(data)
        os.rename(tmp, final)
        truth.t_image = time.monotonic()

    def _untracked_exit(self, done: asyncio.Future[None]) -> None:
        self.exited += 1
        done.set_result(None)

    def _exit(self, truth: Truth, done: asyncio.Future[None]) -> None:
        assert truth.tracked is not None
        entry = self.model.lane_exit(truth.tracked)
        if entry is None:  # forgotten by a controller restart: where its gate (or none) sent it
            truth.lane_reached, truth.disposition = truth.tracked.lane_reached, "forgotten"
        else:
            truth.lane_reached = entry.lane_reached
            truth.disposition = entry.disposition_name
        self.exited += 1
        done.set_result(None)
        if truth.disposition == "recirculated":  # round the loop, back to the scan point
            loop = asyncio.get_running_loop()
            back = Truth(truth.planned, classes=self.classes, pass_no=truth.pass_no + 1, prev_seq=truth.tracked.seq)
            self.truth.append(back)
            again: asyncio.Future[None] = loop.create_future()
            self._returns.append(again)
            loop.call_at(self._merge_slot(loop.time() + sortline.LOOP_S, truth.planned.length_m), self._trigger,
                         back, again)

    def _merge_slot(self, earliest: float, length_m: float) -> float:
        """When a parcel back from the loop passes the scan point: the first gap in the flow, from
        ``earliest``, that keeps the plan's minimum gap to every other parcel (as a merge does)."""
        speed, gap = self.spec.speed_mps, 0.10 / self.spec.speed_mps
        t, need = earliest, length_m / speed
        for start, end in self._busy:
            if end + gap <= t:
                continue
            if t + need + gap <= start:
                break
            t = max(t, end + gap)
        bisect.insort(self._busy, (t, t + need))
        return t

    async def _settle(self, timeout_s: float = 20.0) -> None:
        """Wait for the last records to reach central."""
        assert self.central is not None
        if self.agent is None or self.agent.poll() is not None:
            timeout_s = 3.0  # a dead agent publishes nothing more; give in-flight records a moment
        deadline = time.monotonic() + timeout_s
        tracked = sum(t.tracked is not None for t in self.truth)
        while time.monotonic() < deadline and len(self.central.records) < tracked:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # records arrive on paho's thread; a bounded poll is simplest

    async def _progress(self) -> None:
        while True:
            if self.on_progress:
                self.on_progress(self)
            await asyncio.sleep(0.25)

    # --- the agent process --------------------------------------------------------------
    def kill_agent(self, reap: bool = False) -> None:
        """SIGKILL the agent (no clean shutdown: no last words, no flush)."""
        if self.agent and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGKILL)
            self.killed_at = time.monotonic()
            if reap:
                _, status, rusage = os.wait4(self.agent.pid, 0)
                self.agent.returncode = os.waitstatus_to_exitcode(status)
                self._rusage_parts.append(rusage)

    async def stop_agent(self) -> None:
        proc = self.agent
        if proc is None or self.agent_rusage is not None:
            return
        if proc.returncode is not None:  # already reaped (killed by a chaos step, not restarted)
            self.agent_rusage = self._rusage_parts
            return
        if proc.returncode is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            _, status, rusage = await asyncio.wait_for(asyncio.to_thread(os.wait4, proc.pid, 0), 10)
            proc.returncode = os.waitstatus_to_exitcode(status)
            self.agent_rusage = [*self._rusage_parts, rusage]
        except (TimeoutError, ChildProcessError):
            proc.kill()

    # --- figures ------------------------------------------------------------------------
    def _compute(self) -> dict[str, Any]:
        assert self.central is not None
        truths = [t for t in self.truth if t.tracked is not None]
        keys = {t.key for t in truths}
        records = self.central.records_by_parcel()
        lat = [t.decision_ms for t in truths if t.decision_ms is not None]
        seen = [(t.tracked.t_seen - t.tracked.t_trigger) * 1000 for t in truths
                if t.tracked and t.tracked.t_seen is not None]
        m: dict[str, Any] = {
            "parcels": len(truths),
            "released": sum(t.reached in CLEARED for t in truths),
            "inspected": sum(t.reached == "inspection" for t in truths),
            "lost": sum(t.reached == "lost" for t in truths),
            # physically in another lane than the controller steered it to (a gate or lane fault)
            "missorted": sum(t.disposition == "missorted" for t in truths),
            # an accepted command the controller did not obey, for safety: the agent's watchdog
            # tripped (or a fault) before the parcel reached the gates; it went to inspection
            "overridden_by_controller": sum(
                1 for t in truths
                if t.tracked and t.tracked.cmd_lane and t.lane_reached != t.tracked.cmd_lane
                and t.disposition in ("defaulted_watchdog", "defaulted_fault")
            ),
            "wrongly_released": sum(t.reached in CLEARED and not t.cleared for t in truths),
            "late": sum(t.disposition == "defaulted_no_command" for t in truths),
            # the longest time the controller saw no agent heartbeat while its watchdog was not tripped
            "heartbeat_gap_ms_max": round(self.model.max_hb_gap_s * 1000, 1),
            "decision_ms": _quantiles(lat),
            # from the trigger's capture to the first status read that showed it to the agent
            "trigger_seen_ms": _quantiles(seen),
            "records_published": sum(1 for k in keys if k in records),
            "expected_release": sum(t.cleared for t in truths),
            "wrong_identity": sum(1 for t in truths if self._wrong_identity(t, records)),
            "needless_inspections": self._needless(truths, records),
        }
        if self.spec.sort_plan is not None:
            m.update(self._sort_figures(truths, records))
        if self.spec.reader_faults or self.spec.fault_plan:
            m["reader_faults"] = dict(sorted(collections.Counter(f for t in truths for f in t.faults).items()))
        if self.spec.images:
            hidden = [t for t in truths if t.planned.hidden_item]
            m["hidden_items"] = len(hidden)
            m["hidden_items_caught"] = sum(t.reached == "inspection" for t in hidden)
            m["hidden_items_released"] = sum(t.reached == "release" for t in hidden)
            clean_release = [t for t in truths if t.planned.expected_lane == "release" and not t.planned.item]
            m["image_false_alarms"] = sum(
                1 for t in clean_release if t.tracked and "image_flagged" in
                (records.get(t.key, {}).get("decision") or {}).get("reasons", [])
            )
            m["image_missing_or_failed"] = sum(
                1 for t in truths if t.tracked and (records.get(t.key, {}).get("image") or {}).get("status")
                in ("missing", "failed")
            )
        if self.spec.chaos_steps or self.faults:
            unique = m["records_published"]
            m["records_unique"] = unique
            m["records_lost"] = m["parcels"] - unique
            m["duplicates"] = self.central.duplicates
            m["agent_starts"] = self.agent_starts
            m["chaos"] = (
                faults.report(self.injected, list(self.central.alarms)) if self.faults
                else [f"{t}s {a}" for t, a in self.chaos_log]
            )
            # parcels the controller never tracked (its program was off), or forgot (a restart)
            m["untracked"] = sum(t.disposition == "untracked" for t in self.truth)
            m["forgotten"] = sum(t.disposition == "forgotten" for t in truths)
        self.metrics = m  # the agent process's own figures are added when it ends
        return m

    def _sort_figures(self, truths: list[Truth], records: dict[tuple[int, int], dict[str, Any]]) -> dict[str, Any]:
        """Figures of a line with a sort plan (the module docstring says what each means)."""
        placed = [(records.get(t.key) or {}).get("decision") or {} for t in truths]
        wrong = [t for t, d in zip(truths, placed, strict=True) if t.lane_reached and t.lane_reached not in
                 sortline.allowed(t.planned, t.pass_no, self.plans_used,
                                  read_nothing=bool(d.get("reasons")) and set(d["reasons"]) <= READ_NOTHING)]
        return {
            "wrong_lane": len(wrong),
            "wrong_lane_examples": [
                {"seq": t.key[0], "lane": t.lane_reached, "verdict": t.planned.verdict, "group": t.planned.group,
                 "hold_reason": t.planned.hold_reason, "label": t.planned.label, "pass": t.pass_no}
                for t in wrong[:5]
            ],
            "overflowed": sum(bool((d.get("plan") or {}).get("overflowed")) for d in placed),
            "recirculated": sum(t.disposition == "recirculated" for t in truths),
            "lane_full_events": self.model.lane_full_events,
            "by_class": dict(sorted(collections.Counter(t.reached for t in truths).items())),
            "plan_versions": dict(sorted(collections.Counter(
                str((d.get("plan") or {}).get("version")) for d in placed if d).items())),
            "plan_results": [{"version": r.get("version"), "accepted": r.get("accepted"),
                              "problems": r.get("problems")} for r in self.central.plan_results]
            if self.central else [],
        }

    def _wrong_identity(self, truth: Truth, records: dict[tuple[int, int], dict[str, Any]]) -> bool:
        """The record of this parcel names a code that is not printed on it but on another parcel."""
        if truth.tracked is None:
            return False
        rec = records.get((truth.tracked.seq, truth.tracked.encoder))
        if rec is None:
            return False
        own = set(truth.planned.codes)
        if rec.get("waybill") and rec["waybill"] not in own:
            return True
        read = {code for r in rec.get("reads") or [] for code in r.get("codes", [])}
        return bool((read - own) & self._all_codes)

    @functools.cached_property
    def _all_codes(self) -> set[str]:
        return {code for p in self.plan.parcels for code in p.codes}

    @staticmethod
    def _needless(truths: list[Truth], records: dict[tuple[int, int], dict[str, Any]]) -> dict[str, int]:
        """Parcels that deserved release but were inspected, per reason in their records."""
        causes: collections.Counter[str] = collections.Counter()
        for t in truths:
            if not t.cleared or t.reached in CLEARED or t.tracked is None:
                continue
            decision = (records.get(t.key) or {}).get("decision") or {}
            for reason in decision.get("reasons") or [f"no_decision_{t.disposition}"]:
                causes[reason] += 1
        return dict(sorted(causes.items()))

    def add_process_figures(self) -> None:
        """Peak RSS and CPU time of the agent, over every process it ran as."""
        parts = self.agent_rusage
        if not parts or not self.metrics:
            return
        n = max(self.metrics["parcels"], 1)
        self.metrics["rss_mb"] = round(max(ru.ru_maxrss for ru in parts) / 1024, 1)
        cpu_s = sum(ru.ru_utime + ru.ru_stime for ru in parts)
        self.metrics["cpu_ms_per_parcel"] = round(cpu_s * 1000 / n, 2)
        if self.idle_cpu_pct is not None:
            self.metrics["idle_cpu_pct"] = self.idle_cpu_pct
            (c0, w0), (c1, w1) = self._cpu_at_start, self._cpu_at_end
            if c0 is not None and c1 is not None and self.agent_starts == 1:
                busy = (c1 - c0) - self.idle_cpu_pct / 100 * (w1 - w0)  # the run's CPU less idling
                self.metrics["cpu_ms_per_parcel_marginal"] = round(busy * 1000 / n, 2)

    def partial_figures(self) -> dict[str, Any] | None:
        """Figures for the parcels fed so far (a run that was interrupted); None before central ran."""
        if self.central is None:
            return None
        m = self._compute()
        self.add_process_figures()
        return m

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _scan_png(seed: int, label: str) -> bytes:
    import cv2

    from hw_sim.xray import render

    ok, buf = cv2.imencode(".png", cv2.cvtColor(render(seed, label), cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def _quantiles(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 0.50), "p99": percentile(values, 0.99), "max": percentile(values, 1.0)}


def _rng(index: int) -> random.Random:
    return random.Random(index * 7919)


async def run_line(
    spec: RunSpec,
    broker: Mosquitto | None = None,
    on_progress: Callable[[LineRun], None] | None = None,
    keep: bool = False,
) -> tuple[LineRun, dict[str, Any]]:
    run = LineRun(spec, broker, on_progress)
    try:
        await run.run()
        run.add_process_figures()
        return run, run.metrics
    finally:
        if not keep:
            run.cleanup()


def forged_batches(plan: Plan, key_id: str = "central-1") -> list[list[dict[str, Any]]]:
    """Six batches of 3,276 forged items, signed before the run (signing them takes the
    simulator's own CPU, which would otherwise slow its central during the flood, not the agent)."""
    attacker, _ = generate_keypair()
    targets = [p.waybill for p in plan.parcels if p.verdict == "inspect" and p.waybill]
    now = datetime.now(UTC)
    rng = random.Random(plan.seed + 7)
    batches = []
    for b in range(6):
        items = []
        for i in range(3276):
            waybill = targets[(b * 3276 + i) % len(targets)] if targets and i % 4 == 0 else waybills.any_valid(rng)
            item = {"waybill": waybill, "verdict": "release", "verdict_id": f"forged-{b}-{i}-{rng.random():.6f}",
                    "issued_at": now.isoformat(), "expires_at": (now + timedelta(days=1)).isoformat()}
            items.append(sign_item(item, attacker, key_id))
        batches.append(items)
    return batches


def verdict_flood(run: LineRun) -> None:
    """Six batches of 3,276 forged verdict items each (about 950 KB in all): signed by a key that is
    not central's but named as central's, some for real waybills of parcels central said inspect."""
    assert run.central is not None
    key_id = run.spec.signing[1] if run.spec.signing else "central-1"
    for items in run.spec.forged or forged_batches(run.plan, key_id):
        run.central.push_items(items)
