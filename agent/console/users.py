"""Console users: a file of ``name:role:hash`` lines, passwords hashed with scrypt (stdlib).

Roles: ``viewer`` (every page, no action), ``officer`` (a viewer who records inspection findings),
``technician`` (a viewer who runs maintenance mode, gate and reader tests). A technician is not an
officer nor the other way round: findings are customs' work, commissioning the line's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ROLES", "User", "UsersError", "add_user", "hash_password", "load_users", "verify"]

ROLES = ("viewer", "officer", "technician")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
# scrypt cost: ~50 ms on a Raspberry Pi 4 core, 16 MiB of memory
_N, _R, _P = 2**14, 8, 1


class UsersError(ValueError):
    """The users file is unusable; the message names the file and line."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    hash: str

    def can(self, action: str) -> bool:
        """``finding`` needs an officer; ``maintenance``, ``gate``, ``reader`` a technician."""
        need = {"finding": "officer", "maintenance": "technician", "gate": "technician", "reader": "technician"}
        return self.role == need.get(action, "viewer") or need.get(action) is None


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(key).decode()}"


def verify(user: User | None, password: str) -> bool:
    """Constant work whether or not the user exists (no user-name oracle by timing)."""
    stored = user.hash if user else hash_password("x")
    try:
        _, n, r, p, salt, key = stored.split("$")
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    except (ValueError, TypeError):
        return False
    return user is not None and hmac.compare_digest(got, base64.b64decode(key))


def load_users(path: Path) -> dict[str, User]:
    users: dict[str, User] = {}
    for i, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3 or not _NAME.match(parts[0]) or parts[1] not in ROLES or not parts[2].startswith("scrypt$"):
            raise UsersError(f"{path}:{i}: expected name:role:scrypt$... with role one of {', '.join(ROLES)}")
        if parts[0] in users:
            raise UsersError(f"{path}:{i}: user {parts[0]} twice")
        users[parts[0]] = User(*parts)
    return users


def add_user(path: Path, name: str, role: str, password: str) -> None:
    """Add or replace one user (the file is rewritten atomically, mode 0640)."""
    if not _NAME.match(name):
        raise UsersError(f"user name {name!r}: 1-32 of A-Z a-z 0-9 _ . -")
    if role not in ROLES:
        raise UsersError(f"role {role!r}: one of {', '.join(ROLES)}")
    if len(password) < 8:
        raise UsersError("password: at least 8 characters")
    users = load_users(path) if path.exists() else {}
    users[name] = User(name, role, hash_password(password))
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("# sortgate console users: name:role:scrypt hash (sortgate console adduser)\n")
        f.writelines(f"{u.name}:{u.role}:{u.hash}\n" for u in users.values())
    os.replace(tmp, path)
