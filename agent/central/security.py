"""Secrets and signed verdicts.

Secrets (broker password, client key, trusted keys) are read from files, never from the config
itself. A relative path is looked up in ``$CREDENTIALS_DIRECTORY`` when systemd provides one
(``LoadCredential=`` in the unit), else next to the working directory.

Verdicts can be signed by the central system with Ed25519, so that nobody else on the network can
release a parcel. The signature covers the verdict item's canonical JSON (keys sorted, no spaces,
UTF-8) without its ``signature`` field; ``key_id`` names the signing key. With
``require_signatures`` the agent acts only on items that

* name a trusted key and carry a valid signature over exactly their content (else ``unsigned`` /
  ``unknown_key`` / ``bad_signature``),
* have not expired and were not issued in the future beyond the allowed clock skew
  (``expired`` / ``not_yet_valid``),
* are not a replay: a ``verdict_id`` already seen with other content, or an item older than the
  verdict already stored for its waybill (``replayed``). An identical redelivery (MQTT QoS 1 may
  deliver twice) is a harmless duplicate, not a replay.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "KeyRing",
    "canonical",
    "generate_keypair",
    "resolve_secret",
    "sign_item",
]


def resolve_secret(name: str) -> Path:
    """Path of a secret file: absolute as given, relative under $CREDENTIALS_DIRECTORY if set."""
    path = Path(name)
    if path.is_absolute():
        return path
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(creds) / path if creds else path


def read_secret(name: str) -> str:
    return resolve_secret(name).read_text(encoding="utf-8").strip()


def canonical(item: dict[str, Any]) -> bytes:
    body = {k: v for k, v in item.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def generate_keypair() -> tuple[str, str]:
    """A new Ed25519 key pair as (private, public), each raw bytes in base64."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes_raw()
    public = key.public_key().public_bytes_raw()
    return base64.b64encode(private).decode(), base64.b64encode(public).decode()


def sign_item(item: dict[str, Any], private_b64: str, key_id: str) -> dict[str, Any]:
    key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(private_b64))
    signed = {k: v for k, v in item.items() if k != "signature"}
    signed["key_id"] = key_id
    signed["signature"] = base64.b64encode(key.sign(canonical(signed))).decode()
    return signed


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    reason: str | None = None  # why it was rejected


class KeyRing:
    """Trusted public keys, by key id."""

    def __init__(self, keys: dict[str, Ed25519PublicKey]) -> None:
        self.keys = keys

    @classmethod
    def load(cls, name: str) -> KeyRing:
        """Read '<key_id> <base64 public key>' lines ('#' comments). Raises ValueError, naming the line."""
        path = resolve_secret(name)
        keys: dict[str, Ed25519PublicKey] = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                key_id, b64 = line.split()
                keys[key_id] = Ed25519PublicKey.from_public_bytes(base64.b64decode(b64, validate=True))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: not '<key_id> <base64 Ed25519 public key>': {exc}") from exc
        if not keys:
            raise ValueError(f"{path}: no keys")
        return cls(keys)

    def verify(self, item: dict[str, Any]) -> Check:
        sig, key_id = item.get("signature"), item.get("key_id")
        if not isinstance(sig, str) or not isinstance(key_id, str):
            return Check(False, "unsigned")
        key = self.keys.get(key_id)
        if key is None:
            return Check(False, "unknown_key")
        try:
            key.verify(base64.b64decode(sig, validate=True), canonical(item))
        except (InvalidSignature, ValueError):
            return Check(False, "bad_signature")
        return Check(True)


def check_validity(issued_at: datetime, expires_at: datetime | None, now: datetime, skew_s: int) -> Check:
    if expires_at is not None and expires_at <= now:
        return Check(False, "expired")
    if (issued_at - now).total_seconds() > skew_s:
        return Check(False, "not_yet_valid")
    return Check(True)
