"""The technician's commands over SSH: ``sortgate status``, ``maintenance``, ``gate fire``,
``reader watch`` / ``reader reset``. Each one is a request on the agent's control socket
(agent.service.control); ``status`` also says plainly when nothing answers, and then shows what the
state folder tells without the agent (mode, records waiting)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from agent.config import Config, ConfigError, load_config
from agent.service.control import encode_line, request, socket_path

__all__ = ["add_commands"]

DEFAULT_CONFIG = Path("/etc/sortgate/sortgate.toml")
#: ``sortgate status`` exit codes, as ``systemctl status``: 0 running, 3 not running
NOT_RUNNING = 3


def _user() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def _where(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The control socket, and the state folder where the config is readable."""
    if args.socket is not None:
        return args.socket, None
    cfg = load_config(args.config)
    return socket_path(cfg.storage.state_dir, cfg.control.socket), Path(cfg.storage.state_dir)


def _ask(args: argparse.Namespace, req: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The agent's reply, or None and why nothing answered."""
    try:
        path, _ = _where(args)
    except ConfigError as exc:
        return None, f"config {exc.path} is invalid: " + "; ".join(exc.problems)
    except OSError as exc:
        return None, f"cannot read the config: {exc}"
    try:
        return request(path, req), str(path)
    except FileNotFoundError:
        return None, f"no control socket at {path}"
    except ConnectionRefusedError:
        return None, f"nothing answers on {path}"
    except PermissionError:
        return None, f"no permission to use {path} (run as the agent's user or with sudo)"
    except (OSError, ValueError) as exc:
        return None, f"{path}: {exc}"


def load_or_refuse(path: Path, prog: str) -> Config | None:
    """The config, or None after printing every problem (the caller exits 2)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{prog}: refusing to start, the config is invalid:", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return None


def _call(args: argparse.Namespace, what: str, req: dict[str, Any]) -> dict[str, Any] | int:
    """The agent's reply to a command, or the exit code after saying why there is none."""
    reply, why = _ask(args, req)
    if reply is None or not reply.get("ok"):
        return _fail(what, reply, why)
    return reply


def _fail(what: str, reply: dict[str, Any] | None, why: str) -> int:
    if reply is None:
        print(f"sortgate {what}: the agent is not running or cannot be reached: {why}", file=sys.stderr)
        return NOT_RUNNING
    print(f"sortgate {what}: refused: {reply.get('error')}", file=sys.stderr)
    return 1


# --- status ------------------------------------------------------------------------------
def _offline(args: argparse.Namespace) -> dict[str, Any]:
    """What the state folder says without the agent."""
    out: dict[str, Any] = {}
    try:
        _, state = _where(args)
    except (ConfigError, OSError):
        return out
    if state is None:
        return out
    try:
        out["mode"] = json.loads((state / "mode.json").read_text()).get("mode", "?")
    except FileNotFoundError:
        out["mode"] = "normal"
    except (OSError, ValueError) as exc:
        out["mode"] = f"unreadable ({exc}); the agent would start in inspect_all"
    db = state / "outbox.sqlite"
    if db.exists():
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
            try:
                out["outbox_pending"] = con.execute("SELECT count(*) FROM outbox").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error as exc:
            out["outbox_pending"] = f"unreadable ({exc})"
    return out


def _ago(t: float | None) -> str:
    if t is None:
        return "?"
    s = max(0.0, time.time() - t)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def render(st: dict[str, Any]) -> str:
    """``status`` for a person: one screen, the trouble first."""
    a, line, ctl, mq, ob = st["agent"], st["line"], st["controller"], st["mqtt"], st["outbox"]
    up = _ago(time.time() - a["up_s"])
    out = [f"sortgate {a['version']}  site {a['site']} line {a['line']}  pid {a['pid']}  up {up}"]
    mode = a["mode"] + (f" (set by {a['mode_set_by']})" if a["mode"] != "normal" else "")
    health = ("healthy" if line["healthy"]
              else "UNHEALTHY: " + ", ".join(line["problems"]) + " (every parcel → inspection)")
    out.append(f"mode        {mode}")
    if "plan" in a:
        p = a["plan"]
        out.append(f"sort plan   {p['name']} version {p['version']} (from {p['source']})")
    out.append(f"line        {health}")
    if ctl["connected"]:
        s = ctl.get("status", {})
        out.append(f"controller  connected {ctl['link']}  contract {ctl.get('contract')} firmware {ctl.get('firmware')}"
                   f"  fc23 {'yes' if ctl.get('fc23') else 'no'}")
        out.append(f"            bits {' '.join(s.get('bits', [])) or '-'}  belt {s.get('belt_mps')} m/s"
                   f"  polled {s.get('polled_ms_ago')} ms ago  lanes full {s.get('lane_full') or '-'}"
                   f"  watchdog trips {s.get('watchdog_trips')}  defaulted {s.get('defaulted')}")
    else:
        out.append(f"controller  OFFLINE {ctl['link']} for {_ago(ctl.get('down_since'))}: {ctl.get('error')}")
    for r in st["readers"]:
        state = "open" if r["open"] else f"OFFLINE ({r['state']})"
        rate = (f"read {r['read_pct']}%  no-read {r['no_read_pct']}%  multi {r['multi_read_pct']}%"
                if r["frames"] else "no frames yet")
        out.append(f"reader      {r['name']} {r['device']} {state}  frames {r['frames']} since {_ago(r['since'])}: "
                   f"{rate}  framing errors {r['framing_errors']}")
    if mq["connected"]:
        out.append(f"mqtt        connected {mq['broker']}")
    else:
        out.append(f"mqtt        OFFLINE {mq['broker']} for {_ago(mq['since'])}: {mq['detail']}")
    out.append(f"outbox      {ob['pending']} records waiting ({ob['fill_pct']}% of its budget)"
               + ("" if mq["connected"] else " — kept until the broker is back"))
    active = st["alarms"]["active"]
    out.append("alarms      " + ("none active" if not active else f"{len(active)} active:"))
    for al in active:
        subject = f" [{al['subject']}]" if al.get("subject") else ""
        out.append(f"              {al['alarm']}{subject}: {al['detail']}")
    recent = st["parcels"]["recent"]
    out.append(f"parcels     {st['parcels']['in_flight']} in flight; last {len(recent)}:")
    for p in reversed(recent):
        reasons = ",".join(p["reasons"]) or "-"
        out.append(f"              seq {p['seq']:<6} {p['waybill'] or '(no code)':<15} {p['lane_class'] or '-':<10} "
                   f"lane {p['lane_reached'] or '-'}  {p['disposition']}  reasons {reasons}")
    return "\n".join(out)


def _cmd_status(args: argparse.Namespace) -> int:
    reply, why = _ask(args, {"op": "status", "parcels": args.parcels})
    if reply is None or not reply.get("ok"):
        offline = _offline(args)
        if args.json:
            print(json.dumps({"running": False, "why": why if reply is None else reply.get("error"), **offline}))
        else:
            print(f"agent       NOT RUNNING: {why}" if reply is None else f"agent       error: {reply.get('error')}")
            print("            (systemctl status sortgate; journalctl -u sortgate -e)")
            if "mode" in offline:
                print(f"mode        {offline['mode']} (from mode.json)")
            if "outbox_pending" in offline:
                print(f"outbox      {offline['outbox_pending']} records waiting (from outbox.sqlite)")
        return NOT_RUNNING
    del reply["ok"]
    print(json.dumps({"running": True, **reply}) if args.json else render(reply))
    return 0


# --- technician commands ---------------------------------------------------------------
def _cmd_maintenance(args: argparse.Namespace) -> int:
    mode = "maintenance" if args.state == "on" else "normal"
    reply = _call(args, "maintenance", {"op": "set_mode", "mode": mode, "user": _user()})
    if isinstance(reply, int):
        return reply
    print(f"mode {reply['mode']}" + ("" if reply["changed"] else " (already)"))
    return 0


def _cmd_gate_fire(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            print("sortgate gate fire: confirm with --yes (no terminal to ask on)", file=sys.stderr)
            return 2
        answer = input(f"Fire gate {args.gate} once? Nothing may stand at the diverter. Type 'fire' to confirm: ")
        if answer.strip() != "fire":
            print("not fired")
            return 1
    reply = _call(args, "gate fire", {"op": "fire_gate", "gate": args.gate, "user": _user()})
    if isinstance(reply, int):
        return reply
    print(f"gate {reply['gate']} (lane {reply['lane']}) fired; the controller cleared it in {reply['cleared_ms']} ms")
    return 0


def _cmd_reader_reset(args: argparse.Namespace) -> int:
    reply = _call(args, "reader reset", {"op": "reader_reset", "reader": args.reader, "user": _user()})
    if isinstance(reply, int):
        return reply
    print(f"counters reset: {reply['reset']}")
    return 0


def _cmd_reader_watch(args: argparse.Namespace) -> int:
    try:
        path, _ = _where(args)
    except (ConfigError, OSError) as exc:
        print(f"sortgate reader watch: {exc}", file=sys.stderr)
        return 2
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            s.sendall(encode_line({"op": "reader_watch", "reader": args.reader}))
            f = s.makefile("rb")
            first = json.loads(f.readline() or b"{}")
            if not first.get("ok"):
                return _fail("reader watch", first or {"error": "no answer"}, str(path))
            print(f"watching reader {first['watching']} on {first['device']} (Ctrl-C to stop)", file=sys.stderr)
            shown = 0
            for raw in f:
                ev = json.loads(raw)
                if args.json:
                    print(json.dumps(ev), flush=True)
                else:
                    stamp = time.strftime("%H:%M:%S", time.localtime(ev["at"])) + f".{int(ev['at'] % 1 * 1000):03d}"
                    what = ev.get("codes") if ev["kind"] != "framing_error" else f"{ev['error']}: {ev['detail']}"
                    print(f"{stamp} {ev['kind']:<13} {what}  raw {ev['raw']!r}", flush=True)
                shown += 1
                if args.count and shown >= args.count:
                    break
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"sortgate reader watch: the agent is not running or cannot be reached: {path}: {exc}", file=sys.stderr)
        return NOT_RUNNING
    return 0


def _cmd_console_run(args: argparse.Namespace) -> int:
    from agent.console.app import serve
    from agent.console.users import UsersError
    from agent.service import logs

    cfg = load_or_refuse(args.config, "sortgate console")
    if cfg is None:
        return 2
    logs.configure(cfg.logging.level, cfg.logging.format)
    c = cfg.console
    scheme = "https" if c.tls_cert else "http"
    print(f"sortgate console on {scheme}://{c.host}:{c.port}/", file=sys.stderr, flush=True)
    try:
        return serve(cfg, args.config)
    except (UsersError, OSError) as exc:
        print(f"sortgate console: {exc}", file=sys.stderr)
        return 2


def _cmd_console_adduser(args: argparse.Namespace) -> int:
    from agent.console.users import UsersError, add_user

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            print("sortgate console adduser: the passwords differ", file=sys.stderr)
            return 2
    try:
        add_user(args.users, args.name, args.role, password)
    except (UsersError, OSError) as exc:
        print(f"sortgate console adduser: {exc}", file=sys.stderr)
        return 2
    print(f"{args.users}: {args.name} ({args.role})")
    return 0


def add_commands(sub: Any) -> None:
    def where(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                       help=f"the agent's config (default {DEFAULT_CONFIG})")
        p.add_argument("--socket", type=Path, help="the control socket (default: from the config)")

    p = sub.add_parser("status", help="what the running agent sees: controller, readers, broker, outbox, alarms, "
                       "last parcels (exit 3 when no agent answers)")
    where(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--parcels", type=int, default=10, help="how many recent parcels to show (default 10, at most 20)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("maintenance", help="maintenance mode on (every parcel to inspection, gates by hand) or off")
    where(p)
    p.add_argument("state", choices=("on", "off"))
    p.set_defaults(func=_cmd_maintenance)

    gate = sub.add_parser("gate", help="gate test (maintenance only)").add_subparsers(
        dest="gate_command", required=True)
    p = gate.add_parser("fire", help="fire one gate once (asks for confirmation)")
    where(p)
    p.add_argument("gate", type=int)
    p.add_argument("--yes", action="store_true", help="do not ask (scripts)")
    p.set_defaults(func=_cmd_gate_fire)

    reader = sub.add_parser("reader", help="a reader's live frames, or reset its counters").add_subparsers(
        dest="reader_command", required=True)
    p = reader.add_parser("watch", help="print the reader's frames as they arrive (Ctrl-C to stop)")
    where(p)
    p.add_argument("reader")
    p.add_argument("--json", action="store_true")
    p.add_argument("--count", type=int, default=0, help="stop after this many frames (0: never)")
    p.set_defaults(func=_cmd_reader_watch)
    p = reader.add_parser("reset", help="reset the read-rate counters (of one reader, or all)")
    where(p)
    p.add_argument("reader", nargs="?")
    p.set_defaults(func=_cmd_reader_reset)

    console = sub.add_parser("console", help="the local web console").add_subparsers(
        dest="console_command", required=True)
    p = console.add_parser("run", help="serve the console ([console] host and port of the config)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.set_defaults(func=_cmd_console_run)
    p = console.add_parser("adduser", help="add or replace a console user (viewer, officer or technician)")
    p.add_argument("--users", type=Path, required=True, help="the users file ([console] users_file)")
    p.add_argument("name")
    p.add_argument("role", choices=("viewer", "officer", "technician"))
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(func=_cmd_console_adduser)
