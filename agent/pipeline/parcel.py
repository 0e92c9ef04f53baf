"""The Parcel: everything known about one trigger while it is in flight, from trigger to record.

On its own so that intake, the parcel task and the recorder can all use it without importing
each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from agent.pipeline.decision import Decision, Mode, ReaderOutcome, VerdictLookup
from firmware_bridge import contract as c

if TYPE_CHECKING:  # OpenCV and LiteRT load only on lines that run the image check
    from concurrent.futures import Future

    from agent.vision.check import ImageResult

__all__ = ["AckStatus", "Parcel", "decision_key"]

#: what became of the lane command: the controller's acknowledgement (``c.AckCode`` names, lower
#: case), or not sent because it was too late, or the link failed
AckStatus = Literal[
    "none", "accepted", "late", "unknown_seq", "bad_lane", "watchdog", "maintenance", "not_sent_late", "link_error"
]


@dataclass
class Parcel:
    seq: int
    trigger: c.TriggerEntry
    seen_at: float  # monotonic
    seen_wall: float
    deadline: float  # monotonic time the parcel reaches the decision point
    reads: dict[str, ReaderOutcome] = field(default_factory=dict)
    last_input_at: float = 0.0
    read_settled: bool = False  # every reader has given its final answer
    all_read: asyncio.Event = field(default_factory=asyncio.Event)
    when_read: Callable[[Parcel], None] | None = None  # called once, when ``settled`` sets all_read
    verdict: VerdictLookup | None = None
    decision: Decision | None = None
    decided_at: float | None = None
    lane: int | None = None
    rule: str | None = None  # the sort plan's rule that placed it (None: inspection by default)
    overflowed: bool = False  # placed in an overflow lane: its rule's first lane was full or disabled
    plan_version: int | None = None
    rounds: int = 0  # times it has gone round the recirculation loop before this pass
    prev_seq: int = 0  # the trigger of its previous pass (contract 1.3), 0: a first pass
    ack: AckStatus | None = None  # "none": no acknowledgement in time
    command_at: float | None = None
    line_problems: tuple[str, ...] = ()
    mode: Mode = Mode.NORMAL
    part: dict[str, Any] | None = None  # the decision half of the record, once decided
    image_path: Any = None  # the matched X-ray image (a path, or a frame from a capture source)
    image_done: bool = False  # the image source has answered (an image, or a time-out)
    image_started: Future[ImageResult] | None = None  # its check, begun when the image was tied
    image: ImageResult | None = None
    image_kept: str | None = None

    def settled(self) -> None:
        """Every source has given its final answer: set ``all_read`` and call ``when_read`` (once)."""
        self.all_read.set()
        when, self.when_read = self.when_read, None
        if when is not None:
            when(self)

    @property
    def key(self) -> str:
        return decision_key(self.seq, self.trigger.encoder)


def decision_key(seq: int, encoder: int) -> str:
    """A parcel's identity on this line: its trigger sequence and captured encoder count."""
    return f"{seq}:{encoder}"
