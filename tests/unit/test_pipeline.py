"""The middle layer in-process: the parcel task with fakes (deadlines in milliseconds of test time),
record builders against the JSON Schema, and the recorder's order and fallbacks. No wires."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.config import Config, parse_config
from agent.pipeline.decision import Mode, ReaderOutcome, VerdictLookup
from agent.pipeline.parcel import Parcel
from agent.pipeline.parcel_task import ParcelRunner
from agent.pipeline.records import decision_part, parcel_record, result_part
from agent.pipeline.state import LineState
from firmware_bridge import contract as c
from firmware_bridge.errors import LinkError

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs/schemas/parcel.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
CODE = "RB123456785GB"


def config(**sections: Any) -> Config:
    """Two readers and two lanes; ``sections`` replace whole top-level sections."""
    return parse_config({
        "line": {"site": "T", "line": "L1"},
        "controller": {"host": "127.0.0.1"},
        "readers": [{"name": "top", "device": "/dev/null"}, {"name": "side", "device": "/dev/zero"}],
        "lanes": [{"number": 1, "name": "insp", "role": "inspection"},
                  {"number": 2, "name": "rel", "role": "release", "gate": 1}],
        "decision": {"safety_margin_ms": 10},
    } | sections)


class Alarms:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def condition(self, kind: str, active: bool, detail: str, subject: str | None = None) -> None:
        self.seen.append((kind, active))

    def event(self, kind: str, detail: str, **extra: Any) -> None:
        self.seen.append((kind, extra))


class Lanes:
    def __init__(self, ack: c.AckCode = c.AckCode.ACCEPTED, fail: bool = False) -> None:
        self.ack, self.fail = ack, fail
        self.sent: list[tuple[int, int]] = []

    async def command(self, counter: int, seq: int, lane: int, ack_timeout_s: float) -> c.AckCode:
        if self.fail:
            raise LinkError("link down")
        self.sent.append((seq, lane))
        return self.ack


class Verdicts:
    def __init__(self, known: dict[str, str]) -> None:
        self.known = known

    def lookup(self, waybill: str, now: float | None = None) -> VerdictLookup:
        v = self.known.get(waybill)
        return VerdictLookup("hit", v, "v1") if v else VerdictLookup("miss")


def parcel(seq: int = 7, deadline_in_s: float = 0.2, reads: dict[str, ReaderOutcome] | None = None) -> Parcel:
    now = time.monotonic()
    p = Parcel(seq, c.TriggerEntry(seq, 5000 + seq, 150), now, time.time(), now + deadline_in_s)
    if reads is not None:
        p.reads = reads
        p.all_read.set()
    return p


def both_read(code: str = CODE) -> dict[str, ReaderOutcome]:
    return {"top": ReaderOutcome("top", (code,)), "side": ReaderOutcome("side", no_read=True)}


def runner(
    lanes: Lanes, verdicts: Verdicts, ask: Callable[[str, float], Any] | None = None,
) -> tuple[ParcelRunner, LineState, list[tuple[Parcel, dict[str, Any]]], list[Parcel]]:
    state = LineState(config(), Alarms())
    state.problems = ()
    kept: list[tuple[Parcel, dict[str, Any]]] = []
    gave_up: list[Parcel] = []
    r = ParcelRunner(state, lanes, verdicts, give_up=gave_up.append, keep=lambda p, part: kept.append((p, part)),
                     ask=ask)
    return r, state, kept, gave_up


async def test_a_cleared_parcel_is_commanded_to_release_and_its_record_kept() -> None:
    lanes = Lanes()
    r, _, kept, _ = runner(lanes, Verdicts({CODE: "release"}))
    p = parcel(reads=both_read())
    await r.run(p)
    assert lanes.sent == [(7, 2)] and p.ack == "accepted"
    assert kept[0][1]["decision"]["reasons"] == ["release_verdict"]


async def test_reads_not_final_by_the_deadline_are_given_up_and_the_parcel_inspected() -> None:
    lanes = Lanes()
    r, _, kept, gave_up = runner(lanes, Verdicts({CODE: "release"}))
    p = parcel(deadline_in_s=0.05)  # the readers never settle
    t0 = time.monotonic()
    await r.run(p)
    assert gave_up == [p]
    assert time.monotonic() - t0 < 0.05  # it waited no longer than the deadline less the reserve
    assert lanes.sent == [(7, 1)]
    assert "reader_timeout" in kept[0][1]["decision"]["reasons"]


async def test_a_started_parcel_runs_when_its_reads_settle_or_when_the_wait_must_end() -> None:
    lanes = Lanes()
    r, _, kept, gave_up = runner(lanes, Verdicts({CODE: "release"}))
    read, silent = parcel(seq=7, deadline_in_s=0.5), parcel(seq=8, deadline_in_s=0.06)
    r.start(read)
    r.start(silent)
    await asyncio.sleep(0.01)
    assert lanes.sent == [] and not kept  # no reads yet: nothing decided
    read.reads = both_read()
    read.settled()  # the intake's word: every source has answered
    for _ in range(100):
        await asyncio.sleep(0.005)
        if len(kept) == 2:
            break
    assert lanes.sent == [(7, 2), (8, 1)]  # the read one released first; the silent one at its time
    assert gave_up == [silent] and "reader_timeout" in kept[1][1]["decision"]["reasons"]
    assert read.when_read is None and silent.when_read is None


async def test_a_waiting_parcel_of_an_old_session_does_not_touch_a_new_one_with_the_same_sequence() -> None:
    lanes = Lanes()
    r, _, kept, _ = runner(lanes, Verdicts({CODE: "release"}))
    old, new = parcel(seq=9, deadline_in_s=0.06), parcel(seq=9, deadline_in_s=0.5)  # a controller restart
    r.start(old)
    r.start(new)
    await asyncio.sleep(0.1)  # the old one's wait ends: it is decided (inspection), once
    assert lanes.sent == [(9, 1)]
    new.reads = both_read()
    new.settled()
    await asyncio.sleep(0.05)
    assert lanes.sent == [(9, 1), (9, 2)] and len(kept) == 2  # the new one once, when read
    await asyncio.sleep(0.5)
    assert len(lanes.sent) == 2  # and its own wait's end, cancelled, runs nothing more


async def test_a_lookup_slower_than_the_deadline_is_a_timeout_and_inspection() -> None:
    asked: list[float] = []

    async def slow_ask(waybill: str, timeout_s: float) -> VerdictLookup:
        asked.append(timeout_s)
        await asyncio.sleep(timeout_s)
        return VerdictLookup("timeout")

    lanes = Lanes()
    r, _, kept, _ = runner(lanes, Verdicts({}), ask=slow_ask)
    p = parcel(deadline_in_s=0.08, reads=both_read())
    await r.run(p)
    assert asked and asked[0] <= 0.08 - 0.01 - 0.02 + 0.001  # the margin and the reserve kept back
    assert lanes.sent == [(7, 1)] and "verdict_timeout" in kept[0][1]["decision"]["reasons"]


async def test_too_late_to_command_leaves_the_parcel_to_the_controller() -> None:
    lanes = Lanes()
    r, _, kept, _ = runner(lanes, Verdicts({CODE: "release"}))
    p = parcel(deadline_in_s=0.0, reads=both_read())
    await r.run(p)
    assert lanes.sent == [] and p.ack == "not_sent_late"
    assert kept[0][1]["decision"]["lane_class"] == "inspection" and "late" in kept[0][1]["decision"]["reasons"]


async def test_a_failed_link_is_recorded_and_nothing_is_released() -> None:
    r, state, kept, _ = runner(Lanes(fail=True), Verdicts({CODE: "release"}))
    p = parcel(reads=both_read())
    await r.run(p)
    assert p.ack == "link_error" and kept[0][1]["command"]["ack"] == "link_error"


@pytest.mark.parametrize("mode,problems,reason", [
    (Mode.INSPECT_ALL, (), "mode_inspect_all"), (Mode.NORMAL, ("jam",), "line_unhealthy"),
])
async def test_mode_and_health_are_read_at_the_decision(mode: Mode, problems: tuple[str, ...], reason: str) -> None:
    lanes = Lanes()
    r, state, kept, _ = runner(lanes, Verdicts({CODE: "release"}))
    state.mode, state.problems = mode, problems
    await r.run(parcel(reads=both_read()))
    assert lanes.sent == [(7, 1)] and reason in kept[0][1]["decision"]["reasons"]


async def test_records_match_the_published_schema() -> None:
    lanes = Lanes()
    r, _, kept, _ = runner(lanes, Verdicts({CODE: "release"}))
    p = parcel(reads={"top": ReaderOutcome("top", (CODE,), counter=4711),
                      "side": ReaderOutcome("side", problem="ambiguous")})
    await r.run(p)
    part = kept[0][1]
    entry = c.ResultEntry(3, 7, p.trigger.encoder, 1, 1, int(c.Disposition.SORTED))
    for rec in (
        parcel_record("T", "L1", "abc", 7, p.trigger.encoder, part, result_part(entry)),
        parcel_record("T", "L1", "abc", 8, 99, None, result_part(None)),  # nobody decided it
    ):
        VALIDATOR.validate(rec)
    assert part["reads"][1]["problem"] == "ambiguous" and part["decision"]["reasons"] == ["read_ambiguous"]
    assert decision_part(parcel(), ["top"], None)["decision"] is None  # undecided: no decision half


async def test_records_queued_together_are_committed_together_and_one_by_one_near_the_budget(
    tmp_path: Path,
) -> None:
    from agent.central.outbox import Outbox, OutboxPublisher
    from agent.pipeline.recorder import Recorder

    outbox = Outbox(tmp_path / "o.sqlite", max_records=4)
    state = LineState(config(), Alarms())
    recorder = Recorder(state, OutboxPublisher(outbox, lambda topic, payload: None), "cfg")
    commits: list[int] = []
    add_many = outbox.add_many

    async def counted(entries: Any) -> Any:
        commits.append(len(entries))
        return await add_many(entries)

    outbox.add_many = counted  # type: ignore[method-assign]
    task = asyncio.create_task(recorder.run())
    try:
        for i in range(3):
            recorder.queue_message(f"r{i}", "findings", b'{"n": %d}' % i)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if outbox.count() == 3:
                break
        assert outbox.count() == 3 and commits == [3]  # three queued in one turn: one transaction
        for i in range(3, 6):
            recorder.queue_message(f"r{i}", "findings", b'{"n": %d}' % i)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not state.outbox_ok:
                break
        # the three do not fit whole; one at a time, the first does, the next waits (releases stop)
        assert outbox.count() == 4 and commits[1:4] == [3, 1, 1] and not state.outbox_ok
        assert [row[1] for row in outbox.fetch_after(0, 10)] == ["sortgate/T/L1/findings"] * 4
    finally:
        task.cancel()
        outbox.close()


async def test_a_frame_waiting_for_the_poll_past_its_window_close_does_not_spin_the_loop() -> None:
    """The controller's polls stop (a link down, say) while a reader frame waits for the horizon:
    the intake sets no timer that could not close anything (it used to fire at once, again and
    again, until a poll came)."""
    from agent.pipeline.intake import Intake
    from firmware_bridge.reader_codec import Frame

    state = LineState(config(), Alarms())
    state.identity = c.Identity(c.MAGIC, 1, 2, (1, 0, 0), 1000, 4, 4, 500, 16, 64, 3000, 1)
    started: list[Parcel] = []
    intake = Intake(state, None, started.append)
    now = time.monotonic()
    intake.new_session(now - 1.0)
    intake.on_trigger(c.TriggerEntry(5, 1000, 0), 1000, 3000.0, now, now, now - 0.02)  # unmeasured
    intake.on_poll(now, now, now - 0.02, 1000, 3000.0)
    ticks = 0
    tick = intake.tick

    def counted(t: float) -> None:
        nonlocal ticks
        ticks += 1
        tick(t)

    intake.tick = counted  # type: ignore[method-assign]
    intake.on_reader_event("top", Frame(("RB123456785GB",), False, b"RB123456785GB"), now + 0.05)  # no poll follows
    await asyncio.sleep(0.5)  # every window of the parcel has closed on the clock meanwhile
    assert ticks <= 3
    assert not started[0].all_read.is_set()  # the held frame waits; the parcel's own deadline ends the wait


def test_a_trailing_edge_told_late_is_placed_between_the_polls_around_it() -> None:
    """The poller hands over a passed edge late (with a reader frame's poll, or when its windows close):
    the polls since the last one taken place it where it passed, not where the loop learns of it."""
    from agent.pipeline.intake import Intake

    state = LineState(config(), Alarms())
    state.identity = c.Identity(c.MAGIC, 1, 2, (1, 0, 0), 1000, 4, 4, 500, 16, 64, 3000, 1)
    intake = Intake(state, None, lambda p: None)
    t0 = 100.0
    intake.new_session(t0 - 1.0)
    polls = [(t0 + 0.02 * k, t0 + 0.02 * k + 0.001, 1000 + 60 * k) for k in range(8)]  # 3 m/s
    intake.on_trigger(c.TriggerEntry(5, 1000, 300), 1000, 3000.0, *polls[0][:2], t0 - 0.02)  # 300 mm long
    intake.on_poll(polls[0][0], polls[0][1], t0 - 0.02, 1000, 3000.0, polls[:1])
    assert intake.trailing_edges() == (1300,)
    intake.on_poll(polls[7][0], polls[7][1], polls[6][0], polls[7][2], 3000.0, polls)  # told two polls late
    opens, closes = intake.matcher._by_seq[5].windows["top"]
    # the edge passed at 100.100 (encoder 1300), between the polls sent at 100.08 and answered at 100.101
    assert 100.08 - 0.01 <= opens <= 100.100 + 0.001
    assert 100.100 + 0.040 <= closes <= 100.101 + 0.040
    assert intake.trailing_edges() == ()
    # the poller asks for its handover when the windows close: the same moment, from the same poll
    assert intake.edge_close(polls[5][1], polls[4][0], 0, 3000.0) == pytest.approx(closes)


def test_a_frame_early_in_its_window_is_tied_when_the_poll_that_placed_the_edge_answered_slowly() -> None:
    """The poll that first shows a trailing edge passed went out 0.3 ms after the edge and its
    answer was noted 12 ms later (a loaded I/O thread). The controller read the encoder when the
    request came in; the window must start from then, not from the late answer, or the reader's
    frame, 3 ms after the edge, falls before its own window opens and the parcel times out."""
    from agent.pipeline.intake import Intake
    from firmware_bridge.reader_codec import Frame

    cfg = config(
        controller={"host": "127.0.0.1", "trigger_publish_ms": 1},
        readers=[{"name": "top", "device": "/dev/null", "window_ms": [2, 16], "window_from": "trailing_edge"}],
    )
    state = LineState(cfg, Alarms())
    state.identity = c.Identity(c.MAGIC, 1, 2, (1, 0, 0), 1000, 4, 4, 500, 16, 64, 3000, 1)
    started: list[Parcel] = []
    intake = Intake(state, None, started.append)
    t0 = 100.0
    intake.new_session(t0 - 1.0)
    # the belt: 3000 counts/s, encoder 1000 at t0 (the trigger); a 300 mm parcel's edge passes at t0 + 0.1
    intake.on_trigger(c.TriggerEntry(5, 1000, 300), 1000, 3000.0, t0 + 0.0002, t0 + 0.0012, t0 - 0.02)
    intake.on_poll(t0 + 0.0002, t0 + 0.0012, t0 - 0.02, 1000, 3000.0, [(t0 + 0.0002, t0 + 0.0012, 1000)])
    intake.on_poll(t0 + 0.08, t0 + 0.081, t0 + 0.0002, 1240, 3000.0, [(t0 + 0.0002, t0 + 0.0012, 1000),
                                                                      (t0 + 0.08, t0 + 0.081, 1240)])
    intake.on_reader_event("top", Frame((CODE,), False, CODE.encode()), t0 + 0.103)
    slow = (t0 + 0.1003, t0 + 0.1123, 1300)  # sent just after the edge, answered 12 ms later
    intake.on_poll(slow[0], slow[1], t0 + 0.08, slow[2], 3000.0, [(t0 + 0.08, t0 + 0.081, 1240), slow])
    nxt = (t0 + 0.12, t0 + 0.121, 1360)
    intake.on_poll(nxt[0], nxt[1], slow[0], nxt[2], 3000.0, [slow, nxt])  # its horizon resolves the frame
    intake.tick(t0 + 0.2)
    read = started[0].reads["top"]
    assert read.codes == (CODE,) and not read.timed_out and read.problem is None, read


async def test_an_image_is_checked_from_the_moment_it_is_tied_not_after_the_reads() -> None:
    """The scanner's image comes ~100 ms after the trigger, the readers' frames later: the check
    starts when the image is tied to its parcel, so it has the whole time to the deadline."""
    from concurrent.futures import Future

    from agent.pipeline.intake import Intake

    class Vision:
        def __init__(self) -> None:
            self.started: list[Any] = []

        def start(self, image: Any) -> Future[Any]:
            self.started.append(image)
            return Future()

        def discard(self, image: Any) -> None:
            pass

    cfg = config(
        readers=[{"name": "top", "device": "/dev/null"}],
        vision={"mode": "required", "folder": "/scan", "name_seq_regex": r"seq(?P<seq>\d+)-"},
    )
    state = LineState(cfg, Alarms())
    state.identity = c.Identity(c.MAGIC, 1, 2, (1, 0, 0), 1000, 4, 4, 500, 16, 64, 3000, 1)
    vision = Vision()
    started: list[Parcel] = []
    intake = Intake(state, vision, started.append)  # type: ignore[arg-type]
    now = time.monotonic()
    intake.new_session(now - 1.0)
    intake.on_trigger(c.TriggerEntry(5, 1000, 300), 1000, 3000.0, now, now, now - 0.02)
    p = started[0]
    intake.on_image("/scan/seq00005-00000001.png", now + 0.1)
    assert vision.started == ["/scan/seq00005-00000001.png"] and p.image_started is not None
    assert not p.all_read.is_set()  # the reader has not read yet
    intake.on_image("/scan/seq00005-00000002.png", now + 0.12)  # a second image: late, never checked
    assert len(vision.started) == 1
