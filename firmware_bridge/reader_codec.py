"""Barcode reader framing: bytes in, frames and framing errors out. Pure; no I/O.

Industrial readers (Cognex, SICK, Datalogic, Honeywell in "serial wedge" mode) send one frame
per read cycle: an optional prefix (``STX`` for STX/ETX framing), the payload, a suffix
(``CR``, ``LF``, ``CRLF`` or ``ETX``). The payload is the decoded code, several codes joined by
the multi-read delimiter, or the configured NoRead string.

A reader can prefix (or suffix) its own trigger counter to every frame, NoRead frames included:
``0042:CP123456789GB`` with ``CounterFormat("prefix", ":")``. The counter is split off before the
NoRead and multi-read rules; a frame that should carry one and does not is a ``counter`` framing
error (never a frame without identity).

The decoder never raises on input. Bytes it cannot use become ``FramingError`` events that say
what was wrong (garbage before a prefix, non-printable bytes, an over-long frame) with a short hex
preview, and decoding resynchronises on the next frame boundary so the next parcel is unharmed.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CounterFormat", "Frame", "FrameDecoder", "FramingError", "encode_frame"]


@dataclass(frozen=True, slots=True)
class CounterFormat:
    """Where a reader puts its trigger counter: ``position`` "prefix" or "suffix", set off from the
    data by ``separator`` (or, with an empty separator, exactly ``width`` digits)."""

    position: str = "prefix"
    separator: str = ":"
    width: int = 0
    modulus: int = 65536

    def split(self, text: str) -> tuple[int, str] | None:
        """(counter, the rest) or None when the frame carries no well-formed counter."""
        if self.separator:
            if self.position == "prefix":
                head, sep, rest = text.partition(self.separator)
                digits = head
            else:
                rest, sep, digits = text.rpartition(self.separator)
            if not sep:
                return None
        elif self.width and len(text) > self.width:
            if self.position == "prefix":
                digits, rest = text[: self.width], text[self.width :]
            else:
                rest, digits = text[: -self.width], text[-self.width :]
        else:
            return None
        digits = digits.strip()
        if not digits.isdigit() or not digits.isascii() or (self.width and len(digits) != self.width):
            return None
        value = int(digits)
        return (value, rest) if value < self.modulus else None

    def join(self, counter: int, text: str) -> str:
        digits = f"{counter % self.modulus:0{self.width}d}"
        return digits + self.separator + text if self.position == "prefix" else text + self.separator + digits


@dataclass(frozen=True, slots=True)
class Frame:
    codes: tuple[str, ...]
    no_read: bool
    raw: bytes
    counter: int | None = None  # the reader's own trigger counter, where it sends one


@dataclass(frozen=True, slots=True)
class FramingError:
    kind: str  # "garbage" | "non_printable" | "overlong" | "empty" | "counter"
    detail: str
    raw: bytes

    def preview(self, limit: int = 32) -> str:
        head = self.raw[:limit].hex(" ")
        return head + (" …" if len(self.raw) > limit else "")


Event = Frame | FramingError


def _printable(data: bytes) -> bool:
    return all(0x20 <= b < 0x7F for b in data)


class FrameDecoder:
    """Incremental decoder for one reader's byte stream."""

    def __init__(
        self,
        prefix: bytes,
        suffix: bytes,
        noread: str,
        delimiter: str,
        max_frame_bytes: int = 256,
        counter: CounterFormat | None = None,
    ) -> None:
        if not suffix:
            raise ValueError("a frame suffix is required")
        self.prefix = prefix
        self.suffix = suffix
        self.noread = noread
        self.delimiter = delimiter
        self.max_frame_bytes = max_frame_bytes
        self.counter = counter
        self._buf = bytearray()
        self._discarding = False  # inside an over-long frame: drop until the next suffix

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        events: list[Event] = []
        while True:
            end = self._buf.find(self.suffix)
            if end < 0:
                if len(self._buf) > self.max_frame_bytes + len(self.prefix):
                    if not self._discarding:
                        events.append(
                            FramingError(
                                "overlong",
                                f"no frame end within {self.max_frame_bytes} bytes; skipping to the next",
                                bytes(self._buf[:64]),
                            )
                        )
                    self._discarding = True
                    # keep a tail that might hold the start of a suffix
                    del self._buf[: len(self._buf) - len(self.suffix) + 1]
                return events
            chunk = bytes(self._buf[:end])
            del self._buf[: end + len(self.suffix)]
            if self._discarding:
                self._discarding = False
                continue
            event = self._frame(chunk)
            if event is not None:
                events.append(event)

    def _frame(self, chunk: bytes) -> Event | None:
        if self.prefix:
            start = chunk.rfind(self.prefix)
            if start < 0:
                return FramingError("garbage", "bytes outside a frame (no prefix)", chunk)
            garbage, chunk = chunk[:start], chunk[start + len(self.prefix) :]
            if garbage.strip():
                # report the garbage, but the frame after it is good
                return self._payload(chunk, garbage)
        return self._payload(chunk, b"")

    def _payload(self, payload: bytes, garbage: bytes) -> Event | None:
        if len(payload) > self.max_frame_bytes:
            return FramingError("overlong", f"frame of {len(payload)} bytes > {self.max_frame_bytes}", payload)
        # Tolerate a stray CR/LF pair around the payload (readers configured with CRLF into LF).
        payload = payload.strip(b"\r\n")
        if not payload:
            if garbage:
                return FramingError("garbage", "bytes outside a frame", garbage)
            return None  # an empty line between frames is harmless
        if not _printable(payload):
            return FramingError("non_printable", "frame holds non-printable bytes", payload)
        text = payload.decode("ascii")
        counter = None
        if self.counter is not None:
            split = self.counter.split(text)
            if split is None:
                return FramingError("counter", f"no {self.counter.position} trigger counter in the frame", payload)
            counter, text = split
        if text.strip() == self.noread:
            return Frame((), True, payload, counter)
        codes = tuple(c.strip() for c in text.split(self.delimiter) if c.strip())
        if not codes:
            return FramingError("empty", "frame holds only delimiters", payload)
        return Frame(codes, False, payload, counter)


def encode_frame(
    codes: list[str] | None, prefix: bytes, suffix: bytes, noread: str, delimiter: str,
    counter: int | None = None, counter_format: CounterFormat | None = None,
) -> bytes:
    """Build the frame a reader would send (used by hw_sim and tests)."""
    body = noread if not codes else delimiter.join(codes)
    if counter is not None:
        body = (counter_format or CounterFormat()).join(counter, body)
    return prefix + body.encode("ascii") + suffix
