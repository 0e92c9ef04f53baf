from __future__ import annotations

from agent.matching import Match, Orphan, ReadMatcher
from firmware_bridge.reader_codec import Frame

F1 = Frame(("RB123456785GB",), False, b"")
F2 = Frame(("EE000000005CN",), False, b"")
NR = Frame((), True, b"")


def m(readers: tuple[str, ...] = ("a",)) -> ReadMatcher:
    return ReadMatcher(list(readers), {r: 0.2 for r in readers}, early_s=0.05)


def test_in_order_matching() -> None:
    rm = m()
    assert rm.add_trigger(1, 0.0) == []
    assert rm.add_trigger(2, 0.1) == []
    (a,) = rm.add_frame("a", F1, 0.12)
    (b,) = rm.add_frame("a", NR, 0.15)
    assert isinstance(a, Match) and a.seq == 1 and a.payload == F1
    assert isinstance(b, Match) and b.seq == 2 and b.payload.no_read


def test_trigger_without_frame_times_out_and_next_frame_goes_to_next_trigger() -> None:
    rm = m()
    rm.add_trigger(1, 0.0)
    # when trigger 2 is seen at 0.3 s, trigger 1 has waited longer than the window
    (timeout,) = rm.add_trigger(2, 0.3)
    assert isinstance(timeout, Match) and timeout.seq == 1 and timeout.timed_out
    (match,) = rm.add_frame("a", F1, 0.35)
    assert isinstance(match, Match) and match.seq == 2 and match.payload == F1


def test_frame_before_trigger_is_held_then_matched() -> None:
    rm = m()
    assert rm.add_frame("a", F1, 1.000) == []
    (e,) = rm.add_trigger(7, 1.004, t_actual=0.995)  # fired before the frame, seen after
    assert isinstance(e, Match) and e.seq == 7 and e.t_frame == 1.000


def test_orphan_frame_is_reported_not_matched() -> None:
    rm = m()
    rm.add_frame("a", F1, 1.0)
    (e,) = rm.expire(1.2)
    assert isinstance(e, Orphan) and e.payload == F1
    assert rm.add_trigger(8, 1.3) == []  # the orphan did not stick to a later trigger


def test_two_readers_each_answer() -> None:
    rm = m(("top", "side"))
    rm.add_trigger(1, 0.0)
    assert rm.waiting(1) == ["top", "side"]
    rm.add_frame("side", F2, 0.03)
    assert rm.waiting(1) == ["top"]
    rm.add_frame("top", F1, 0.04)
    assert rm.waiting(1) == []


def test_frame_older_than_the_trigger_is_not_its_frame() -> None:
    """A stray frame for parcel k must not be handed to parcel k+1."""
    rm = m()
    rm.add_trigger(1, 0.000)
    rm.add_frame("a", Frame(("JUNK",), False, b""), 0.010)  # spurious frame takes trigger 1
    assert rm.add_frame("a", F1, 0.050) == []  # parcel 1's real frame: nothing pending
    # trigger 2 fired at 0.100 and was seen at 0.104: parcel 1's frame (0.050) predates it
    events = rm.add_trigger(2, 0.104, t_actual=0.100)
    assert [type(e) for e in events] == [Orphan]
    assert rm.waiting(2) == ["a"]
    (match,) = rm.add_frame("a", F2, 0.140)
    assert isinstance(match, Match) and match.seq == 2 and match.payload == F2
