"""Start a private mosquitto on a loopback port, for the demo, the benchmarks and the tests."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class BrokerNotFound(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerNotFound(
        "mosquitto not found: install it (Debian: apt-get install mosquitto) or run tools/setup.sh"
    )


class Mosquitto:
    """A mosquitto process on 127.0.0.1:<port>, with persistence in a private folder."""

    def __init__(
        self, port: int | None = None, extra_conf: str = "", tls: tuple[str, str, str] | None = None,
        passwords: dict[str, str] | None = None,
    ) -> None:
        """``tls``: (cafile, certfile, keyfile) makes the listener TLS with client certificates.
        ``passwords``: user -> password; a client that gives a user name must give its password
        (clients without one stay anonymous)."""
        self.port = port or free_port()
        self.tls = tls
        self.dir = Path(tempfile.mkdtemp(prefix="sortgate-mosq-"))
        self.extra_conf = extra_conf
        self.passwords = dict(passwords or {})
        self.proc: subprocess.Popen[bytes] | None = None
        if passwords:
            self._write_passwords()

    def _write_passwords(self) -> None:
        tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        path = self.dir / "passwords"
        path.write_text("")
        path.chmod(0o600)
        for user, password in self.passwords.items():
            subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)

    def set_password(self, user: str, password: str) -> None:
        """Change a user's password in the file (the broker reads it at start or reload)."""
        self.passwords[user] = password
        self._write_passwords()

    def reload(self) -> None:
        """SIGHUP: the broker reads its password file again; connected clients stay."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        conf = self.dir / "mosquitto.conf"
        # Started as root, mosquitto drops to the "mosquitto" user, which cannot write its
        # persistence file into our private folder: sessions would silently not survive a
        # restart. Keep it as the invoking user instead.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name}\n" if os.geteuid() == 0 else ""
        conf.write_text(
            user
            + f"listener {self.port} 127.0.0.1\n"
            + (
                f"cafile {self.tls[0]}\ncertfile {self.tls[1]}\nkeyfile {self.tls[2]}\n"
                "require_certificate true\nuse_identity_as_username true\n"
                if self.tls else ""
            )
            + "allow_anonymous true\n"
            + (f"password_file {self.dir / 'passwords'}\n" if self.passwords else "")
            + "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "max_queued_messages 100000\n"
            f"{self.extra_conf}\n"
        )
        seen = len(self.log_text())  # readiness counts only what this start writes
        log = open(self.dir / "mosquitto.log", "ab")  # lives as long as the process
        self.proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self.dir / 'mosquitto.log').read_text()[-500:]}")
            if f"Opening ipv4 listen socket on port {self.port}" in self.log_text()[seen:]:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} in {timeout_s}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        """Stop, and remove the private folder."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        try:
            return (self.dir / "mosquitto.log").read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
