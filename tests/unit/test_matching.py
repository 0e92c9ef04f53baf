"""The matcher's rules, case by case: a frame is tied to a trigger only by evidence."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.pipeline.matching import CLEAN_RUN, FAULT_RUN, Capture, Matcher, Note, Outcome, SourceSpec, capture_interval

MS = 0.001


@dataclass(frozen=True)
class F:
    """A frame: ``raw`` identifies it like a decoded reader frame does."""

    raw: bytes


def matcher(counter: bool = False, anchor: str = "leading_edge") -> Matcher:
    spec = SourceSpec("r1", 10 * MS, 30 * MS, anchor, 10_000 if counter else None)  # type: ignore[arg-type]
    m = Matcher([spec], max_pass_s=0.3)
    m.new_session(0.0)
    return m


def trig(m: Matcher, seq: int, t: float) -> None:
    m.add_trigger(Capture(seq, t - MS, t))
    m.set_horizon(t + 0.0005)


def outcomes(events: list[Outcome | Note]) -> dict[int, Outcome]:
    return {e.seq: e for e in events if isinstance(e, Outcome)}


def notes(events: list[Outcome | Note]) -> list[str]:
    return [e.kind for e in events if isinstance(e, Note)]


def frame(m: Matcher, t: float, raw: bytes, counter: int | None = None) -> list[Outcome | Note]:
    m.set_horizon(t)
    return m.add_frame("r1", F(raw), t, counter)


# --- the clock alone ---------------------------------------------------------------------


def test_a_frame_in_one_window_is_read_but_final_only_when_the_window_closes() -> None:
    m = matcher()
    trig(m, 1, 1.000)
    assert outcomes(frame(m, 1.020, b"A")) == {}  # a second frame could still claim trigger 1
    assert m.expect(1) == ["r1"]
    out = outcomes(m.advance(1.040))
    assert out[1].status == "read" and out[1].payload == F(b"A")


def test_a_frame_in_two_windows_belongs_to_neither() -> None:
    m = matcher()
    trig(m, 1, 1.000)
    trig(m, 2, 1.012)
    events = frame(m, 1.025, b"A")  # inside 1.010..1.030 and 1.022..1.042
    assert "ambiguous" in notes(events)
    out = outcomes(events)
    assert out[1].status == "ambiguous" and out[2].status == "ambiguous"


def test_two_different_frames_in_one_window_are_a_conflict() -> None:
    m = matcher()
    trig(m, 1, 1.000)
    frame(m, 1.015, b"A")
    assert "conflict" in notes(frame(m, 1.025, b"B"))
    assert outcomes(m.advance(1.040))[1].status == "conflict"


def test_the_same_frame_twice_in_one_window_is_one_read() -> None:
    m = matcher()
    trig(m, 1, 1.000)
    frame(m, 1.015, b"A")
    assert notes(frame(m, 1.017, b"A")) == ["duplicate"]
    assert outcomes(m.advance(1.040))[1].status == "read"


def test_a_frame_inside_no_window_is_an_orphan_and_a_trigger_without_a_frame_times_out() -> None:
    m = matcher()
    trig(m, 1, 1.000)
    events = frame(m, 1.050, b"A")
    assert notes(events) == ["orphan"]
    assert outcomes(events)[1].status == "timed_out"  # its window closed at 1.030


def test_a_frame_waits_until_every_trigger_that_could_own_it_is_known() -> None:
    m = matcher()
    trig(m, 1, 1.000)
    m.set_horizon(1.001)
    assert m.add_frame("r1", F(b"B"), 1.025, None) == []  # trigger 2 at 1.012 is not polled yet
    assert m.holding()
    m.add_trigger(Capture(2, 1.011, 1.012))
    m.set_horizon(1.026)
    out = outcomes(m.advance(1.026))
    assert out[1].status == "ambiguous" and out[2].status == "ambiguous"


def test_before_the_first_poll_a_frame_could_be_an_unseen_parcels() -> None:
    m = Matcher([SourceSpec("r1", 10 * MS, 30 * MS, "leading_edge")], max_pass_s=0.3)
    m.new_session(1.005)  # triggers before 1.005 may never be seen
    m.add_trigger(Capture(7, 1.006, 1.007))
    events = frame(m, 1.020, b"A")  # could be trigger 7's, or one captured at 0.990..1.005
    assert "ambiguous" in notes(events)
    assert outcomes(events)[7].status == "ambiguous"


def test_give_up_leaves_no_unsettled_read_trusted() -> None:
    m = matcher()
    trig(m, 1, 1.000)
    frame(m, 1.015, b"A")
    assert [o.status for o in m.give_up(1)] == ["timed_out"]
    assert m.expect(1) == []


# --- trailing edges -------------------------------------------------------------------


def test_trailing_edge_windows_open_only_once_the_edge_is_observed() -> None:
    m = matcher(anchor="trailing_edge")
    m.add_trigger(Capture(1, 0.999, 1.000, measured=True))
    m.add_trigger(Capture(2, 1.059, 1.060, measured=True))
    m.set_trailing(1, 1.049, 1.050)  # parcel 1 is 50 ms long
    events = frame(m, 1.065, b"A")
    assert notes(events) == []  # trigger 2's edge is not observed: its window is not open
    m.set_trailing(2, 1.099, 1.100)
    assert outcomes(m.advance(1.085))[1].status == "read"
    assert outcomes(m.advance(1.140))[2].status == "timed_out"


def test_an_unmeasured_parcel_may_be_as_long_as_the_longest() -> None:
    m = matcher(anchor="trailing_edge")
    m.add_trigger(Capture(1, 0.999, 1.000, measured=False))
    frame(m, 1.250, b"A")  # 250 ms: inside 0.3 s (longest) + 30 ms
    assert outcomes(m.advance(1.400))[1].status == "read"


def test_capture_interval_stays_inside_the_polls_and_holds_the_truth() -> None:
    # the belt at 3000 counts/s was at the position 12 counts ago: 4 ms before the poll returned
    lo, hi = capture_interval(sent=9.9995, now=10.000, after=9.990, travelled=12, speed_cps=3000.0)
    assert 9.990 <= lo <= 9.996 <= hi <= 10.000
    # a speed estimate far off cannot push the interval outside the polls
    lo, hi = capture_interval(sent=9.9995, now=10.000, after=9.995, travelled=12, speed_cps=300.0)
    assert (lo, hi) == (9.995, 10.000)


@pytest.mark.parametrize("read_at", [9.990, 9.995, 10.010])
def test_a_slow_answer_widens_the_interval_to_when_the_encoder_may_have_been_read(read_at: float) -> None:
    """The poll went out at 9.990 and its answer was noted at 10.010 (a loaded I/O thread): the
    controller read the encoder anywhere in between. The belt was at the position 3 counts before
    that read (1 ms at 3000 counts/s); every such moment is inside the interval."""
    truth = read_at - 0.001
    lo, hi = capture_interval(sent=9.990, now=10.010, after=9.950, travelled=3, speed_cps=3000.0)
    assert lo <= truth <= hi
    assert hi <= 10.010 and lo >= 9.950


# --- the counter -------------------------------------------------------------------------


def counter_line(m: Matcher, n: int, start: float = 1.0, pitch: float = 0.1) -> list[float]:
    """Triggers 1..n, ``pitch`` apart."""
    times = [start + i * pitch for i in range(n)]
    for i, t in enumerate(times):
        trig(m, i + 1, t)
    return times


def test_a_counter_aligns_after_two_frames_then_ties_at_once() -> None:
    m = matcher(counter=True)
    times = counter_line(m, 3)
    assert not outcomes(frame(m, times[0] + 0.02, b"A", 41))
    events = frame(m, times[1] + 0.02, b"B", 42)
    assert "aligned" in notes(events)
    out = outcomes(frame(m, times[2] + 0.02, b"C", 43))  # aligned: read at once, window still open
    assert out[3].status == "read" and out[3].counter == 43


C = 100  # a running reader's counter


def aligned(m: Matcher, n: int) -> list[float]:
    times = counter_line(m, n)
    frame(m, times[0] + 0.02, b"P1", C + 1)
    frame(m, times[1] + 0.02, b"P2", C + 2)
    m.advance(times[1] + 0.05)
    return times


def test_a_skipped_cycle_costs_its_own_parcel_only() -> None:
    m = matcher(counter=True)
    t = aligned(m, 5)
    events = frame(m, t[3] + 0.02, b"P4", C + 4)  # the reader counted cycle 3 but sent nothing
    assert "counter_gap" in notes(events)
    out = outcomes(events)
    assert out[4].status == "read" and out[4].payload == F(b"P4")
    assert out[3].status == "timed_out"


def test_a_repeated_counter_is_a_duplicate_not_a_conflict() -> None:
    m = matcher(counter=True)
    t = aligned(m, 4)
    frame(m, t[2] + 0.02, b"P3", C + 3)
    assert notes(frame(m, t[2] + 0.022, b"P3", C + 3)) == ["duplicate"]


def test_a_late_frame_never_reaches_the_next_parcel() -> None:
    m = matcher(counter=True)
    t = aligned(m, 5)
    # parcel 3's frame comes out in parcel 4's window; parcel 4's own frame follows
    events = frame(m, t[3] + 0.015, b"P3", C + 3)
    assert "mismatch" in notes(events)
    events += frame(m, t[3] + 0.020, b"P4", C + 4)
    events += m.advance(t[3] + 0.05)
    out = outcomes(events)
    assert 4 not in out or out[4].payload != F(b"P3")
    assert out[4].status == "conflict"  # which of the two was parcel 4's is not provable
    every = [e for e in events if isinstance(e, Outcome) and e.status == "read"]
    assert all(e.payload == F(f"P{e.seq}".encode()) for e in every)


def test_a_reader_whose_photo_eye_missed_a_parcel_shifts_nothing() -> None:
    m = matcher(counter=True)
    t = aligned(m, 6)
    # the reader never saw parcel 3: parcel 4's frame carries counter 3
    events = frame(m, t[3] + 0.02, b"P4", C + 3)
    assert "mismatch" in notes(events)
    events += frame(m, t[4] + 0.02, b"P5", C + 4)
    events += frame(m, t[5] + 0.02, b"P6", C + 5)
    events += m.advance(t[5] + 0.05)
    for e in events:
        if isinstance(e, Outcome) and e.status == "read":
            assert e.payload == F(f"P{e.seq}".encode())
    assert "aligned" in notes(events)  # realigned on the new offset


def test_a_restarted_reader_realigns() -> None:
    m = matcher(counter=True)
    t = aligned(m, 6)
    events = frame(m, t[2] + 0.02, b"P3", C + 3)
    events += frame(m, t[3] + 0.02, b"P4", 1)  # it rebooted: its counter starts again
    assert "counter_reset" in notes(events)
    events += frame(m, t[4] + 0.02, b"P5", 2)
    events += frame(m, t[5] + 0.02, b"P6", 3)
    events += m.advance(t[5] + 0.05)
    reads = {e.seq: e for e in events if isinstance(e, Outcome) and e.status == "read"}
    assert {s: r.payload for s, r in reads.items()} == {s: F(f"P{s}".encode()) for s in reads}
    # the first frame after the reboot disagrees with the old alignment: its parcel is inspected
    assert set(reads) == {3, 5, 6}
    assert outcomes(events)[4].status == "conflict"


def test_a_frame_from_an_older_cycle_never_attaches_even_when_its_window_owner_sent_nothing() -> None:
    m = matcher(counter=True)
    t = aligned(m, 6)
    events = frame(m, t[3] + 0.02, b"P4", C + 4)  # cycle 3 (parcel 3) is late; cycle 5 (parcel 5) sends nothing
    events += frame(m, t[4] + 0.02, b"P3", C + 3)  # parcel 3's frame arrives in parcel 5's window
    events += m.advance(t[4] + 0.05)
    out = outcomes(events)
    assert "late" in notes(events)
    assert out[5].status == "conflict" and out[4].payload == F(b"P4")


def test_the_counter_wraps() -> None:
    m = matcher(counter=True)
    t = counter_line(m, 4)
    frame(m, t[0] + 0.02, b"P1", 9998)
    frame(m, t[1] + 0.02, b"P2", 9999)
    out = outcomes(frame(m, t[2] + 0.02, b"P3", 0))
    out |= outcomes(frame(m, t[3] + 0.02, b"P4", 1))
    assert out[3].payload == F(b"P3") and out[4].payload == F(b"P4")


def test_the_counter_never_resolves_a_frame_the_clock_calls_ambiguous() -> None:
    m = matcher(counter=True)
    t = aligned(m, 3)
    trig(m, 4, t[2] + 0.012)
    events = frame(m, t[2] + 0.025, b"P3", C + 3)  # inside the windows of 3 and 4
    out = outcomes(events)
    assert out[3].status == "ambiguous" and 4 not in out


# --- a source that stops matching ----------------------------------------------------------


def test_a_run_of_orphans_makes_a_reader_unmatched_until_it_matches_cleanly_again() -> None:
    m = matcher()
    t0 = 1.0
    events: list[Outcome | Note] = []
    for i in range(FAULT_RUN):
        events += frame(m, t0 + i * 0.1, b"X")
    assert notes(events).count("unmatched") == 1
    events = []
    for i in range(CLEAN_RUN + 1):
        t = 2.0 + i * 0.1
        trig(m, 10 + i, t)
        events += frame(m, t + 0.02, f"P{i}".encode())
        events += m.advance(t + 0.05)
    out = [e for e in events if isinstance(e, Outcome)]
    assert out[0].unmatched  # its parcels are inspected while it is unmatched
    assert "matched" in notes(events)
    assert not out[-1].unmatched


def test_no_close_is_due_while_a_held_frame_could_still_fall_in_the_window() -> None:
    """A window cannot close while a frame that arrived inside it waits for the horizon (``advance``
    keeps it open), so no timer may be set for it: it would fire again and again until the poll
    that lets the frame resolve comes. The close is due again once the frame has resolved."""
    m = matcher()
    trig(m, 1, 1.000)  # window 1.010..1.030
    assert m.next_close() == 1.030
    m.add_frame("r1", F(b"A"), 1.020)  # held: the horizon is still 1.0005
    assert m.holding() and outcomes(m.advance(1.050)) == {}  # past the close, but the frame waits
    assert m.next_close() is None  # the poll that resolves the frame brings the close, not a timer
    m.set_horizon(1.020)
    out = outcomes(m.advance(1.050))
    assert out[1].status == "read" and m.next_close() is None


def test_a_window_answered_before_it_closes_needs_no_close() -> None:
    """An aligned counter's frame is final at once: nothing waits for that window's close, so
    no timer is due for it (the trigger's other windows still are)."""
    m = matcher(counter=True)
    for seq, t, counter in ((1, 1.000, 11), (2, 1.100, 12)):  # two cycles align the counter
        trig(m, seq, t)
        frame(m, t + 0.020, b"A%d" % seq, counter)
    assert m.sources["r1"].offset is not None
    m.advance(1.200)
    trig(m, 3, 1.300)
    assert m.next_close() == 1.330
    out = outcomes(frame(m, 1.320, b"A3", 13))
    assert out[3].status == "read"  # at once, ten milliseconds before the window closes
    assert m.next_close() is None
