"""Identity at scale, in virtual time: no record ever carries another parcel's code.

The same ``Matcher`` and ``decide`` as the pipeline run against a simulated line with every
reader fault, belt-speed changes, bursts and agent restarts (``hw_sim.identity``); the run stops at
the first violation. ``sortgate bench identity --parcels 1000000`` is the full-size proof.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.pipeline import matching
from agent.pipeline.matching import Capture, Matcher, Outcome, SourceSpec
from hw_sim.identity import IdentitySpec, IdentityViolation, run_identity
from hw_sim.reader_faults import FAULTS

IN_MODEL_FOR_THE_CLOCK = ("skip", "duplicate", "restart", "eye_miss", "eye_double")


def test_with_counters_no_fault_moves_a_code_to_another_parcel() -> None:
    figures = run_identity(IdentitySpec(parcels=20_000, counter="all", fault_rate=0.02, restart_every=5_000))
    assert figures["wrong_identity"] == 0 and figures["wrongly_released"] == 0
    assert set(figures["reader_faults"]) == set(FAULTS)
    assert figures["agent_restarts"] >= 2
    # faults cost inspections, but only around each fault
    assert figures["needless_inspected_parcels"] < 2 * sum(figures["reader_faults"].values())


def test_by_the_clock_alone_every_fault_inside_the_window_model_is_safe() -> None:
    figures = run_identity(IdentitySpec(
        parcels=20_000, counter="none", fault_rate=0.02, restart_every=5_000, faults=IN_MODEL_FOR_THE_CLOCK,
    ))
    assert figures["wrong_identity"] == 0 and figures["wrongly_released"] == 0


def test_the_proof_catches_a_matcher_that_ties_by_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: with ties by order (the old rule), a skipped cycle shifts codes."""

    def by_order(self: Matcher, src: object, frame: object, t: float, counter: object, out: list) -> None:
        name = src.spec.name  # type: ignore[attr-defined]
        for trig in self._trigs:
            slot = self._slots.get((trig.seq, name))
            if slot is not None and slot.status is None and slot.frame is None:
                slot.status = "read"
                slot.frame = frame
                out.append(Outcome(trig.seq, name, "read", frame, t))
                return

    monkeypatch.setattr(matching.Matcher, "_resolve", by_order)
    with pytest.raises(IdentityViolation):
        run_identity(IdentitySpec(parcels=5_000, counter="all", fault_rate=0.02, restart_every=0))


@settings(max_examples=300, deadline=None)
@given(
    gaps=st.lists(st.floats(0.004, 0.2), min_size=2, max_size=12),
    delays=st.lists(st.floats(0.0, 0.25), min_size=12, max_size=12),
    sent=st.lists(st.booleans(), min_size=12, max_size=12),
    counter=st.booleans(),
)
def test_a_read_is_always_its_own_parcels_frame(
    gaps: list[float], delays: list[float], sent: list[bool], counter: bool
) -> None:
    """Any timing, any lost frames: whatever is tied to trigger k is trigger k's frame — by the
    clock alone whenever every frame lands inside its own window; with a counter also when one
    frame lands outside it. (Two frames in a row, each late by exactly one parcel into the next
    window, fool both witnesses while the counter is aligning: docs/serial-readers.md, section 6.)"""
    window = (0.002, 0.016)
    m = Matcher([SourceSpec("r", *window, "trailing_edge", 1000 if counter else None)], max_pass_s=0.1)
    m.new_session(0.0)
    t, times = 1.0, []
    for gap in gaps:
        times.append(t)
        t += gap
    frames = sorted(
        (lead + 0.01 + delays[i], i) for i, lead in enumerate(times) if sent[i]
    )  # a 10 ms parcel; its frame ``delays[i]`` after the trailing edge
    events: list = []
    pending_trig = list(enumerate(times))
    for at, i in frames:
        while pending_trig and pending_trig[0][1] <= at:
            k, lead = pending_trig.pop(0)
            m.add_trigger(Capture(k + 1, lead - 0.0005, lead, measured=True))
            m.set_trailing(k + 1, lead + 0.0095, lead + 0.0105)
        m.set_horizon(at)
        events += m.add_frame("r", (i, f"P{i}"), at, (i + 500) % 1000 if counter else None)
    for k, lead in pending_trig:
        m.add_trigger(Capture(k + 1, lead - 0.0005, lead, measured=True))
        m.set_trailing(k + 1, lead + 0.0095, lead + 0.0105)
    m.set_horizon(t + 1)
    events += m.advance(t + 1)
    outside = sum(1 for d, s in zip(delays[: len(times)], sent, strict=False) if s and not window[0] <= d <= window[1])
    for e in events:
        if isinstance(e, Outcome) and e.status == "read" and outside <= (1 if counter else 0):
            assert e.payload[0] == e.seq - 1, e
