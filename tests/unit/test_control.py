"""The control socket's protocol: every bad request gets a clear error, none harms the server."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from agent.service.control import MAX_REQUEST, ControlError, ControlServer
from agent.service.monitor import ReaderMonitor, frame_text
from firmware_bridge.reader_codec import Frame, FramingError


async def _status(req: dict[str, Any]) -> dict[str, Any]:
    return {"echo": req.get("x")}


async def _refuse(req: dict[str, Any]) -> dict[str, Any]:
    raise ControlError("not now")


async def _crash(req: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("bug")


async def _raw(path: Path, data: bytes) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    reply: dict[str, Any] = json.loads(line)
    return reply


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "c.sock"


async def test_requests_and_bad_requests(sock: Path) -> None:
    server = ControlServer(sock, {"status": _status, "refuse": _refuse, "crash": _crash}, {})
    task = asyncio.create_task(server.run())
    for _ in range(100):
        if sock.exists():
            break
        await asyncio.sleep(0.02)
    try:
        assert sock.stat().st_mode & 0o777 == 0o660
        assert await _raw(sock, b'{"op":"status","x":5}\n') == {"ok": True, "echo": 5}
        assert (await _raw(sock, b"not json\n"))["error"].startswith("request is not JSON")
        assert (await _raw(sock, b"[1,2]\n"))["error"] == 'request must be a JSON object with "op"'
        unknown = await _raw(sock, b'{"op":"launch"}\n')
        assert unknown["ok"] is False and "unknown op 'launch'; known: crash, refuse, status" == unknown["error"]
        assert await _raw(sock, b'{"op":"refuse"}\n') == {"ok": False, "error": "not now"}
        assert (await _raw(sock, b'{"op":"crash"}\n'))["error"] == "crash failed: RuntimeError('bug')"
        long = await _raw(sock, b"x" * (MAX_REQUEST + 10) + b"\n")
        assert long["error"] == f"request longer than {MAX_REQUEST} bytes"
        assert await _raw(sock, b'{"op":"status"}\n') == {"ok": True, "echo": None}  # still serving
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert not sock.exists()


async def test_a_stale_socket_is_replaced_and_a_live_one_is_left_alone(sock: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # the file of a killed agent: nothing listens
    first = asyncio.create_task(ControlServer(sock, {"status": _status}, {}).run())
    await asyncio.sleep(0.3)
    assert (await _raw(sock, b'{"op":"status"}\n'))["ok"] is True
    second = asyncio.create_task(ControlServer(sock, {}, {}).run())  # another agent, same state_dir
    await asyncio.sleep(1.5)
    assert (await _raw(sock, b'{"op":"status"}\n'))["ok"] is True  # still the first one's
    assert not second.done()  # the second runs on, without a socket (logged), it is not fatal
    for t in (first, second):
        t.cancel()
    await asyncio.gather(first, second, return_exceptions=True)


def test_reader_monitor_counts_rates_and_keeps_the_last_frames() -> None:
    mon = ReaderMonitor({"top": "/dev/ttyUSB0"})
    mon.on_event("top", Frame(("A1",), False, b"A1\r\n"))
    mon.on_event("top", Frame((), True, b"NoRead\r\n"))
    mon.on_event("top", Frame(("A1", "B2"), False, b"A1;B2\r\n"))
    mon.on_event("top", FramingError("garbage", "bytes before the start", b"\x00\xffA"))
    mon.on_event("nobody", Frame(("X",), False, b"X"))  # an unknown reader is ignored
    s = mon.summary()[0]
    assert (s["frames"], s["reads"], s["no_reads"], s["multi_reads"], s["framing_errors"]) == (3, 1, 1, 1, 1)
    assert s["read_pct"] == pytest.approx(33.33) and s["no_read_pct"] == pytest.approx(33.33)
    assert [f["kind"] for f in s["last"]] == ["read", "no_read", "multi_read", "framing_error"]
    assert s["last"][0]["raw"] == "A1<0D><0A>"
    mon.reset("top")
    assert mon.summary()[0]["frames"] == 0 and len(mon.summary()[0]["last"]) == 4


def test_frame_text_is_printable_and_bounded() -> None:
    assert frame_text(b"\x02AB\x03") == "<02>AB<03>"
    assert len(frame_text(b"x" * 500, limit=20)) == 20
