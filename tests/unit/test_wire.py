"""TcpWire against a scripted Modbus TCP peer on loopback: the quick check of a register answer,
and everything that is not the expected frame going through pymodbus's framer."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable

import pytest
from pymodbus.pdu.register_message import ReadHoldingRegistersRequest

from firmware_bridge.errors import LinkError
from firmware_bridge.wire import Repeated, TcpWire

Answer = Callable[[bytes], list[bytes]]  # request frame -> segments to send back


def answer(tid: int, unit: int, fc: int, regs: list[int]) -> bytes:
    pdu = bytes([fc, 2 * len(regs)]) + struct.pack(f">{len(regs)}H", *regs)
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


class Peer:
    """Answers each request with the segments ``script`` makes of it (a short pause between)."""

    def __init__(self, script: Answer) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.script = script
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:  # closed before the wire connected
            return
        with conn:
            while data := _recv(conn):
                self.requests.append(data)
                for segment in self.script(data):
                    conn.sendall(segment)
                    threading.Event().wait(0.005)  # separate TCP segments

    def close(self) -> None:
        self.server.close()


def _recv(conn: socket.socket) -> bytes:
    try:
        return conn.recv(1024)
    except OSError:  # the wire went away
        return b""


def wire_to(peer: Peer) -> TcpWire:
    wire = TcpWire("127.0.0.1", peer.port, 1, 0.3, lambda tx, data: None)
    wire.open()
    return wire


def tid_of(request: bytes) -> int:
    return int(struct.unpack_from(">H", request)[0])


@pytest.mark.parametrize("how", ["whole", "split", "stale first", "merged with garbage after"])
def test_a_register_answer_is_taken_however_it_arrives(how: str) -> None:
    def script(req: bytes) -> list[bytes]:
        good = answer(tid_of(req), 1, 3, [11, 22, 33])
        if how == "split":
            return [good[:5], good[5:]]
        if how == "stale first":  # a timed-out request's late answer, then ours
            return [answer(tid_of(req) - 1, 1, 3, [9, 9, 9]), good]
        if how == "merged with garbage after":
            return [good + b"\x00"]
        return [good]

    peer = Peer(script)
    wire = wire_to(peer)
    try:
        for _ in range(3):
            got = wire.transact_registers(ReadHoldingRegistersRequest(address=16, count=3), 3)
            assert got == struct.pack(">3H", 11, 22, 33)
    finally:
        wire.close()
        peer.close()


def test_a_repeated_request_is_framed_once_with_its_transaction_id_and_value_put_in() -> None:
    from pymodbus.pdu.register_message import ReadWriteMultipleRegistersRequest

    peer = Peer(lambda req: [answer(tid_of(req), 1, 23, [5, 6])])
    wire = wire_to(peer)
    rep = Repeated(ReadWriteMultipleRegistersRequest(read_address=16, read_count=2, write_address=32,
                                                     write_registers=[0]), 2)
    try:
        assert wire.transact_repeated(rep, 0x1234) == struct.pack(">2H", 5, 6)
        assert wire.transact_repeated(rep, 0x1235) == struct.pack(">2H", 5, 6)
    finally:
        wire.close()
        peer.close()
    first, second = peer.requests
    # as pymodbus frames it: MBAP (tid, 0, length 13, unit 1), FC 23, read 16+2, write 32 x1 (2 bytes)
    assert first == struct.pack(">HHHBBHHHHBH", 1, 0, 13, 1, 23, 16, 2, 32, 1, 2, 0x1234)
    assert second == struct.pack(">HHHBBHHHHBH", 2, 0, 13, 1, 23, 16, 2, 32, 1, 2, 0x1235)


def test_an_exception_answer_comes_back_as_pymodbus_decodes_it() -> None:
    peer = Peer(lambda req: [struct.pack(">HHHBBB", tid_of(req), 0, 3, 1, 0x83, 0x02)])
    wire = wire_to(peer)
    try:
        got = wire.transact_registers(ReadHoldingRegistersRequest(address=16, count=3), 3)
        assert not isinstance(got, bytes) and got.isError() and got.exception_code == 2
    finally:
        wire.close()
        peer.close()


def test_silence_and_a_closed_connection_are_link_errors() -> None:
    peer = Peer(lambda req: [])
    wire = wire_to(peer)
    try:
        with pytest.raises(LinkError, match="no response within 300 ms"):
            wire.transact_registers(ReadHoldingRegistersRequest(address=16, count=3), 3)
    finally:
        wire.close()
        peer.close()
    closing = Peer(lambda req: [b""])
    wire = wire_to(closing)
    try:
        closing.server.close()
        wire.abort()  # what ControllerLink.close does from the loop: a blocked read returns
        with pytest.raises(LinkError):
            wire.transact_registers(ReadHoldingRegistersRequest(address=16, count=3), 3)
    finally:
        wire.close()
