"""Triggers, reader frames and X-ray images become one parcel's inputs.

The controller supervisor hands each new trigger (``on_trigger``) and each poll it takes
(``on_poll``: the encoder and the polls since the last one taken, so trailing edges can be
placed, and the horizon of known triggers; it has the poller watch the awaited trailing edges,
``trailing_edges``, and asks for the poll that lets held inputs resolve, ``ask_poll`` and
``wanted_poll``); the reader ports hand
frames (``on_reader_event``), the image source images (``on_image``). ``Matcher`` (pure) decides
which input belongs to which trigger; its outcomes land on the parcel (``Parcel.reads``,
``image_path``) and, once every source has answered, wake the parcel's task (``Parcel.all_read``).
What the matcher notices (orphans, ambiguities, counter faults) is counted, logged and alarmed.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent.pipeline.decision import ReaderOutcome
from agent.pipeline.matching import Capture, Matcher, Note, Outcome, SourceSpec, capture_interval
from agent.pipeline.parcel import Parcel
from agent.pipeline.state import LineState
from firmware_bridge import contract as c
from firmware_bridge.poller import EDGE_PAST_MAX
from firmware_bridge.reader_codec import Event, FramingError

if TYPE_CHECKING:  # OpenCV and LiteRT load only on lines that run the image check
    from agent.vision.check import VisionCheck

#: how long after a read window's close the intake's timer ticks (the close itself must be past)
CLOSE_STEP_S = 0.0005

log = structlog.get_logger("sortgate.intake")

__all__ = ["IMAGE_SOURCE", "Intake"]

#: the matcher's name for the X-ray image export, beside the readers' names
IMAGE_SOURCE = "xray"
#: the alarm event each kind of matcher note raises
_NOTE_ALARMS = {
    "orphan": "reader_frame_unmatched",
    "conflict": "reader_frame_unmatched",
    "mismatch": "reader_frame_unmatched",
    "late": "reader_frame_unmatched",
    "ambiguous": "reader_frame_unmatched",
    "counter_gap": "reader_counter_gap",
    "counter_reset": "reader_counter_reset",
    "duplicate": "reader_frame_repeated",
}


class Intake:
    def __init__(
        self, state: LineState, vision: VisionCheck | None, start_parcel: Callable[[Parcel], None]
    ) -> None:
        cfg = state.cfg
        self.state = state
        self.vision = vision
        self._start_parcel = start_parcel
        sources = [
            SourceSpec(
                r.name, r.window_ms[0] / 1000, r.window_ms[1] / 1000, r.window_from,
                r.counter.modulus if r.counter else None,
            )
            for r in cfg.readers
        ]
        # images named with the trigger sequence are matched exactly; others by their time window
        self.image_seq = re.compile(cfg.vision.name_seq_regex) if cfg.vision.name_seq_regex else None
        self._early_images: dict[int, tuple[Any, float]] = {}
        if vision is not None and self.image_seq is None:
            sources.append(SourceSpec(IMAGE_SOURCE, 0.0, cfg.vision.window_ms / 1000, "leading_edge"))
        self.max_parcel_m = cfg.line.max_parcel_mm / 1000
        self._sources = sources
        self.matcher = Matcher(sources, max_pass_s=1.0)
        # the shortest span from a trailing edge to its windows' close (None: no such window)
        self._edge_window_s = min((s.max_s for s in sources if s.anchor == "trailing_edge"), default=None)
        self.publish_s = cfg.controller.trigger_publish_ms / 1000
        self.trigger_hooks: list[Callable[[], None]] = []  # e.g. a capture source grabbing a frame
        self._trailing: dict[int, int] = {}  # seq -> encoder count at which its trailing edge passes
        # asks the controller link for a poll sent at (or after) the given time, and handed over:
        # an input waits to learn which triggers exist
        self.ask_poll: Callable[[float], None] = _no_poll
        self._close_timer: asyncio.TimerHandle | None = None  # wakes tick() when a window closes
        self._close_at = float("inf")

    def new_session(self, known_since: float) -> None:
        """A controller session starts: triggers captured before ``known_since`` may never be
        seen (they were in the ring before this session read its head)."""
        self.matcher.new_session(known_since)
        self._trailing.clear()

    def forget(self) -> None:
        """The controller restarted: its sequences start again, so nothing known about the old
        ones (triggers, windows, reader counter alignments, early images) may touch a new one."""
        self.matcher = Matcher(self._sources, max_pass_s=1.0)
        self._trailing.clear()
        self._early_images.clear()

    def on_trigger(
        self, entry: c.TriggerEntry, encoder_now: int, speed_cps: float, sent: float, now: float,
        captured_after: float,
    ) -> None:
        """A new trigger, shown by the poll sent at ``sent`` and answered at ``now`` (whose encoder
        is ``encoder_now``); it was captured after ``captured_after`` (the moment the previous
        status poll was sent, which did not show it yet)."""
        ident = self.state.identity
        assert ident is not None
        travelled = c.encoder_delta(entry.encoder, encoder_now)
        remaining = ident.decision_distance_counts - travelled
        deadline = now + remaining / max(speed_cps, 1.0)
        p = Parcel(entry.seq, entry, now, time.time(), deadline, last_input_at=now)
        if entry.prev_seq:  # back from the recirculation loop (contract 1.3)
            p.prev_seq, p.rounds = entry.prev_seq, self.state.returned(entry.prev_seq)
        self.state.parcels[entry.seq] = p
        self.state.metrics.count("triggers")
        for hook in self.trigger_hooks:
            hook()
        if speed_cps > 0:  # the longest parcel's passing time bounds windows of unmeasured parcels
            self.matcher.max_pass_s = max(self.max_parcel_m * ident.counts_per_metre / speed_cps, 0.05)
        lo, hi = capture_interval(sent, now, captured_after - self.publish_s, travelled, speed_cps, self.publish_s)
        self.matcher.add_trigger(Capture(entry.seq, lo, hi, measured=entry.length_mm > 0))
        if entry.length_mm > 0:  # its trailing edge leaves the photo-eye at this encoder count
            self._trailing[entry.seq] = (entry.encoder + entry.length_mm * ident.counts_per_metre // 1000) \
                & 0xFFFFFFFF
        if self.image_seq is not None:
            early = self._early_images.pop(entry.seq, None)
            if early is not None:
                self._attach_image(p, *early)
        self._settle(p)
        self._start_parcel(p)
        self._arm()

    def give_up(self, p: Parcel) -> None:
        """The parcel must be decided now: a read not final by now is not trusted."""
        self._apply(self.matcher.give_up(p.seq))
        p.image_done = True

    def on_reader_event(self, reader: str, event: Event, t: float) -> None:
        if isinstance(event, FramingError):
            self.state.metrics.count(f"reader_error_{event.kind}")
            log.warning(
                "reader framing error, skipped", reader=reader, kind=event.kind,
                detail=event.detail, bytes=event.preview(),
            )
            self.state.alarms.event(
                "reader_framing_error", f"reader {reader}: {event.kind}: {event.detail}", subject=reader
            )
            return
        self._offer(reader, event, t, event.counter)

    def on_image(self, image: Any, t: float) -> None:
        """An X-ray image (a file path or a frame) from the image source."""
        if self.image_seq is None:
            self._offer(IMAGE_SOURCE, image, t, None)
            return
        m = self.image_seq.search(Path(image).name) if isinstance(image, str) else None
        if m is None:
            self.state.metrics.count("image_orphans")
            log.warning("image name carries no trigger sequence; not used", image=str(image))
            self._discard(image)
            return
        seq = int(m.group("seq"))
        p = self.state.parcels.get(seq)
        if p is None:  # the poll has not seen its trigger yet: keep it briefly, and poll at once
            self._early_images[seq] = (image, t)
            self.ask_poll(t)
            return
        self._attach_image(p, image, t)

    def _offer(self, source: str, item: Any, t: float, counter: int | None) -> None:
        """An input for the matcher; if it waits to learn which triggers exist, poll at once."""
        self._apply(self.matcher.add_frame(source, item, t, counter))
        if (at := self.wanted_poll()) is not None:
            self.ask_poll(at)
        self._arm()

    def _attach_image(self, p: Parcel, image: Any, t: float) -> None:
        if p.decision is not None or p.image_done:
            self.state.metrics.count("image_late")
            log.warning("image arrived after the parcel was decided; not used", seq=p.seq, image=str(image))
            self._discard(image)
            return
        self._tie_image(p, image)
        p.last_input_at = max(p.last_input_at, t)
        self._settle(p)

    def _tie_image(self, p: Parcel, image: Any) -> None:
        """The parcel's image source has answered: ``image`` (None: no image). The check begins
        now, while the readers may still be reading, so it gets the whole time to the deadline."""
        p.image_path, p.image_done = image, True
        if image is not None and self.vision is not None:
            p.image_started = self.vision.start(image)

    def on_poll(
        self, sent: float, now: float, prev_sent: float, encoder: int, speed_cps: float,
        history: Sequence[tuple[float, float, int]] = (),
    ) -> None:
        """A status poll sent at ``sent`` returned at ``now`` (its triggers already handed over):
        place the trailing edges that have passed, and every trigger captured before ``sent`` is
        known. ``history``: (sent, seen, encoder) of the polls since the last one taken (that one
        first, this one last): an edge is placed between the poll before the first that shows it
        passed and that poll, however much later the loop is told."""
        for seq, target in list(self._trailing.items()):
            past = c.encoder_delta(target, encoder)
            if past < 0:
                if past < -EDGE_PAST_MAX:  # a controller restart left it behind: forget it
                    del self._trailing[seq]
                continue
            del self._trailing[seq]
            after, shown, seen, past = _first_past(target, history, (prev_sent, sent, now, past))
            self.matcher.set_trailing(seq, *self._edge_interval(after, shown, seen, past, speed_cps))
        self.matcher.set_horizon(sent - self.publish_s)
        self.tick(now)
        self._arm()

    def wanted_poll(self) -> float | None:
        """When the poll that lets the first held input resolve must be sent (a poll sent at
        ``sent`` shows every trigger captured before ``sent - trigger_publish_ms``); None when no
        input waits. For a window from the trailing edge that is a little after the frame, so a
        poll at once would not do."""
        need = self.matcher.wanted_horizon()
        return None if need is None else need + self.publish_s

    def trailing_edges(self) -> tuple[int, ...]:
        """The encoder counts at which awaited trailing edges leave the photo-eye (the poller
        watches for them: a poll that shows one passed is handed over by ``edge_close``)."""
        return tuple(self._trailing.values())

    def edge_close(self, seen: float, prev_sent: float, past: int, speed_cps: float) -> float:
        """When the read windows that start at a trailing edge close, for the poll that first shows
        the edge passed (answered at ``seen``, the poll before it sent at ``prev_sent``, ``past``
        counts beyond it): the poll handed over then closes them (``on_poll`` places the edge from
        the same poll). ``seen`` without such windows. Pure: the poller calls it on its thread."""
        if self._edge_window_s is None:
            return seen
        # the interval's end does not depend on when that poll was sent (its start does)
        return self._edge_interval(prev_sent, seen, seen, past, speed_cps)[1] + self._edge_window_s

    def _edge_interval(
        self, after: float, sent: float, seen: float, past: int, speed_cps: float
    ) -> tuple[float, float]:
        """When a trailing edge left the photo-eye: between the poll sent at ``after`` (which did
        not show it yet) and the answer at ``seen`` to the first that did (sent at ``sent``),
        ``past`` counts ago."""
        return capture_interval(sent, seen, after - self.publish_s, past, speed_cps, self.publish_s)

    def tick(self, now: float) -> None:
        """Periodic: close read windows (and drop images that found no parcel)."""
        self._apply(self.matcher.advance(now))
        for seq, (image, t) in list(self._early_images.items()):
            if now - t > 1.0:
                del self._early_images[seq]
                self.state.metrics.count("image_orphans")
                log.warning("image matched no parcel", seq=seq, image=str(image))
                self._discard(image)

    def _arm(self) -> None:
        """Wake ``tick`` just after the earliest open read window closes, so that a parcel whose
        reads are all in is decided then, not at the next controller poll: the poll can stay slow
        while nothing new arrives (a frame or an image asks for a poll of its own). Without a
        running event loop (pure unit tests) the caller's ticks are the only clock."""
        at = self.matcher.next_close()
        if at is None or at >= self._close_at:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._close_at = at
        # the loop's clock is time.monotonic(), the matcher's clock: a window is over once the
        # clock has passed its close, hence the small step past it
        self._close_timer = loop.call_at(at + CLOSE_STEP_S, self._on_close)

    def _on_close(self) -> None:
        self._close_timer, self._close_at = None, float("inf")
        self.tick(time.monotonic())
        self._arm()

    def _discard(self, image: Any) -> None:
        if self.vision is not None and self.state.cfg.vision.consume:
            self.vision.discard(image)

    def _settle(self, p: Parcel) -> None:
        """Wake the parcel's task once every source has answered."""
        if not p.read_settled and not self.matcher.expect(p.seq):
            p.read_settled = True
        if p.read_settled and (p.image_done or self.vision is None or self.image_seq is None):
            p.settled()

    def _apply(self, events: Sequence[Outcome | Note]) -> None:
        for ev in events:
            if isinstance(ev, Note):
                self._note(ev)
                continue
            p = self.state.parcels.get(ev.seq)
            if p is None or p.decision is not None:
                if ev.source == IMAGE_SOURCE and ev.payload is not None:
                    self._discard(ev.payload)
                continue
            if ev.source == IMAGE_SOURCE:
                self._tie_image(p, ev.payload)  # None unless an image was tied to it
            else:
                frame = ev.payload if ev.status == "read" else None
                p.reads[ev.source] = ReaderOutcome(
                    ev.source,
                    frame.codes if frame is not None else (),
                    no_read=frame.no_read if frame is not None else False,
                    timed_out=ev.status == "timed_out",
                    problem="unmatched" if ev.unmatched else (
                        ev.status if ev.status in ("ambiguous", "conflict") else None
                    ),
                    counter=ev.counter,
                )
            if ev.t_frame is not None:
                p.last_input_at = max(p.last_input_at, ev.t_frame)
            self._settle(p)

    def _note(self, note: Note) -> None:
        if note.kind == "aligned":
            self.state.metrics.count(f"reader_aligned_{note.source}")
            log.info("reader counter aligned", reader=note.source, detail=note.detail)
            return
        if note.kind in ("unmatched", "matched"):
            self.state.alarms.condition("reader_unmatched", note.kind == "unmatched",
                                        f"reader {note.source}: {note.detail}", subject=note.source)
            return
        self.state.metrics.count(f"reader_{note.kind}")
        if note.source == IMAGE_SOURCE:
            if note.payload is not None:
                self._discard(note.payload)
            log.warning("image not tied to a parcel", kind=note.kind, seqs=list(note.seqs), detail=note.detail)
            return
        payload = getattr(note.payload, "raw", note.payload)
        log.warning(
            "reader frame not tied to a parcel" if note.kind in ("orphan", "ambiguous", "mismatch", "conflict", "late",
                                                                  "counter_reset")
            else "reader fault", reader=note.source, kind=note.kind, seqs=list(note.seqs), detail=note.detail,
            frame=repr(payload)[:120] if payload is not None else None,
        )
        alarm = _NOTE_ALARMS.get(note.kind)
        if alarm:
            self.state.alarms.event(alarm, f"reader {note.source}: {note.detail}", subject=note.source,
                                    reason=note.kind)


def _no_poll(at: float) -> None:
    """Without a controller session there is no poll to ask for."""


def _first_past(
    target: int, history: Sequence[tuple[float, float, int]], this: tuple[float, float, float, int],
) -> tuple[float, float, float, int]:
    """The first poll in ``history`` (sent, seen, encoder) that shows ``target`` passed: when the
    poll before it was sent, when it was sent and answered, and how far past it the encoder was
    then. ``this``: the same for the poll being taken, when ``history`` is empty."""
    for i in range(1, len(history)):
        past = c.encoder_delta(target, history[i][2])
        if past >= 0:
            return history[i - 1][0], history[i][0], history[i][1], past
    if history:  # passed by the poll taken before (a history cut short): the encoder's word alone
        return float("-inf"), history[0][0], history[0][1], c.encoder_delta(target, history[0][2])
    return this
