"""Reader framing: frames, NoRead, multi-read, and garbage that must not harm the next frame."""

from __future__ import annotations

import pytest

from firmware_bridge.reader_codec import Frame, FrameDecoder, FramingError, encode_frame

CRLF = (b"", b"\r\n")
STX = (b"\x02", b"\x03")


def dec(framing: tuple[bytes, bytes] = CRLF, max_len: int = 64) -> FrameDecoder:
    return FrameDecoder(framing[0], framing[1], "NoRead", ";", max_len)


def test_single_code_crlf() -> None:
    assert dec().feed(b"RB123456785GB\r\n") == [Frame(("RB123456785GB",), False, b"RB123456785GB")]


def test_split_across_reads() -> None:
    d = dec()
    assert d.feed(b"RB1234") == []
    assert d.feed(b"56785GB\r") == []
    (frame,) = d.feed(b"\n")
    assert isinstance(frame, Frame) and frame.codes == ("RB123456785GB",)


def test_noread_and_multiread() -> None:
    events = dec().feed(b"NoRead\r\nA1;B2\r\n")
    assert events[0] == Frame((), True, b"NoRead")
    assert isinstance(events[1], Frame) and events[1].codes == ("A1", "B2")


def test_stx_etx_with_garbage_before_prefix() -> None:
    events = dec(STX).feed(b"\xff\xfe\x02RB123456785GB\x03\x02NoRead\x03")
    assert isinstance(events[0], Frame) and events[0].codes == ("RB123456785GB",)
    assert events[1].no_read  # type: ignore[union-attr]


def test_stx_etx_garbage_only_is_reported() -> None:
    (event,) = dec(STX).feed(b"zzz\x03")
    assert isinstance(event, FramingError) and event.kind == "garbage"


def test_non_printable_is_reported_and_next_frame_survives() -> None:
    events = dec().feed(b"\x00\x01\xffRB1\r\nRB123456785GB\r\n")
    assert isinstance(events[0], FramingError) and events[0].kind == "non_printable"
    assert events[0].preview().startswith("00 01 ff")
    assert events[1] == Frame(("RB123456785GB",), False, b"RB123456785GB")


def test_overlong_line_is_reported_once_and_skipped() -> None:
    d = dec(max_len=32)
    events = d.feed(b"X" * 100)
    events += d.feed(b"Y" * 100)
    events += d.feed(b"\r\nRB123456785GB\r\n")
    kinds = [e.kind for e in events if isinstance(e, FramingError)]
    assert kinds == ["overlong"]
    frames = [e for e in events if isinstance(e, Frame)]
    assert frames == [Frame(("RB123456785GB",), False, b"RB123456785GB")]


def test_overlong_complete_frame() -> None:
    (event,) = dec(max_len=16).feed(b"A" * 40 + b"\r\n")
    assert isinstance(event, FramingError) and event.kind == "overlong"


def test_empty_lines_are_ignored_and_delimiters_only_is_error() -> None:
    events = dec().feed(b"\r\n\r\n;;\r\n")
    assert len(events) == 1 and isinstance(events[0], FramingError) and events[0].kind == "empty"


@pytest.mark.parametrize("framing", [CRLF, STX, (b"", b"\r"), (b"#", b"!")])
def test_encode_decode_roundtrip(framing: tuple[bytes, bytes]) -> None:
    d = dec(framing)
    for codes in (["RB123456785GB"], None, ["A1", "B2"]):
        (frame,) = d.feed(encode_frame(codes, framing[0], framing[1], "NoRead", ";"))
        assert isinstance(frame, Frame)
        assert frame.codes == tuple(codes or ())
        assert frame.no_read is (codes is None)


def test_random_garbage_never_raises() -> None:
    import random

    rng = random.Random(7)
    d = dec(STX, max_len=48)
    for _ in range(2000):
        d.feed(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))))
    # and the decoder still decodes a clean frame afterwards
    d.feed(b"\x03")
    events = d.feed(b"\x02RB123456785GB\x03")
    assert events and isinstance(events[-1], Frame) and events[-1].codes == ("RB123456785GB",)
