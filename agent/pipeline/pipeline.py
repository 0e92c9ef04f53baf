"""The parcel pipeline: intake -> parcel task -> recorder, sharing one ``LineState``.

This is what the rest of the agent talks to. The controller supervisor feeds it triggers, polls
and results; the reader ports and the image source feed it inputs; the runtime starts its
recorder and asks it for health. Everything runs on the event loop; nothing here blocks (verdict
look-ups are primary-key reads, inference and SQLite commits run on their own threads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.central.outbox import OutboxPublisher
from agent.config import Config
from agent.pipeline.intake import Intake
from agent.pipeline.parcel_task import ParcelRunner
from agent.pipeline.recorder import Recorder
from agent.pipeline.state import AlarmSink, LaneCommander, LineState, Metrics, VerdictAsk, VerdictSource

if TYPE_CHECKING:  # OpenCV and LiteRT load only on lines that run the image check
    from agent.vision.check import VisionCheck

__all__ = ["Pipeline"]


class Pipeline:
    def __init__(
        self,
        cfg: Config,
        alarms: AlarmSink,
        lanes: LaneCommander,
        verdicts: VerdictSource,
        publisher: OutboxPublisher,
        config_hash: str,
        vision: VisionCheck | None = None,
        ask: VerdictAsk | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.state = LineState(cfg, alarms, metrics or Metrics())
        self.recorder = Recorder(self.state, publisher, config_hash)
        self.intake = Intake(self.state, vision, start_parcel=lambda p: self.runner.start(p))
        self.runner = ParcelRunner(
            self.state, lanes, verdicts, give_up=self.intake.give_up, keep=self.recorder.keep,
            vision=vision, ask=ask,
        )
        # the controller supervisor's entry points
        self.on_trigger = self.intake.on_trigger
        self.on_poll = self.intake.on_poll
        self.on_result = self.recorder.on_result
        self.results_lost = self.recorder.results_lost
        self.result_cursor = self.recorder.cursor
        self.controller_boot = self.recorder.boot
        self.mark_results = self.recorder.mark

    def new_session(self, known_since: float, ack_counter: int) -> None:
        """A controller session starts: triggers before ``known_since`` may be unknown, and the
        next lane command continues from the controller's ACK_COUNTER, so that it is always a
        change (a restarted agent starting again at 1 could repeat the last counter it wrote)."""
        self.intake.new_session(known_since)
        self.runner.continue_from(ack_counter)

    async def controller_restarted(self, boot: int) -> int:
        """The controller restarted (power cycle, program restart): no command may reach a new
        parcel that carries an old parcel's sequence number, so every parcel task ends first;
        then each parcel in flight gets its record (``no_result``), and all that was known about
        the old sequences is forgotten. Returns how many parcels were recorded so."""
        await self.runner.stop()
        self.intake.forget()
        return self.recorder.controller_restarted(boot)

    def set_lane_full(self, bits: int, per_lane: bool) -> None:
        self.state.set_lane_full(bits, per_lane)

    def set_problems(self, problems: tuple[str, ...]) -> None:
        self.state.set_problems(problems)

    def housekeeping(self, now: float) -> None:
        """Periodic: close read windows, record parcels whose result never came."""
        self.intake.tick(now)
        self.recorder.sweep(now)

    async def stop(self) -> None:
        """A clean stop: cancel parcels in flight (the controller defaults them) and let the
        decisions being saved reach the disk before the stores close."""
        await self.runner.stop()
        await self.recorder.drain()
