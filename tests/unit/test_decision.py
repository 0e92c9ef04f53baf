"""The decision function, case by case: release only on positive evidence."""

from __future__ import annotations

import itertools

import pytest

from agent.pipeline.decision import (
    DecisionInputs,
    ImageOutcome,
    LaneClass,
    Mode,
    ReaderOutcome,
    VerdictLookup,
    decide,
)

GOOD = "RB123456785GB"
OTHER_GOOD = "EE000000005CN"  # serial 00000000: remainder 0 -> check digit 5
BAD_CHECK = "RB123456786GB"
ACCEPT = ("s10", "ups_1z")
RELEASE = VerdictLookup("hit", "release", "v1")


def inputs(**kw: object) -> DecisionInputs:
    base: dict[str, object] = {
        "reads": (ReaderOutcome("r1", (GOOD,)),),
        "accept_formats": ACCEPT,
        "verdict": RELEASE,
        "image": None,
    }
    base.update(kw)
    return DecisionInputs(**base)  # type: ignore[arg-type]


def test_everything_positive_releases() -> None:
    d = decide(inputs())
    assert d.lane is LaneClass.RELEASE
    assert d.reasons == ("release_verdict",)
    assert d.waybill == GOOD


def test_two_readers_agreeing_is_one_code() -> None:
    d = decide(inputs(reads=(ReaderOutcome("r1", (GOOD,)), ReaderOutcome("r2", (" " + GOOD,)))))
    assert d.lane is LaneClass.RELEASE


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"reads": (ReaderOutcome("r1", (), no_read=True),), "verdict": None}, "no_read"),
        ({"reads": (ReaderOutcome("r1", (), timed_out=True),), "verdict": None}, "reader_timeout"),
        ({"reads": (), "verdict": None}, "reader_timeout"),
        ({"reads": (ReaderOutcome("r1", (GOOD, OTHER_GOOD)),)}, "multi_read"),
        ({"reads": (ReaderOutcome("r1", (GOOD,)), ReaderOutcome("r2", (OTHER_GOOD,)))}, "multi_read"),
        ({"reads": (ReaderOutcome("r1", (BAD_CHECK,)),)}, "invalid_code"),
        ({"reads": (ReaderOutcome("r1", ("\x00garbage",)),)}, "invalid_code"),
        ({"verdict": VerdictLookup("miss")}, "unknown_waybill"),
        ({"verdict": None}, "unknown_waybill"),
        ({"verdict": VerdictLookup("timeout")}, "verdict_timeout"),
        ({"verdict": VerdictLookup("expired", "release")}, "verdict_expired"),
        ({"verdict": VerdictLookup("hit", "inspect")}, "verdict_inspect"),
        ({"verdict": VerdictLookup("hit", "hold")}, "verdict_hold"),
        ({"verdict": VerdictLookup("hit", "RELEASE")}, "verdict_unrecognised"),
        ({"verdict": VerdictLookup("hit", None)}, "verdict_unrecognised"),
        ({"verdict": VerdictLookup("weird", "release")}, "verdict_unrecognised"),
        ({"image": ImageOutcome(True, "missing")}, "image_missing"),
        ({"image": ImageOutcome(True, "flagged", "blade 0.93")}, "image_flagged"),
        ({"image": ImageOutcome(True, "failed")}, "image_failed"),
        ({"image": ImageOutcome(True, "late")}, "image_failed"),
        ({"line_problems": ("jam",)}, "line_unhealthy"),
        ({"mode": Mode.INSPECT_ALL}, "mode_inspect_all"),
        ({"mode": Mode.MAINTENANCE}, "mode_maintenance"),
        ({"late": True}, "late"),
    ],
)
def test_each_negative_case_inspects_with_reason(kw: dict[str, object], reason: str) -> None:
    d = decide(inputs(**kw))
    assert d.lane is LaneClass.INSPECTION
    assert reason in d.reasons
    assert "release_verdict" not in d.reasons


def test_advisory_image_does_not_block_release() -> None:
    assert decide(inputs(image=ImageOutcome(False, "flagged"))).lane is LaneClass.RELEASE
    assert decide(inputs(image=ImageOutcome(True, "pass"))).lane is LaneClass.RELEASE


def test_all_reasons_are_listed_not_just_the_first() -> None:
    d = decide(inputs(verdict=VerdictLookup("hit", "hold"), line_problems=("estop",), late=True))
    assert d.reasons == ("verdict_hold", "line_unhealthy", "late")


def test_exhaustive_small_space_releases_only_when_all_positive() -> None:
    """Every combination of a few values per input: release iff every input is the good one."""
    reads = [
        (ReaderOutcome("r1", (GOOD,)), True),
        (ReaderOutcome("r1", (), no_read=True), False),
        (ReaderOutcome("r1", (BAD_CHECK,)), False),
        (ReaderOutcome("r1", (GOOD, OTHER_GOOD)), False),
    ]
    verdicts = [(RELEASE, True), (VerdictLookup("hit", "inspect"), False),
                (VerdictLookup("miss"), False), (None, False)]
    images = [(None, True), (ImageOutcome(True, "pass"), True), (ImageOutcome(True, "missing"), False)]
    problems = [((), True), (("estop",), False)]
    modes = [(Mode.NORMAL, True), (Mode.INSPECT_ALL, False)]
    lates = [(False, True), (True, False)]
    count = 0
    for (r, r_ok), (v, v_ok), (i, i_ok), (p, p_ok), (m, m_ok), (late, l_ok) in itertools.product(
        reads, verdicts, images, problems, modes, lates
    ):
        d = decide(DecisionInputs((r,), ACCEPT, v, i, p, m, late))
        expected = all((r_ok, v_ok, i_ok, p_ok, m_ok, l_ok))
        assert d.released is expected, (r, v, i, p, m, late, d)
        assert d.reasons  # every decision says why
        count += 1
    assert count == 4 * 4 * 3 * 2 * 2 * 2
