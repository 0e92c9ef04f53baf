"""What a simulated barcode reader sends for each parcel: its read cycles, and the faults real readers have.

A reader's *read cycle* starts when its photo-eye sees a parcel's leading edge and ends when the
trailing edge leaves (its reading gate); it sends one frame per cycle a few milliseconds later
(``ReaderModel.processing_ms``): the codes it decoded, or its NoRead string. A reader with a
trigger counter increments it at every cycle and puts it in the frame.

Faults (``FAULTS``), each applied to one parcel on one reader:

``skip``        the cycle happens (the counter moves on) but no frame is sent: a trigger overrun,
                a busy decoder.
``duplicate``   the frame is sent twice (a retransmission), 1–5 ms apart.
``delay``       the frame leaves 1–3 parcel pitches late, after the next parcel's frame.
``reorder``     the frame leaves just after the next parcel's frame (output buffer out of order).
``restart``     the reader reboots: a burst of garbage, its counter back to 0, and no cycles for
                ``RESTART_S`` (parcels passing meanwhile are never read).
``eye_miss``    the reader's own photo-eye misses the parcel: no cycle, the counter does not move.
``eye_double``  the reader's photo-eye flickers while the parcel passes: two cycles, two frames
                (the first a NoRead or the same code), the counter moves by two.

Pure and seeded: ``plan_cycles`` takes its randomness from the generator it is given.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FAULTS = ("skip", "duplicate", "delay", "reorder", "restart", "eye_miss", "eye_double")
#: how long a restarting reader is deaf
RESTART_S = 0.3
#: what a rebooting reader prints on its serial port
BOOT_GARBAGE = b"\x00\xff\x1b[0m\r\nREADER BOOT v2.1\r\n\xfe\xfe\x00"


@dataclass(frozen=True)
class ReaderModel:
    """How long after the reading gate closes a reader's frame is on the wire.

    ``tunnel``: a fixed-mount scan tunnel or camera reader with its result at the end of the
    reading gate (the usual setting for multi-read detection): 3–8 ms of processing.
    """

    name: str = "tunnel"
    processing_ms: tuple[float, float] = (3.0, 8.0)


#: the simulator's readers (plans and the identity simulation draw their processing times from it)
TUNNEL = ReaderModel()


@dataclass(frozen=True)
class Cycle:
    """One read cycle: a frame (or none) sent ``at`` seconds after the parcel's trigger."""

    at: float
    codes: tuple[str, ...] | None  # None: the NoRead string
    send: bool = True  # False: the cycle happens but no frame leaves (skip)
    repeat_after: float | None = None  # a duplicate of the frame this long after


def plan_cycles(
    codes: tuple[str, ...] | None, passing_s: float, processing_s: float, pitch_s: float,
    next_frame_at: float, fault: str | None, rng: random.Random,
) -> list[Cycle]:
    """The read cycles of one parcel on one reader.

    ``codes``: what the reader decodes (None: nothing, it sends NoRead); ``passing_s``: how long
    the parcel takes to pass the photo-eye; ``processing_s``: the reader's processing after the
    gate; ``pitch_s``: time to the next parcel's trigger; ``next_frame_at``: when the next parcel's
    frame leaves, from this parcel's trigger.
    """
    at = passing_s + processing_s
    if fault is None:
        return [Cycle(at, codes)]
    if fault == "skip":
        return [Cycle(at, codes, send=False)]
    if fault == "duplicate":
        return [Cycle(at, codes, repeat_after=rng.uniform(0.001, 0.005))]
    if fault == "delay":
        return [Cycle(max(at, next_frame_at) + pitch_s * rng.uniform(0.2, 2.0) + 0.002, codes)]
    if fault == "reorder":
        return [Cycle(max(at, next_frame_at) + 0.001, codes)]
    if fault == "eye_miss":
        return []
    if fault == "eye_double":
        flicker = passing_s * rng.uniform(0.3, 0.7)  # the gate closes early, then opens again
        first = codes if rng.random() < 0.5 else None
        return [Cycle(flicker + processing_s, first), Cycle(at + 0.001, codes)]
    if fault == "restart":
        return []  # the harness sends the garbage and resets the counter
    raise ValueError(f"unknown reader fault {fault!r}; known: {', '.join(FAULTS)}")


def pick_faults(
    n_parcels: int, n_readers: int, faults: list[str], rate: float, seed: int
) -> dict[tuple[int, int], str]:
    """(parcel index, reader index) -> fault, for about ``rate`` of all parcel-reader pairs.

    Seeded on its own generator so that the parcel plan is the same with and without faults. No
    two faults on one reader within three parcels of each other: each stays a fault of its own.
    """
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown reader fault(s) {unknown}; known: {', '.join(FAULTS)}")
    out: dict[tuple[int, int], str] = {}
    if not faults or rate <= 0:
        return out
    rng = random.Random(seed * 7_919 + 17)
    last: dict[int, int] = {}
    for i in range(1, n_parcels - 3):  # the first parcel aligns the readers; the last ones settle
        for r in range(n_readers):
            if rng.random() < rate and i - last.get(r, -10) > 3:
                out[(i, r)] = rng.choice(faults)
                last[r] = i
    return out
