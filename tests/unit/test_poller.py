"""The status poller's choices (firmware_bridge.poller), on status blocks built here: which polls
the event loop is woken for, when the next poll is sent, and when the heartbeat may go on."""

from __future__ import annotations

import struct
from typing import Any

from firmware_bridge import contract as c
from firmware_bridge.poller import FROZEN_S, RESULT_BATCH, RESULT_DELAY_S, Poll, Poller, SpeedEstimator


def block(**regs: int) -> bytes:
    """A status block (POLL_BASE.., big-endian) with the given registers; encoder as a u32."""
    values = [0] * c.POLL_LEN
    values[c.REG_STATUS_BITS - c.POLL_BASE] = int(c.StatusBit.BELT_RUNNING)
    for name, value in regs.items():
        if name == "encoder":
            values[c.REG_ENCODER - c.POLL_BASE:c.REG_ENCODER - c.POLL_BASE + 2] = c.split_u32(value)
        else:
            values[getattr(c, f"REG_{name.upper()}") - c.POLL_BASE] = value
    return struct.pack(f">{c.POLL_LEN}H", *values)


class Line:
    """A poller fed polls at 20 ms, with what it hands over collected."""

    def __init__(self, **kw: Any) -> None:
        self.got: list[Poll] = []
        self.result_reads: list[list[int]] = []  # the RSEQs the poller read results for
        self.poller = Poller(
            idle_s=0.02, min_gap_s=0.005, heartbeat_s=0.1, heartbeat=7, speed=SpeedEstimator(),
            results_read=0, prev_sent=0.0, deliver=self.got.append, read_results=self.read_results, **kw,
        )
        self.t = 0.0
        self.hb = 1
        self.encoder = 0

    def read_results(self, rseqs: list[int]) -> dict[int, c.ResultEntry]:
        self.result_reads.append(list(rseqs))
        return {r: c.ResultEntry(r, 100 + r, 5000, 2, 2, int(c.Disposition.SORTED)) for r in rseqs}

    def poll(self, **regs: int) -> bool:
        """One poll at the poller's own schedule; returns whether it was handed over."""
        self.t = max(self.t, self.poller.next_at)
        self.hb += 1  # a running controller program
        self.encoder += 60  # 3 m/s at 1000 counts/m, 20 ms
        regs.setdefault("ctrl_heartbeat", self.hb)
        regs.setdefault("encoder", self.encoder)
        before = len(self.got)
        self.poller.turn(block(**regs), self.t, self.t + 0.0005)
        return len(self.got) > before


def test_the_first_poll_is_handed_over_and_an_idle_belt_then_wakes_nobody() -> None:
    line = Line()
    assert line.poll()
    assert [line.poll() for _ in range(200)] == [False] * 200  # 4 s of belt, heartbeats, encoder
    assert line.poller.turned_at == line.t + 0.0005  # liveness follows every poll all the same
    status, _ = line.poller.latest or (None, 0)
    assert status is not None and status.encoder == line.encoder


def test_what_the_line_depends_on_wakes_the_loop_at_once() -> None:
    line = Line()
    line.poll()
    assert line.poll(trigger_head=1)  # a new trigger
    assert not line.poll(trigger_head=1)
    assert line.poll(trigger_head=1, status_bits=int(c.StatusBit.BELT_RUNNING | c.StatusBit.ESTOP))
    assert line.poll(trigger_head=1, lane_full_bits=0b100)
    assert line.poll(trigger_head=1, lane_full_bits=0b100, ctrl_boot=9)  # a restarted controller
    poll = line.got[-1]
    assert poll.status.boot == 9 and poll.status.lane_full_bits == 0b100 and poll.status.trigger_head == 1
    # the acknowledgement and the mailbox echo change with every command: not on their own
    assert not line.poll(trigger_head=1, lane_full_bits=0b100, ctrl_boot=9, ack_counter=5, cmd_seq=3)


def test_each_poll_handed_over_knows_when_the_poll_before_it_was_sent() -> None:
    """A new trigger was captured after the previous poll was sent, handed over or not."""
    line = Line()
    line.poll()
    for _ in range(3):
        line.poll()
    quiet_sent = line.t
    line.poll(trigger_head=1)
    assert line.got[-1].prev_sent == quiet_sent and line.got[-1].sent == line.t


def test_results_are_handed_over_in_batches_or_after_a_delay() -> None:
    line = Line()
    line.poll()
    assert not line.poll(result_head=3)  # three results: not urgent
    start = line.t
    while line.t - start < RESULT_DELAY_S - 0.02:
        assert not line.poll(result_head=3)
    assert line.poll(result_head=3) and line.result_reads == [[1, 2, 3]]  # read on the thread, handed over
    assert sorted(line.got[-1].results or {}) == [1, 2, 3]
    assert not line.poll(result_head=3)  # not again
    assert line.poll(result_head=3 + RESULT_BATCH)  # a full batch: at once
    assert line.result_reads[-1] == list(range(4, 4 + RESULT_BATCH))
    assert not line.poll(result_head=3 + RESULT_BATCH) and line.got[-1].results is not None


def test_a_wanted_poll_is_sent_then_and_handed_over() -> None:
    line = Line()
    line.poll()
    last = line.t
    line.poller.want(last + 0.012)  # a frame waits for the triggers captured up to then
    assert line.poller.next_at == last + 0.012  # sooner than the regular 20 ms
    assert line.poll() and line.t == last + 0.012
    assert not line.poll()  # once
    # never sooner than min_gap_s after the last poll, however early it is wanted
    line.poller.want(line.t - 1.0)
    assert line.poller.next_at == line.t + 0.005
    assert line.poll()


def test_a_passed_trailing_edge_is_handed_over_when_its_windows_close_with_the_polls_around_it() -> None:
    line = Line(edge_close=lambda seen, prev_sent, past, cps: seen + 0.03)
    line.poll()
    target = line.encoder + 150  # 2.5 polls ahead
    line.poller.follow((target,))
    assert [line.poll() for _ in range(3)] == [False, False, False]  # passed at the third: not yet told
    crossed_at = line.t + 0.0005
    assert line.poller.next_at == line.t + 0.02  # its windows close after the next regular poll
    assert [line.poll(), line.poll()] == [False, True]  # the first poll sent after they close
    history = line.got[-1].history
    assert len(history) == 6 and history[-1][0] == line.t  # the last taken, the five since
    first_past = next(i for i, h in enumerate(history) if h[2] >= target)
    assert history[first_past][1] == crossed_at and history[first_past - 1][2] < target
    assert not line.poll()  # the same edge asks once
    line.poller.follow(())
    assert not line.poll()


def test_a_passed_edge_rides_on_a_poll_handed_over_for_another_reason_and_asks_no_more() -> None:
    line = Line(edge_close=lambda seen, prev_sent, past, cps: seen + 0.05)
    line.poll()
    line.poller.follow((line.encoder + 30,))
    assert not line.poll()  # passed: held
    assert line.poll(trigger_head=1)  # the next parcel's trigger
    assert line.got[-1].history[1][2] >= line.encoder - 60  # the poll that showed the edge is in it
    assert [line.poll(trigger_head=1) for _ in range(5)] == [False] * 5  # the edge asked for nothing more


def test_a_frozen_controller_program_is_handed_over_once_and_again_when_it_runs() -> None:
    line = Line()
    line.poll()
    frozen = [line.poll(ctrl_heartbeat=500) for _ in range(int(FROZEN_S / 0.02) + 3)]
    assert frozen.count(True) == 1 and frozen[-1] is False  # once: when it is found frozen
    assert line.got[-1].frozen
    assert line.poll() and not line.got[-1].frozen  # its heartbeat moves again


def test_the_heartbeat_goes_on_only_under_the_lease() -> None:
    line = Line()
    p = line.poller
    assert not p.wants_heartbeat(1.0, fc23=True)  # no lease yet: the loop has not said it is whole
    p.renew(1.4)
    assert p.wants_heartbeat(1.0, fc23=True) and p.wants_heartbeat(1.0, fc23=None)
    assert p.next_heartbeat(1.0) == 8  # continued from the register
    assert not p.wants_heartbeat(1.4, fc23=True)  # the lease ran out: the watchdog will trip
    # without function 23 a heartbeat is a write of its own: every heartbeat interval only
    assert not p.wants_heartbeat(1.05, fc23=False) and p.wants_heartbeat(1.1, fc23=False)


def test_a_heartbeat_due_before_the_next_idle_poll_brings_the_poll_forward() -> None:
    """With a slow idle poll (idle_poll_ms above heartbeat_interval_ms) the heartbeat still
    reaches the controller every interval, under the lease only."""
    p = Poller(idle_s=0.5, min_gap_s=0.005, heartbeat_s=0.1, heartbeat=0, speed=SpeedEstimator(),
               results_read=0, prev_sent=0.0, read_results=lambda rseqs: {})
    p.renew(10.0)
    p.next_heartbeat(1.0)
    p.turn(block(ctrl_heartbeat=1), 1.0, 1.001)
    assert p.next_at == 1.1
    p.renew(0.0)  # the lease is gone: no heartbeat to bring the poll forward for
    p.turn(block(ctrl_heartbeat=2), 1.1, 1.101)
    assert p.next_at == 1.6


def test_speed_is_measured_from_the_polls() -> None:
    line = Line()
    for _ in range(20):
        line.poll()
    assert abs(line.poller.speed.cps - 3000) < 1  # 60 counts per 20 ms
