"""The decision: a pure function from what we know about a parcel to a lane and reasons.

Release needs positive action. ``decide`` returns RELEASE only when every check has positively
passed — exactly one distinct code, valid in an accepted format; a verdict of ``release`` found in
time and not expired; an image check that passed (or is configured off); a healthy line; normal
mode; and the decision made before its deadline. Everything else is INSPECTION, and every reason
that counted against release is listed, so a customs officer reading the record sees them all,
not just the first.

The reason strings are part of the MQTT contract (parcel records); add new ones, never rename.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent.pipeline.waybill import WaybillCheck, check_code, normalize

__all__ = [
    "Decision",
    "DecisionInputs",
    "ImageOutcome",
    "LaneClass",
    "Mode",
    "ReaderOutcome",
    "Reason",
    "VerdictLookup",
    "decide",
]


#: a verdict look-up: found and valid (hit), unknown (miss), past its expiry, unanswered in time,
#: a malformed answer (invalid), an answer that failed its checks (rejected)
LookupStatus = Literal["hit", "miss", "expired", "timeout", "invalid", "rejected"]
#: the image check: passed, flagged a prohibited item, no image arrived, the check failed or was late
ImageStatus = Literal["pass", "flagged", "missing", "failed"]


class LaneClass(enum.StrEnum):
    """The lane classes of docs/mqtt.md; ``decide`` gives RELEASE or INSPECTION, the sort plan
    (``agent.pipeline.sortplan``) may then place a parcel in a lane of another class."""

    RELEASE = "release"
    INSPECTION = "inspection"
    CONSOLIDATION = "consolidation"
    HOLD = "hold"
    RECIRCULATION = "recirculation"


class Mode(enum.StrEnum):
    NORMAL = "normal"
    INSPECT_ALL = "inspect_all"
    MAINTENANCE = "maintenance"


class Reason(enum.StrEnum):
    RELEASE_VERDICT = "release_verdict"  # the one reason a release carries
    NO_READ = "no_read"
    READER_TIMEOUT = "reader_timeout"
    MULTI_READ = "multi_read"
    INVALID_CODE = "invalid_code"
    UNKNOWN_WAYBILL = "unknown_waybill"
    VERDICT_TIMEOUT = "verdict_timeout"
    VERDICT_EXPIRED = "verdict_expired"
    VERDICT_INSPECT = "verdict_inspect"
    VERDICT_HOLD = "verdict_hold"
    VERDICT_UNRECOGNISED = "verdict_unrecognised"
    IMAGE_MISSING = "image_missing"
    IMAGE_FLAGGED = "image_flagged"
    IMAGE_FAILED = "image_failed"
    LINE_UNHEALTHY = "line_unhealthy"
    MODE_INSPECT_ALL = "mode_inspect_all"
    MODE_MAINTENANCE = "mode_maintenance"
    LATE = "late"
    READ_AMBIGUOUS = "read_ambiguous"  # a frame could belong to this parcel or another
    READ_CONFLICT = "read_conflict"  # two different frames from one reader fit this parcel
    READER_UNMATCHED = "reader_unmatched"  # the reader's frames stopped matching triggers


_PROBLEM_REASONS: Mapping[str, Reason] = {
    "ambiguous": Reason.READ_AMBIGUOUS,
    "conflict": Reason.READ_CONFLICT,
    "unmatched": Reason.READER_UNMATCHED,
}


@dataclass(frozen=True, slots=True)
class ReaderOutcome:
    """What one barcode reader said about one trigger.

    ``codes`` empty with ``no_read`` True: the reader sent its NoRead string.
    ``timed_out``: no frame of the reader was tied to this trigger inside its window.
    ``problem``: the evidence could not settle what the reader said about this parcel —
    "ambiguous" (a frame fits this parcel and another), "conflict" (two different frames fit it),
    "unmatched" (the reader's frames have stopped matching triggers). Any problem is inspection.
    ``counter``: the reader's own trigger counter in the frame, where it sends one.
    """

    reader: str
    codes: tuple[str, ...] = ()
    no_read: bool = False
    timed_out: bool = False
    problem: str | None = None
    counter: int | None = None


@dataclass(frozen=True, slots=True)
class VerdictLookup:
    """Result of looking a waybill up in the verdict store (or asking central for it)."""

    status: LookupStatus
    verdict: str | None = None  # "release" | "inspect" | "hold" when status == "hit"
    verdict_id: str | None = None
    hold_reason: str | None = None  # why central holds it (a hold verdict's hold_reason)
    group: str | None = None  # consolidation group (a release verdict's group)


@dataclass(frozen=True, slots=True)
class ImageOutcome:
    """Image check result. ``required`` False means advisory/off: it cannot block release."""

    required: bool
    status: ImageStatus
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class DecisionInputs:
    reads: tuple[ReaderOutcome, ...]
    accept_formats: tuple[str, ...]
    verdict: VerdictLookup | None  # None: no single valid code, so nothing was looked up
    image: ImageOutcome | None  # None: image checks are off on this line
    line_problems: tuple[str, ...] = ()  # empty means healthy
    mode: Mode = Mode.NORMAL
    late: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    lane: LaneClass
    reasons: tuple[str, ...]
    waybill: str | None = None  # the one valid code, when there is one
    code_checks: tuple[WaybillCheck, ...] = field(default=())

    @property
    def released(self) -> bool:
        return self.lane is LaneClass.RELEASE


def distinct_codes(reads: Iterable[ReaderOutcome]) -> list[str]:
    """All distinct codes (normalized) that any reader reported, in first-seen order."""
    seen: dict[str, None] = {}
    for outcome in reads:
        for raw in outcome.codes:
            seen.setdefault(normalize(raw), None)
    return list(seen)


def identify(reads: tuple[ReaderOutcome, ...], accept: tuple[str, ...]) -> tuple[
    str | None, list[str], tuple[WaybillCheck, ...]
]:
    """Find the parcel's one valid waybill, if it has exactly one. Returns (code, reasons, checks)."""
    codes = distinct_codes(reads)
    checks = tuple(check_code(c, accept) for c in codes)
    reasons: list[str] = []
    for outcome in reads:
        if outcome.problem is not None:
            reason = _PROBLEM_REASONS.get(outcome.problem, Reason.READER_UNMATCHED)
            if reason not in reasons:
                reasons.append(reason)
    if reasons:  # what a reader said about this parcel is unknown: no code can be trusted as its only one
        return None, reasons, checks
    if not codes:
        if any(r.timed_out for r in reads) or not reads:
            reasons.append(Reason.READER_TIMEOUT)
        if any(r.no_read for r in reads) or not reads:
            reasons.append(Reason.NO_READ)
        return None, reasons, checks
    if len(codes) > 1:
        reasons.append(Reason.MULTI_READ)
    if any(not c.valid for c in checks):
        reasons.append(Reason.INVALID_CODE)
    if reasons:
        return None, reasons, checks
    return checks[0].code, reasons, checks


_VERDICT_REASONS: Mapping[str, Reason] = {
    "inspect": Reason.VERDICT_INSPECT,
    "hold": Reason.VERDICT_HOLD,
}


_MODE_REASONS: Mapping[Mode, Reason] = {
    Mode.INSPECT_ALL: Reason.MODE_INSPECT_ALL,
    Mode.MAINTENANCE: Reason.MODE_MAINTENANCE,
}


_VERDICT_STATUS_REASONS: Mapping[str, Reason] = {
    "miss": Reason.UNKNOWN_WAYBILL,
    "timeout": Reason.VERDICT_TIMEOUT,
    "expired": Reason.VERDICT_EXPIRED,
}


def _verdict_reasons(verdict: VerdictLookup | None) -> list[str]:
    """What counts against release in the verdict of the one valid waybill."""
    if verdict is None:
        return [Reason.UNKNOWN_WAYBILL]
    if verdict.status != "hit":
        return [_VERDICT_STATUS_REASONS.get(verdict.status, Reason.VERDICT_UNRECOGNISED)]
    if verdict.verdict != "release":
        return [_VERDICT_REASONS.get(verdict.verdict or "", Reason.VERDICT_UNRECOGNISED)]
    return []


_IMAGE_REASONS: Mapping[str, Reason] = {"missing": Reason.IMAGE_MISSING, "flagged": Reason.IMAGE_FLAGGED}


def _image_reasons(image: ImageOutcome) -> list[str]:
    """What counts against release in a required image check: anything but a pass."""
    return [] if image.status == "pass" else [_IMAGE_REASONS.get(image.status, Reason.IMAGE_FAILED)]


def decide(inputs: DecisionInputs) -> Decision:
    """Decide the lane. Pure: same inputs, same decision; never raises on odd inputs."""
    waybill, reasons, checks = identify(inputs.reads, inputs.accept_formats)
    verdict = inputs.verdict
    if waybill is not None:
        reasons += _verdict_reasons(verdict)
    if inputs.image is not None and inputs.image.required:
        reasons += _image_reasons(inputs.image)
    if inputs.line_problems:
        reasons.append(Reason.LINE_UNHEALTHY)
    if inputs.mode is not Mode.NORMAL:
        reasons.append(_MODE_REASONS.get(inputs.mode, Reason.MODE_MAINTENANCE))
    if inputs.late:
        reasons.append(Reason.LATE)

    if reasons:
        return Decision(LaneClass.INSPECTION, tuple(str(r) for r in reasons), waybill, checks)
    # Positive evidence only: reaching here needs a valid waybill and a "release" hit.
    if waybill is None or verdict is None or verdict.status != "hit" or verdict.verdict != "release":
        return Decision(LaneClass.INSPECTION, (str(Reason.VERDICT_UNRECOGNISED),), waybill, checks)
    return Decision(LaneClass.RELEASE, (str(Reason.RELEASE_VERDICT),), waybill, checks)
