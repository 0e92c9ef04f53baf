"""Typed, validated configuration for one sortgate agent (one sorting line).

The config is one TOML file written by a technician. It is strict on purpose (after Klipper and
Frigate): unknown keys are errors so typos surface, every number is bounded, cross-field rules are
checked, and every error names the file, the dotted key and the bad value. ``sortgate
check-config FILE`` prints all problems at once; ``sortgate run`` refuses to start on any.

The fully commented example is ``config/sortgate.example.toml``.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.pipeline import sortplan
from agent.pipeline.sortplan import SortPlan
from agent.pipeline.waybill import FORMATS
from agent.vision.config import VisionConfig
from firmware_bridge.reader_codec import CounterFormat
from firmware_bridge.serial_line import SerialLine

__all__ = ["Config", "ConfigError", "load_config", "parse_config"]


class ConfigError(Exception):
    """The config file cannot be used. ``problems`` holds one line per problem."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


Ms = Annotated[int, Field(ge=1, le=600_000)]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
Parity = Literal["N", "E", "O"]


class LineConfig(_Strict):
    site: Name = Field(description="Site code, part of every MQTT topic")
    line: Name = Field(description="Line name at the site, part of every MQTT topic")
    max_parcel_mm: int = Field(
        800, ge=50, le=5000,
        description="Longest parcel on this line; bounds a reader's window when the controller reports no length",
    )


class ControllerConfig(_Strict):
    transport: Literal["tcp", "rtu"] = "tcp"
    host: str | None = Field(None, description="Modbus TCP host (transport = tcp)")
    port: int = Field(502, ge=1, le=65535)
    device: str | None = Field(None, description="Serial device (transport = rtu)")
    baudrate: Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 19200
    bytesize: Literal[7, 8] = 8
    parity: Parity = "E"
    stopbits: Literal[1, 2] = 1
    unit_id: int = Field(1, ge=1, le=247)
    timeout_ms: Ms = Field(250, le=5000)
    poll_interval_ms: Ms = Field(
        5, le=1000,
        description="Shortest gap between two status polls (a frame or an image asks for a poll at once)",
    )
    idle_poll_ms: Ms = Field(
        20, le=1000,
        description="Status poll period when no input asks for a poll: a trigger is seen at most this late",
    )
    heartbeat_interval_ms: Ms = Field(100, le=10_000)
    inter_frame_gap_ms: int = Field(0, ge=0, le=100)
    trigger_publish_ms: int = Field(
        10, ge=0, le=200,
        description="Longest time from the photo-eye edge until the controller shows the entry in its trigger ring",
    )
    reconnect_max_s: float = Field(5.0, gt=0, le=300)

    @property
    def serial_line(self) -> SerialLine:
        return SerialLine(self.baudrate, self.bytesize, self.parity, self.stopbits)

    @model_validator(mode="after")
    def _transport_fields(self) -> ControllerConfig:
        if self.transport == "tcp" and not self.host:
            raise ValueError("host is required when transport = 'tcp'")
        if self.transport == "rtu" and not self.device:
            raise ValueError("device is required when transport = 'rtu'")
        if self.idle_poll_ms < self.poll_interval_ms:
            raise ValueError("idle_poll_ms must be at least poll_interval_ms")
        return self


_FRAMINGS = {"crlf": ("", "\r\n"), "cr": ("", "\r"), "lf": ("", "\n"), "stx_etx": ("\x02", "\x03")}


class ReaderCounterConfig(_Strict):
    """The reader's own trigger counter in each frame (strongly recommended: docs/serial-readers.md)."""

    position: Literal["prefix", "suffix"] = "prefix"
    separator: str = Field(":", max_length=4, description="between counter and data; empty: fixed width")
    width: int = Field(0, ge=0, le=10, description="digits (0: any number of digits up to the separator)")
    modulus: int = Field(65536, ge=16, le=10**10, description="the counter wraps to 0 here (10000 for 4 digits)")

    @model_validator(mode="after")
    def _shape(self) -> ReaderCounterConfig:
        if not self.separator and not self.width:
            raise ValueError("a counter needs a separator or a fixed width")
        if self.separator.isdigit():
            raise ValueError("the counter separator must not be digits")
        if self.width and self.modulus > 10**self.width:
            raise ValueError(f"modulus {self.modulus} does not fit in {self.width} digits")
        return self


class ReaderConfig(_Strict):
    name: Name
    device: str = Field(min_length=1)
    baudrate: Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 9600
    bytesize: Literal[7, 8] = 8
    parity: Parity = "N"
    stopbits: Literal[1, 2] = 1
    framing: Literal["crlf", "cr", "lf", "stx_etx", "custom"] = "crlf"
    prefix: str = Field("", max_length=8, description="framing = custom only")
    suffix: str = Field("", max_length=8, description="framing = custom only")
    noread: str = Field("NoRead", min_length=1, max_length=32)
    multi_read_delimiter: str = Field(";", min_length=1, max_length=4)
    max_frame_bytes: int = Field(256, ge=16, le=4096)
    window_ms: tuple[Annotated[int, Field(ge=0, le=5000)], Annotated[int, Field(ge=1, le=5000)]] = Field(
        (0, 40), description="[earliest, latest] ms after window_from at which this reader's frame arrives",
    )
    window_from: Literal["trailing_edge", "leading_edge"] = Field(
        "trailing_edge", description="the parcel edge leaving the photo-eye that the window is measured from",
    )
    counter: ReaderCounterConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "read_window_ms" in data:
            raise ValueError(
                "read_window_ms was replaced by window_ms = [earliest, latest] and window_from "
                "(docs/serial-readers.md)"
            )
        return data

    @model_validator(mode="after")
    def _framing(self) -> ReaderConfig:
        if self.framing == "custom":
            if not self.suffix:
                raise ValueError("framing = 'custom' needs a suffix")
        elif self.prefix or self.suffix:
            raise ValueError(f"prefix/suffix are only used with framing = 'custom', not '{self.framing}'")
        if self.multi_read_delimiter in self.noread:
            raise ValueError("multi_read_delimiter must not occur inside the noread string")
        if self.window_ms[0] >= self.window_ms[1]:
            raise ValueError(f"window_ms: earliest must be below latest, got {list(self.window_ms)}")
        return self

    @property
    def serial_line(self) -> SerialLine:
        return SerialLine(self.baudrate, self.bytesize, self.parity, self.stopbits)

    @property
    def counter_format(self) -> CounterFormat | None:
        c = self.counter
        return CounterFormat(c.position, c.separator, c.width, c.modulus) if c else None

    @property
    def frame_bytes(self) -> tuple[bytes, bytes]:
        prefix, suffix = _FRAMINGS.get(self.framing, (self.prefix, self.suffix))
        return prefix.encode("latin-1"), suffix.encode("latin-1")


class LaneConfig(_Strict):
    number: int = Field(ge=1, le=16, description="Lane number in the controller contract")
    name: Name
    role: Literal["release", "inspection", "consolidation", "hold", "recirculation"] = Field(
        description="The lane's class (agent/pipeline/sortplan.py)"
    )
    gate: int | None = Field(None, ge=1, le=16, description="Gate that diverts into this lane")
    hold_reasons: list[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]] | None = (
        Field(None, max_length=32, description="hold lanes: the hold reasons this lane takes (default: any)")
    )


class DecisionConfig(_Strict):
    safety_margin_ms: Ms = Field(
        60, le=2000, description="A lane command must be on the wire this long before the decision point"
    )


class WaybillConfig(_Strict):
    accept: list[str] = Field(default_factory=lambda: list(FORMATS), min_length=1)

    @model_validator(mode="after")
    def _known(self) -> WaybillConfig:
        unknown = [f for f in self.accept if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown waybill format(s) {unknown}; known: {sorted(FORMATS)}")
        return self


class StorageConfig(_Strict):
    state_dir: Path = Field(Path("/var/lib/sortgate"), description="Verdict store and outbox live here")


class VerdictConfig(_Strict):
    default_ttl_s: int = Field(86_400, ge=60, le=30 * 86_400)
    require_signatures: bool = Field(
        False, description="Act only on verdicts signed (Ed25519) by a key in trusted_keys_file"
    )
    trusted_keys_file: str | None = Field(
        None, description="Lines of '<key_id> <base64 public key>'; relative: $CREDENTIALS_DIRECTORY"
    )
    max_clock_skew_s: int = Field(120, ge=0, le=3600)
    lookup: bool = Field(True, description="Ask central over MQTT for a waybill not in the store")
    lookup_timeout_ms: int = Field(
        300, ge=10, le=5000, description="Upper bound; the parcel's deadline may cut it shorter"
    )
    max_lifetime_s: int | None = Field(
        None, ge=60, le=365 * 86_400,
        description="Refuse verdicts valid for longer than this (expires_at - issued_at); unset: no maximum",
    )
    require_scope: bool = Field(
        False, description="Act only on verdicts that name this site and line (site, line in the item)"
    )

    @model_validator(mode="after")
    def _keys(self) -> VerdictConfig:
        if self.require_signatures and not self.trusted_keys_file:
            raise ValueError("require_signatures = true needs trusted_keys_file")
        return self


class OutboxConfig(_Strict):
    max_records: int = Field(500_000, ge=100, le=50_000_000)
    max_mb: int = Field(512, ge=1, le=65_536)
    alarm_at: float = Field(0.8, gt=0, lt=1, description="Raise outbox_filling at this fraction of the budget")


class TlsConfig(_Strict):
    ca_file: str = Field(min_length=1, description="CA that signed the broker's certificate")
    cert_file: str | None = Field(None, description="Client certificate (mutual TLS)")
    key_file: str | None = Field(None, description="Client key; relative: $CREDENTIALS_DIRECTORY")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MqttConfig(_Strict):
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    client_id: str | None = Field(None, max_length=128)
    topic_prefix: str = Field("sortgate", pattern=r"^[A-Za-z0-9_/-]+$", max_length=64)
    keepalive_s: int = Field(30, ge=5, le=600)
    reconnect_max_s: float = Field(10.0, gt=0, le=300)
    username: str | None = Field(None, min_length=1, max_length=128)
    password_file: str | None = Field(
        None, description="File holding the password; relative: $CREDENTIALS_DIRECTORY (systemd LoadCredential=)"
    )
    tls: TlsConfig | None = None
    max_inbound_per_s: int = Field(200, ge=1, le=100_000, description="Inbound messages beyond this are dropped")
    max_verdict_items_per_s: int = Field(
        2000, ge=10, le=1_000_000,
        description="Pushed verdict items checked per second at most; the excess is dropped (look-up answers never)",
    )
    command_max_age_s: int = Field(
        300, ge=10, le=86_400, description="A signed command issued longer ago than this is refused"
    )

    @model_validator(mode="after")
    def _auth(self) -> MqttConfig:
        if self.password_file and not self.username:
            raise ValueError("password_file needs a username")
        return self


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class HealthConfig(_Strict):
    stats_interval_s: float = Field(10.0, ge=1, le=3600)
    result_timeout_s: float = Field(10.0, ge=1, le=600, description="Wait this long for a parcel's result")


class ControlConfig(_Strict):
    socket: Path | None = Field(
        None,
        description="Unix socket for sortgate status and the technician commands; default {state_dir}/control.sock",
    )

    @model_validator(mode="after")
    def _short(self) -> ControlConfig:
        if self.socket is not None and len(str(self.socket).encode()) > 107:
            raise ValueError(f"socket {self.socket} is longer than 107 bytes (a Unix socket path cannot be)")
        return self


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConsoleConfig(_Strict):
    host: str = Field("127.0.0.1", description="Where the local web console listens (sortgate console)")
    port: int = Field(8470, ge=1, le=65535)
    users_file: Path | None = Field(
        None, description="Console users: lines of 'name:role:scrypt-hash' (sortgate console adduser)"
    )
    tls_cert: Path | None = None
    tls_key: Path | None = None
    journal_days: float = Field(7.0, gt=0, le=90, description="Parcel records kept locally for the console")
    journal_max_records: int = Field(
        200_000, ge=1000, le=5_000_000,
        description="At most this many kept (about 1.2 KB each: 200000 is about 250 MB on disk)",
    )

    @model_validator(mode="after")
    def _exposed(self) -> ConsoleConfig:
        if not _loopback(self.host) and self.users_file is None:
            raise ValueError(
                f"host {self.host} is not a loopback address: a console on the network needs users_file (logins)"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self


class Config(_Strict):
    line: LineConfig
    controller: ControllerConfig
    readers: list[ReaderConfig] = Field(min_length=1, max_length=8)
    lanes: list[LaneConfig] = Field(min_length=2, max_length=16)
    decision: DecisionConfig = DecisionConfig()
    waybill: WaybillConfig = WaybillConfig()
    storage: StorageConfig = StorageConfig()
    verdicts: VerdictConfig = VerdictConfig()
    outbox: OutboxConfig = OutboxConfig()
    mqtt: MqttConfig = MqttConfig()
    logging: LoggingConfig = LoggingConfig()
    health: HealthConfig = HealthConfig()
    vision: VisionConfig = VisionConfig()
    control: ControlConfig = ControlConfig()
    console: ConsoleConfig = ConsoleConfig()
    plan: SortPlan | None = Field(None, description="The sort plan (default: every release to the release lanes)")

    @model_validator(mode="after")
    def _cross(self) -> Config:
        names = [r.name for r in self.readers]
        if len(set(names)) != len(names):
            raise ValueError(f"readers: names must be unique, got {names}")
        devices = [r.device for r in self.readers]
        if len(set(devices)) != len(devices):
            raise ValueError(f"readers: devices must be unique, got {devices}")
        _check_lanes(self.lanes)
        if self.plan is not None:
            problems = sortplan.check(self.plan, self.lanes)
            if problems:
                raise ValueError("plan: " + "; ".join(problems))
        elif not any(lane.role == "release" for lane in self.lanes):
            raise ValueError("lanes: a line without [plan] needs a lane with role = 'release'")
        return self

    @property
    def default_lane(self) -> int:
        return next(lane.number for lane in self.lanes if lane.role == "inspection" and lane.gate is None)

    def sort_plan(self) -> sortplan.ActivePlan:
        """The configured plan checked against the lanes, or the default plan."""
        return sortplan.ActivePlan.build(self.plan or sortplan.default_plan(self.lanes), self.lanes)

    @property
    def topic_root(self) -> str:
        return f"{self.mqtt.topic_prefix}/{self.line.site}/{self.line.line}"


def _check_lanes(lanes: list[LaneConfig]) -> None:
    """The rules every line's lanes follow, with or without a sort plan."""
    numbers = [lane.number for lane in lanes]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"lanes: numbers must be unique, got {numbers}")
    inspection = [lane for lane in lanes if lane.role == "inspection" and lane.gate is None]
    if len(inspection) != 1:
        raise ValueError(
            "lanes: exactly one inspection lane must have no gate (the path a parcel takes "
            "when no gate fires)"
        )
    if not any(lane.role in ("release", "consolidation") for lane in lanes):
        raise ValueError("lanes: no lane has role = 'release' or 'consolidation'")
    for lane in lanes:
        if lane.role != "inspection" and lane.gate is None:
            raise ValueError(
                f"lanes: {lane.role} lane {lane.number} has no gate; only the default inspection lane "
                "is reached without a gate firing"
            )
        if lane.hold_reasons is not None and lane.role != "hold":
            raise ValueError(f"lanes: lane {lane.number}: hold_reasons belong to hold lanes")
    if sum(lane.role == "recirculation" for lane in lanes) > 1:
        raise ValueError("lanes: at most one lane has role = 'recirculation' (the loop)")
    gates = [lane.gate for lane in lanes if lane.gate is not None]
    if len(set(gates)) != len(gates):
        raise ValueError(f"lanes: each gate may divert into one lane only, got {gates}")


def _key(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _dig(data: Any, loc: tuple[Any, ...]) -> tuple[bool, Any]:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, data


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a decoded TOML document. Raises ConfigError naming source, key and value."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            found, value = _dig(data, loc)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (typo?)"
            got = f" (got {value!r})" if found and not isinstance(value, dict | list) else ""
            where = f"{_key(loc)}: " if loc else ""
            problems.append(f"{source}: {where}{msg}{got}")
        raise ConfigError(source, problems) from exc


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file. Raises ConfigError (never anything else)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"{path}: not UTF-8 text: {exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"{path}: TOML syntax error: {exc}"]) from exc
    return parse_config(data, str(path))
