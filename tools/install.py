#!/usr/bin/env python3
"""Install, upgrade, roll back and remove sortgate on a line box (Raspberry Pi OS / Debian).

Run as root with the system Python (3.11+; standard library only), from a release bundle made by
``tools/bundle.sh`` (the wheel, ``constraints.txt``, this file, the example config, the systemd
unit and the udev rules side by side) or from a repository checkout with ``--wheel``:

    sudo ./install.py install [--wheel sortgate-X.whl] [--find-links DIR --no-index]
    sudo /opt/sortgate/install.py rollback     # back to the previous version, its config and state
    sudo /opt/sortgate/install.py status
    sudo /opt/sortgate/install.py uninstall [--purge]   # the installer keeps a copy of itself there

What ``install`` does, in this order, stopping with nothing changed at the first failure before
the switch:

1. a virtual environment ``/opt/sortgate/<version>`` with the wheel, its dependencies pinned by
   ``constraints.txt``;
2. the system user ``sortgate`` (group ``dialout`` for the readers), ``/etc/sortgate`` (root:sortgate
   0750) and ``/var/lib/sortgate`` (sortgate:sortgate 0750);
3. the config: a new box gets the example; an existing one is copied to
   ``/etc/sortgate/backups/`` and then migrated by the new version (``sortgate migrate-config``);
   the new version must accept it (``sortgate check-config``), or the copy is put back;
4. the state: each SQLite store is copied with SQLite's backup API to
   ``/var/lib/sortgate/backups/<old version>/``, with its schema version;
5. the switch: ``/opt/sortgate/current`` points at the new version (an atomic rename), the unit
   and the udev rules are installed (udev rules only where none are, since a technician fills in
   the readers' serial numbers), the service restarts;
6. the health check: the service must become active (READY=1; ``Type=notify``) and stay so, without
   a restart, for ``--settle-s``. If it does not, the installer rolls back by itself: ``current``
   points at the previous version again, the config copy comes back, and the state comes back from
   the copy only where the new version changed a store's schema (the newer stores are kept aside in
   ``backups/rolled-back-*``); otherwise the stores stay as they are, records written meanwhile
   included. Only the current and the previous version are kept.

``--no-system`` leaves out what needs a running systemd and root (the user, ownership,
``systemctl``, ``udevadm``): for a root being prepared offline (a chroot) and for tests;
``--health CMD`` replaces the systemd health check by a command (exit 0 = healthy).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
USER = "sortgate"
UNIT = "sortgate.service"
CONSOLE_UNIT = "sortgate-console.service"  # installed, enabled by the site if it wants the console
UDEV = "99-sortgate.rules"
CONFIG = "sortgate.toml"
STORES = ("outbox.sqlite", "verdicts.sqlite")


class InstallError(Exception):
    pass


@dataclass
class Layout:
    prefix: Path
    etc: Path
    state: Path
    unit_dir: Path
    udev_dir: Path

    @property
    def current(self) -> Path:
        return self.prefix / "current"

    @property
    def record(self) -> Path:
        return self.prefix / "install.json"

    @property
    def config(self) -> Path:
        return self.etc / CONFIG


def say(msg: str) -> None:
    print(f"install: {msg}", flush=True)


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, text=True, capture_output=True)
    if check and r.returncode != 0:
        out = (r.stderr or r.stdout).strip()
        raise InstallError(f"{shlex.join(cmd)} failed ({r.returncode}): {out[-2000:]}")
    return r


def now_tag() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


# --- the record of what is installed ---------------------------------------------------------
def load_record(lay: Layout) -> dict[str, object]:
    try:
        data = json.loads(lay.record.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_record(lay: Layout, data: dict[str, object]) -> None:
    tmp = lay.record.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(lay.record)


def current_version(lay: Layout) -> str | None:
    try:
        return os.readlink(lay.current)
    except OSError:
        return None


def point_current(lay: Layout, version: str) -> None:
    """``current`` -> ``version``, atomically (a rename over the old link)."""
    tmp = lay.prefix / ".current.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version)  # relative: the prefix can move
    tmp.replace(lay.current)


# --- steps -----------------------------------------------------------------------------------
def find_bundled(name: str, *repo_paths: str) -> Path:
    for p in (HERE / name, *(HERE.parent / r for r in repo_paths)):
        if p.exists():
            return p
    raise InstallError(f"{name} not found beside the installer ({HERE}) or in the repository")


def wheel_version(wheel: Path) -> str:
    m = re.match(r"sortgate-([^-]+)-", wheel.name)
    if not m:
        raise InstallError(f"{wheel}: not a sortgate wheel (sortgate-<version>-...whl)")
    return m.group(1)


def build_venv(target: Path, wheel: Path, args: argparse.Namespace) -> None:
    if target.exists():
        shutil.rmtree(target)
    say(f"creating {target}")
    run([sys.executable, "-m", "venv", str(target)])
    pip = [str(target / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    constraints = args.constraints or (HERE / "constraints.txt" if (HERE / "constraints.txt").exists() else None)
    if constraints is not None:
        pip += ["--constraint", str(constraints)]
    for d in args.find_links or []:
        pip += ["--find-links", str(d)]
    if args.no_index:
        pip.append("--no-index")
    try:
        run([*pip, str(wheel)])
        got = run([str(target / "bin" / "python"), "-I", "-c",
                   "import importlib.metadata as m; print(m.version('sortgate'))"]).stdout.strip()
        if got != target.name:
            raise InstallError(f"{wheel} installed as version {got}, not {target.name}")
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def ensure_user_and_dirs(lay: Layout, system: bool) -> None:
    if system:
        if run(["getent", "passwd", USER], check=False).returncode != 0:
            say(f"creating system user {USER}")
            run(["useradd", "--system", "--user-group", "--home-dir", str(lay.state),
                 "--shell", "/usr/sbin/nologin", USER])
        if run(["getent", "group", "dialout"], check=False).returncode == 0:
            run(["usermod", "--append", "--groups", "dialout", USER])
    lay.prefix.mkdir(parents=True, exist_ok=True)
    for d, mode in ((lay.etc, 0o750), (lay.etc / "backups", 0o750), (lay.state, 0o750)):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(mode)
    if system:
        shutil.chown(lay.etc, "root", USER)
        shutil.chown(lay.etc / "backups", "root", USER)
        shutil.chown(lay.state, USER, USER)


def prepare_config(lay: Layout, sortgate: Path, old: str | None, system: bool) -> Path | None:
    """The config for the new version; returns the copy of the old one (None: a new box)."""
    cfg = lay.config
    if not cfg.exists():
        example = find_bundled("sortgate.example.toml", "config/sortgate.example.toml")
        shutil.copyfile(example, cfg)
        cfg.chmod(0o640)
        if system:
            shutil.chown(cfg, "root", USER)
        say(f"{cfg}: the example config; fill in site, line, controller, readers and broker")
        return None
    copy = lay.etc / "backups" / f"{CONFIG}.{old or 'unknown'}.{now_tag()}"
    shutil.copy2(cfg, copy)
    r = run([str(sortgate), "migrate-config", "--write", str(cfg)], check=False)
    if r.returncode != 0:
        shutil.copy2(copy, cfg)
        raise InstallError(f"migrating {cfg} failed: {r.stderr.strip()}")
    for line in r.stdout.splitlines():
        say(f"config: {line}")
    return copy


def check_config(lay: Layout, sortgate: Path) -> None:
    r = run([str(sortgate), "check-config", str(lay.config)], check=False)
    if r.returncode != 0:
        raise InstallError(f"{lay.config} is not valid for this version:\n{r.stderr.strip()}")


def schema_version(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        v = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        return v or (1 if tables else 0)
    finally:
        conn.close()


def backup_state(lay: Layout, old: str | None) -> Path | None:
    """Copy each store (consistently, with SQLite's backup API) and note its schema version."""
    present = [lay.state / s for s in STORES if (lay.state / s).exists()]
    if not present:
        return None
    dest = lay.state / "backups" / f"{old or 'unknown'}-{now_tag()}"
    dest.mkdir(parents=True)
    schemas = {}
    for src in present:
        conn, out = sqlite3.connect(src), sqlite3.connect(dest / src.name)
        try:
            conn.backup(out)
        finally:
            out.close()
            conn.close()
        schemas[src.name] = schema_version(dest / src.name)
    (dest / "schemas.json").write_text(json.dumps(schemas) + "\n")
    return dest


def install_unit_and_rules(lay: Layout, system: bool) -> None:
    lay.unit_dir.mkdir(parents=True, exist_ok=True)
    for name in (UNIT, CONSOLE_UNIT):
        unit = find_bundled(name, f"systemd/{name}").read_text()
        (lay.unit_dir / name).write_text(unit.replace("/opt/sortgate/current", str(lay.current)))
    rules = lay.udev_dir / UDEV
    if not rules.exists():
        lay.udev_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(find_bundled(UDEV, f"systemd/{UDEV}"), rules)
        say(f"{rules}: example udev rules; fill in the readers' serial numbers")
    if system:
        run(["systemctl", "daemon-reload"])
        run(["systemctl", "enable", UNIT])
        run(["udevadm", "control", "--reload"], check=False)


def healthy(lay: Layout, args: argparse.Namespace) -> bool:
    if args.health:
        env = {**os.environ, "SORTGATE": str(lay.current / "bin" / "sortgate"), "SORTGATE_CONFIG": str(lay.config)}
        r = subprocess.run(args.health, shell=True, env=env, timeout=args.health_timeout_s)
        return r.returncode == 0
    if not args.system or args.no_start:
        return True  # nothing started: check-config has passed, which is all there is to check
    run(["systemctl", "restart", "--no-block", UNIT], check=False)
    deadline = time.monotonic() + args.health_timeout_s
    while time.monotonic() < deadline:
        state = run(["systemctl", "is-active", UNIT], check=False).stdout.strip()
        if state == "active":
            restarts = run(["systemctl", "show", "-P", "NRestarts", UNIT], check=False).stdout.strip()
            time.sleep(args.settle_s)
            again = run(["systemctl", "show", "-P", "NRestarts", UNIT], check=False).stdout.strip()
            still = run(["systemctl", "is-active", UNIT], check=False).stdout.strip()
            return still == "active" and again == restarts
        if state == "failed":
            return False
        time.sleep(0.5)
    return False


def restore(lay: Layout, version: str, config_copy: str | None, state_copy: str | None, why: str) -> None:
    """Back to ``version``: its config copy, and its state copy where a schema changed."""
    say(f"rolling back to {version}: {why}")
    point_current(lay, version)
    if config_copy and Path(config_copy).exists():
        shutil.copy2(config_copy, lay.config)
        say(f"config restored from {config_copy}")
    if state_copy and Path(state_copy).exists():
        before = json.loads((Path(state_copy) / "schemas.json").read_text())
        changed = [s for s, v in before.items() if (lay.state / s).exists() and schema_version(lay.state / s) != v]
        if changed:
            aside = lay.state / "backups" / f"rolled-back-{now_tag()}"
            aside.mkdir(parents=True)
            for s in changed:
                for suffix in ("", "-wal", "-shm"):
                    if (lay.state / (s + suffix)).exists():
                        shutil.move(lay.state / (s + suffix), aside / (s + suffix))
                shutil.copy2(Path(state_copy) / s, lay.state / s)
            say(f"stores {changed} restored from {state_copy} (schema changed; the newer ones are in {aside})")
        else:
            say("stores kept as they are (same schema): nothing written since the upgrade is lost")


# --- commands --------------------------------------------------------------------------------
def cmd_install(lay: Layout, args: argparse.Namespace) -> int:
    wheel = args.wheel or next(iter(sorted(HERE.glob("sortgate-*.whl"))), None)
    if wheel is None:
        raise InstallError("no wheel: give --wheel, or run from a bundle (tools/bundle.sh)")
    version = wheel_version(wheel)
    old = current_version(lay)
    if old == version:
        say(f"{version} is already the current version")
        return 0
    ensure_user_and_dirs(lay, args.system)
    target = lay.prefix / version
    build_venv(target, wheel, args)
    sortgate = target / "bin" / "sortgate"
    config_copy = None
    try:
        config_copy = prepare_config(lay, sortgate, old, args.system)
        check_config(lay, sortgate)
    except InstallError:
        shutil.rmtree(target, ignore_errors=True)
        if config_copy is not None:
            shutil.copy2(config_copy, lay.config)  # nothing changed
        raise
    state_copy = backup_state(lay, old)
    record = load_record(lay)
    record.update({
        "current": version, "previous": old, "installed_at": now_tag(),
        "config_backup": str(config_copy) if config_copy else None,
        "state_backup": str(state_copy) if state_copy else None,
    })
    point_current(lay, version)
    save_record(lay, record)
    if Path(__file__).resolve() != (lay.prefix / "install.py").resolve():
        shutil.copy2(Path(__file__).resolve(), lay.prefix / "install.py")  # rollback, status, uninstall later
    install_unit_and_rules(lay, args.system)
    say(f"current -> {version}" + (f" (previous: {old})" if old else ""))
    if healthy(lay, args):
        prune(lay, keep={version, old})
        say(f"{version} is healthy")
        if args.system:  # a console the site runs follows the agent's version
            run(["systemctl", "try-restart", CONSOLE_UNIT], check=False)
        return 0
    if old is None:
        say(f"{version} failed its health check and there is no previous version to go back to")
        return 1
    restore(lay, old, record["config_backup"], record["state_backup"], f"{version} failed its health check")  # type: ignore[arg-type]
    save_record(lay, {**record, "current": old, "previous": None, "failed": version})
    if args.system and not args.no_start:
        run(["systemctl", "restart", UNIT], check=False)
    shutil.rmtree(target, ignore_errors=True)
    return 1


def cmd_rollback(lay: Layout, args: argparse.Namespace) -> int:
    record = load_record(lay)
    prev = record.get("previous")
    if not prev or not (lay.prefix / str(prev)).exists():
        raise InstallError("no previous version to roll back to")
    cur = str(record.get("current"))
    restore(lay, str(prev), record.get("config_backup"), record.get("state_backup"), "asked")  # type: ignore[arg-type]
    save_record(lay, {**record, "current": prev, "previous": None, "rolled_back_from": cur})
    if args.system and not args.no_start:
        run(["systemctl", "restart", UNIT])
        run(["systemctl", "try-restart", CONSOLE_UNIT], check=False)
    say(f"current -> {prev}; {cur} is kept until the next install")
    return 0


def cmd_status(lay: Layout, args: argparse.Namespace) -> int:
    record = load_record(lay)
    versions = sorted(p.name for p in lay.prefix.iterdir() if p.is_dir() and not p.is_symlink()) \
        if lay.prefix.exists() else []
    print(json.dumps({"current": current_version(lay), "record": record, "versions": versions}, indent=1))
    return 0


def cmd_uninstall(lay: Layout, args: argparse.Namespace) -> int:
    if args.system:
        run(["systemctl", "disable", "--now", UNIT, CONSOLE_UNIT], check=False)
    for name in (UNIT, CONSOLE_UNIT):
        (lay.unit_dir / name).unlink(missing_ok=True)
    if args.system:
        run(["systemctl", "daemon-reload"], check=False)
    shutil.rmtree(lay.prefix, ignore_errors=True)
    if args.purge:
        (lay.udev_dir / UDEV).unlink(missing_ok=True)
        shutil.rmtree(lay.etc, ignore_errors=True)
        shutil.rmtree(lay.state, ignore_errors=True)
        if args.system:
            run(["userdel", USER], check=False)
        say("removed, with config, state and user")
    else:
        say(f"removed; {lay.etc}, {lay.state} and the udev rules are kept (--purge removes them)")
    return 0


def prune(lay: Layout, keep: set[str | None]) -> None:
    for p in lay.prefix.iterdir():
        if p.is_dir() and not p.is_symlink() and p.name not in keep and re.match(r"\d", p.name):
            shutil.rmtree(p, ignore_errors=True)
            say(f"removed old version {p.name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="install.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", type=Path, default=Path("/opt/sortgate"))
    ap.add_argument("--etc", type=Path, default=Path("/etc/sortgate"))
    ap.add_argument("--state", type=Path, default=Path("/var/lib/sortgate"))
    ap.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"))
    ap.add_argument("--udev-dir", type=Path, default=Path("/etc/udev/rules.d"))
    ap.add_argument("--no-system", dest="system", action="store_false",
                    help="no user, ownership, systemctl or udevadm (a chroot being prepared; tests)")
    ap.add_argument("--no-start", action="store_true", help="install and enable, but do not (re)start")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("install", help="install, or upgrade to, the bundled (or given) wheel")
    p.add_argument("--wheel", type=Path)
    p.add_argument("--constraints", type=Path, help="default: constraints.txt beside the installer")
    p.add_argument("--find-links", type=Path, action="append", help="a folder of wheels (offline boxes)")
    p.add_argument("--no-index", action="store_true", help="only --find-links, never PyPI")
    p.add_argument("--health", help="a shell command that decides health instead of systemd (exit 0 = healthy); "
                   "$SORTGATE and $SORTGATE_CONFIG are set")
    p.add_argument("--health-timeout-s", type=float, default=60.0)
    p.add_argument("--settle-s", type=float, default=10.0, help="active this long without a restart (default 10)")
    sub.add_parser("rollback", help="back to the previous version, its config and (where a schema changed) state")
    sub.add_parser("status", help="what is installed, as JSON")
    p = sub.add_parser("uninstall", help="remove the program; config and state stay unless --purge")
    p.add_argument("--purge", action="store_true")
    args = ap.parse_args(argv)
    if args.system and os.geteuid() != 0:
        print("install: run as root (or --no-system for a prepared root or a test)", file=sys.stderr)
        return 2
    lay = Layout(args.prefix, args.etc, args.state, args.unit_dir, args.udev_dir)
    commands = {"install": cmd_install, "rollback": cmd_rollback, "status": cmd_status, "uninstall": cmd_uninstall}
    try:
        return commands[args.cmd](lay, args)
    except InstallError as exc:
        print(f"install: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
