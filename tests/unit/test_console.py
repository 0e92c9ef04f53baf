"""The console's rules without a browser or an agent: users and roles, CSRF, the read-only mode,
what may be served as an image, the alarm help kept in step with docs/operations.md."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import tomllib
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from agent.central.outbox import Outbox
from agent.config import ConfigError, parse_config
from agent.console.alarm_help import alarm_help
from agent.console.app import Hub, create_app
from agent.console.users import User, UsersError, add_user, load_users, verify

ROOT = Path(__file__).resolve().parents[2]
# the example without its [console] table: each test writes its own
EXAMPLE = re.sub(r"\n\[console\][^\[]*", "\n", (ROOT / "config" / "sortgate.example.toml").read_text())


def _config(tmp_path: Path, console: str = "") -> Path:
    text = EXAMPLE.replace('state_dir = "/var/lib/sortgate"', f'state_dir = "{tmp_path / "state"}"')
    text = re.sub(r'keep_dir = "[^"]*"', f'keep_dir = "{tmp_path / "flagged"}"', text)
    path = tmp_path / "agent.toml"
    path.write_text(text + console)
    return path


def _app(tmp_path: Path, console: str = "") -> TestClient:
    from agent.config import load_config

    path = _config(tmp_path, console)
    return TestClient(create_app(load_config(path), path), follow_redirects=False)


def _csrf(client: TestClient, url: str = "/") -> str:
    html = client.get(url).text
    m = re.search(r'"X-CSRF-Token": "([^"]+)"', html) or re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


def test_users_file_round_trip_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "users"
    add_user(path, "olga", "officer", "a-long-password")
    add_user(path, "theo", "technician", "another-password")
    add_user(path, "olga", "viewer", "changed-password")  # replaced, not doubled
    users = load_users(path)
    assert {u: users[u].role for u in users} == {"olga": "viewer", "theo": "technician"}
    assert path.stat().st_mode & 0o777 == 0o640
    assert verify(users["theo"], "another-password") and not verify(users["theo"], "another-passwore")
    assert not verify(None, "another-password")
    with pytest.raises(UsersError, match="at least 8"):
        add_user(path, "x", "viewer", "short")
    with pytest.raises(UsersError, match="role"):
        add_user(path, "x", "admin", "long-enough-1")
    path.write_text("olga:officer:plaintext\n")
    with pytest.raises(UsersError, match=r"users:1: expected name:role:scrypt"):
        load_users(path)


def test_roles_are_separate() -> None:
    officer, tech, viewer = User("o", "officer", ""), User("t", "technician", ""), User("v", "viewer", "")
    assert officer.can("finding") and not officer.can("gate") and not officer.can("maintenance")
    assert tech.can("gate") and tech.can("maintenance") and not tech.can("finding")
    assert viewer.can("view") and not any(viewer.can(a) for a in ("finding", "gate", "maintenance", "reader"))


def test_an_exposed_console_needs_users_and_tls_goes_in_pairs(tmp_path: Path) -> None:
    def parse(extra: str) -> None:
        parse_config(tomllib.loads(EXAMPLE + extra))

    with pytest.raises(ConfigError, match="console: host 0.0.0.0 is not a loopback address: .*needs users_file"):
        parse('\n[console]\nhost = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        parse('\n[console]\ntls_cert = "/etc/sortgate/c.pem"\n')
    parse('\n[console]\nhost = "0.0.0.0"\nusers_file = "/etc/sortgate/console.users"\n')


def test_without_users_the_console_is_read_only(tmp_path: Path) -> None:
    client = _app(tmp_path)
    r = client.get("/")
    assert r.status_code == 200 and "read-only (no users_file)" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"] and r.headers["x-frame-options"] == "DENY"
    token = _csrf(client)
    r = client.post("/actions/gate", data={"gate": "1"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 403 and "read-only" in r.text


def test_logins_roles_and_csrf(tmp_path: Path) -> None:
    users = tmp_path / "users"
    add_user(users, "vera", "viewer", "viewer-password")
    client = _app(tmp_path, f'\n[console]\nusers_file = "{users}"\n')
    r = client.get("/commissioning")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/commissioning"
    assert client.get("/api/status").status_code == 403
    token = _csrf(client, "/login")
    bad = client.post("/login", data={"user": "vera", "password": "nope", "csrf": token})
    assert bad.status_code == 401 and "wrong user name or password" in bad.text
    assert client.post("/login", data={"user": "vera", "password": "viewer-password"}).status_code == 403  # no token
    ok = client.post("/login", data={"user": "vera", "password": "viewer-password", "csrf": token, "next": "//evil"})
    assert ok.status_code == 303 and ok.headers["location"] == "/"  # never off-site
    assert client.get("/commissioning").status_code == 200
    token = _csrf(client)  # a new token for the new session
    r = client.post("/actions/maintenance", data={"state": "on"})
    assert r.status_code == 403 and "CSRF" in r.text
    r = client.post("/actions/maintenance", data={"state": "on"}, headers={"X-CSRF-Token": token + "x"})
    assert r.status_code == 403 and "CSRF" in r.text
    r = client.post("/actions/maintenance", data={"state": "on"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 403 and "viewer may not maintenance" in r.text
    cookie = client.cookies.get("sortgate_console")
    assert cookie
    set_cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie


def test_only_kept_images_inside_keep_dir_are_served(tmp_path: Path) -> None:
    client = _app(tmp_path)
    state = tmp_path / "state"  # made by the console (its session key)
    Outbox(state / "outbox.sqlite").close()
    keep = tmp_path / "flagged"
    keep.mkdir()
    (keep / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the browser")
    con = sqlite3.connect(state / "outbox.sqlite")
    for rid, path in (("R:1", keep / "a.png"), ("R:2", secret), ("R:3", keep / ".." / "secret.png")):
        rec = {"schema": "sortgate.parcel/1", "record_id": rid, "image": {"status": "flagged", "path": str(path)}}
        con.execute("INSERT INTO journal VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (rid, "parcel", 0.0, None, "inspection", "image_flagged", 1.0, 1.0, 1, None, json.dumps(rec)))
    con.commit()
    con.close()
    assert client.get("/image/R:1").status_code == 200
    assert client.get("/image/R:2").status_code == 404
    assert client.get("/image/R:3").status_code == 404
    assert client.get("/image/R:9").status_code == 404


def test_alarm_help_is_the_operations_table() -> None:
    ops = (ROOT / "docs" / "operations.md").read_text()
    shipped = (ROOT / "agent" / "data" / "alarms.md").read_text()
    assert shipped.strip() in ops, "agent/data/alarms.md must be the alarm table of docs/operations.md, verbatim"
    schema = json.loads((ROOT / "docs" / "schemas" / "alarm.schema.json").read_text())
    assert set(schema["properties"]["alarm"]["enum"]) == set(alarm_help())
    assert "PLC" in alarm_help()["controller_offline"]["todo"]


async def test_a_status_asked_right_at_start_waits_for_the_first_answer(tmp_path: Path) -> None:
    """Before the console has fetched the agent's status once, a status request waits for that
    first answer (here: the agent does not answer) instead of saying 'not asked yet'."""
    hub = Hub(tmp_path / "no-agent.sock")
    assert hub.latest["error"] == "not asked yet"
    fetching = asyncio.create_task(hub.run())
    try:
        status = await hub.current(6.0)
    finally:
        fetching.cancel()
    assert status["ok"] is False and "does not answer" in status["error"], status
    assert await hub.current(0.0) is hub.latest  # once fetched, no wait
