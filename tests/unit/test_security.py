"""Signatures, validity windows, secrets and the alarm book (pure logic, no wires)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.central import messages
from agent.central.alarms import Alarms
from agent.central.security import KeyRing, canonical, check_validity, generate_keypair, resolve_secret, sign_item
from agent.config import parse_config
from agent.service.runtime import StartupError, _security

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
ITEM = {"waybill": "RB123456785GB", "verdict": "release", "verdict_id": "v1", "issued_at": NOW.isoformat()}


def keyring(tmp_path: Path, public: str) -> KeyRing:
    path = tmp_path / "keys"
    path.write_text(f"# trusted\ncentral-1 {public}  # primary\n")
    return KeyRing.load(str(path))


def test_signed_item_verifies_and_any_change_breaks_it(tmp_path: Path) -> None:
    private, public = generate_keypair()
    ring = keyring(tmp_path, public)
    signed = sign_item(ITEM, private, "central-1")
    assert ring.verify(signed).ok
    assert ring.verify({**signed, "verdict": "inspect"}).reason == "bad_signature"
    assert ring.verify({**signed, "expires_at": "2030-01-01T00:00:00Z"}).reason == "bad_signature"
    assert ring.verify(ITEM).reason == "unsigned"
    assert ring.verify({**signed, "key_id": "someone"}).reason == "unknown_key"
    assert ring.verify({**signed, "signature": "not base64!"}).reason == "bad_signature"
    other, _ = generate_keypair()
    assert ring.verify(sign_item(ITEM, other, "central-1")).reason == "bad_signature"


def test_canonical_form_ignores_key_order_and_the_signature() -> None:
    a = canonical({"b": 1, "a": "x", "signature": "zzz"})
    assert a == canonical({"a": "x", "b": 1}) == b'{"a":"x","b":1}'


def test_keyring_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("central-1 AAAA\n")
    with pytest.raises(ValueError, match=r"keys:1:"):
        KeyRing.load(str(path))
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no keys"):
        KeyRing.load(str(path))


def test_validity_window() -> None:
    assert check_validity(NOW, NOW + timedelta(hours=1), NOW, 120).ok
    assert check_validity(NOW - timedelta(days=2), NOW - timedelta(days=1), NOW, 120).reason == "expired"
    assert check_validity(NOW + timedelta(minutes=10), None, NOW, 120).reason == "not_yet_valid"
    assert check_validity(NOW + timedelta(seconds=60), None, NOW, 120).ok  # within clock skew


def test_secrets_resolve_under_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert resolve_secret("mqtt-password") == tmp_path / "mqtt-password"
    assert resolve_secret("/etc/x") == Path("/etc/x")


BASE = {
    "line": {"site": "S", "line": "L"},
    "controller": {"host": "127.0.0.1"},
    "readers": [{"name": "r", "device": "/dev/null"}],
    "lanes": [{"number": 1, "name": "i", "role": "inspection"}, {"number": 2, "name": "r", "role": "release", "gate": 1}],
}


def test_missing_secret_files_stop_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = parse_config({**BASE, "mqtt": {"username": "line1", "password_file": "mqtt-password"}})
    with pytest.raises(StartupError, match="mqtt.password_file"):
        _security(cfg)
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    assert _security(cfg)[2] == "s3cret"
    cfg = parse_config({**BASE, "mqtt": {"tls": {"ca_file": "ca.crt", "cert_file": "c.crt", "key_file": "c.key"}}})
    with pytest.raises(StartupError, match=r"mqtt.tls.ca_file: .*ca.crt does not exist"):
        _security(cfg)
    cfg = parse_config({**BASE, "verdicts": {"require_signatures": True, "trusted_keys_file": "keys"}})
    with pytest.raises(StartupError, match="verdicts.trusted_keys_file"):
        _security(cfg)


def test_config_rules_for_security() -> None:
    from agent.config import ConfigError

    with pytest.raises(ConfigError, match="require_signatures = true needs trusted_keys_file"):
        parse_config({**BASE, "verdicts": {"require_signatures": True}})
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        parse_config({**BASE, "mqtt": {"tls": {"ca_file": "a", "cert_file": "b"}}})
    with pytest.raises(ConfigError, match="password_file needs a username"):
        parse_config({**BASE, "mqtt": {"password_file": "p"}})


def test_alarm_conditions_publish_once_per_change_and_events_are_rate_limited() -> None:
    out: list[dict[str, object]] = []
    alarms = Alarms("S", "L", lambda alarm_id, payload: out.append(json.loads(payload)), event_quiet_s=60)
    alarms.condition("jam", True, "jam at gate 1")
    alarms.condition("jam", True, "still jammed")
    alarms.condition("reader_offline", True, "unplugged", subject="top")
    alarms.condition("reader_offline", True, "unplugged", subject="side")
    alarms.condition("jam", False, "cleared")
    for _ in range(50):
        alarms.event("inbound_invalid", "not JSON")
    assert [(a["alarm"], a["active"], a.get("subject")) for a in out] == [
        ("jam", True, None), ("reader_offline", True, "top"), ("reader_offline", True, "side"),
        ("jam", False, None), ("inbound_invalid", True, None),
    ]
    assert len({a["alarm_id"] for a in out}) == len(out)


def test_inbound_parsing_never_raises() -> None:
    for payload in (b"", b"\xff", b"[]", b"null", b"{" * 100_000, b"x" * (2 << 20)):
        batch_id, raws, problem = messages.parse_verdict_envelope(payload)
        assert raws == [] and problem
    ok = json.dumps({"schema": "sortgate.verdicts/1", "batch_id": "b", "verdicts": [ITEM, {"waybill": 1}]}).encode()
    batch_id, raws, problem = messages.parse_verdict_envelope(ok)
    items, problems = messages.parse_verdict_items(raws)
    assert problem is None and batch_id == "b" and len(items) == 1 and problems[0].startswith("verdicts[1]:")
