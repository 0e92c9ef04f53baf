"""The agent's local control socket: what ``sortgate status`` and the technician commands talk to.

A Unix socket (``control.socket``, by default ``{state_dir}/control.sock``, mode 0660): only
users who may read the agent's state may ask. Like ``chronyc`` to ``chronyd``, the CLI needs no
network and no broker, so it works exactly when a technician needs it most: when the controller
or the broker is down.

The protocol (docs/operations.md, "At the line"): one request per connection, one JSON object on
one line (at most ``MAX_REQUEST`` bytes, within ``REQUEST_S``), ``{"op": ...}`` plus its fields;
one JSON line back, ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. ``reader_watch``
then streams one JSON line per reader event until the client hangs up. A request never blocks the
line: each is answered from state the agent already holds, on the agent's loop, in microseconds;
the only awaited I/O is the controller write of a maintenance request or a gate test.

The socket is not vital: if it cannot be opened the agent logs why and runs without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("sortgate.control")

__all__ = ["MAX_REQUEST", "REQUEST_S", "ControlError", "ControlServer", "encode_line", "request", "socket_path"]

MAX_REQUEST = 4096
REQUEST_S = 5.0
#: a Unix socket path longer than this cannot be bound (sun_path is 108 bytes with its NUL)
MAX_PATH = 107

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
Streamer = Callable[[dict[str, Any], asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ControlError(Exception):
    """A request that cannot be done; its message goes back to the client as ``error``."""


def socket_path(state_dir: Path, configured: Path | None) -> Path:
    return configured if configured is not None else state_dir / "control.sock"


def encode_line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler], streamers: dict[str, Streamer]) -> None:
        self.path = path
        self.handlers = handlers
        self.streamers = streamers
        self.served = 0
        self._clients: set[asyncio.Task[None]] = set()  # connections being answered (watches last long)

    async def run(self) -> None:
        """Serve until cancelled; a socket that cannot be opened is logged, not fatal."""
        try:
            server = await self._open()
        except (OSError, ControlError) as exc:
            log.error("control socket not available; sortgate status will not reach this agent",
                      path=str(self.path), error=str(exc))
            await asyncio.Event().wait()  # a task of the agent like the others; it just has no socket
            return
        log.info("control socket open", path=str(self.path))
        try:
            async with server:
                await server.serve_forever()
        finally:
            for task in list(self._clients):  # Python 3.11's server does not end its handlers
                task.cancel()
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _open(self) -> asyncio.Server:
        if len(os.fsencode(self.path)) > MAX_PATH:
            raise ControlError(f"path longer than {MAX_PATH} bytes; set control.socket to a shorter one")
        if self.path.exists() or self.path.is_symlink():
            if await _answers(self.path):
                raise ControlError("another agent answers on it (two agents share one state_dir?)")
            self.path.unlink()  # left by an agent that was killed
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o117)  # srw-rw----: the agent's user and group only
        try:
            return await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_REQUEST)
        finally:
            os.umask(old)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)
        try:
            reply = await self._answer(reader, writer)
            if reply is not None:
                writer.write(encode_line(reply))
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client hung up
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(REQUEST_S):
                raw = await reader.readline()
        except TimeoutError:
            return {"ok": False, "error": f"no request line within {REQUEST_S:g} s"}
        except ValueError:  # longer than the stream limit
            return {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
        try:
            req = json.loads(raw)
        except ValueError as exc:
            return {"ok": False, "error": f"request is not JSON: {exc}"}
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            return {"ok": False, "error": 'request must be a JSON object with "op"'}
        op = req["op"]
        self.served += 1
        try:
            if op in self.streamers:
                await self.streamers[op](req, reader, writer)
                return None
            if op not in self.handlers:
                known = ", ".join(sorted([*self.handlers, *self.streamers]))
                return {"ok": False, "error": f"unknown op {op!r}; known: {known}"}
            return {"ok": True, **await self.handlers[op](req)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except (ConnectionError, OSError):
            raise
        except Exception as exc:  # a bad request must never take the agent down
            log.exception("control request failed", op=op)
            return {"ok": False, "error": f"{op} failed: {exc!r}"}


async def _answers(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def request(path: Path, req: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
    """One request from a client (the CLI): the reply object. Raises OSError when nothing answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(str(path))
        s.sendall(encode_line(req))
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise ConnectionError(f"{path}: the agent closed the connection without an answer")
    reply: dict[str, Any] = json.loads(buf)
    return reply
