"""Waybill code parsing and check digits.

A barcode reader hands us a string. This module answers one question about it: is it a
well-formed waybill number of a format this site accepts, and which one? It is pure logic with
no I/O, so the line pipeline can call it on the hot path and the unit tests can run it against
public conformance numbers (``shared/data/tracking_number_data``).

Supported formats (names are the config keys in ``[waybill] accept``):

``s10``
    UPU S10 postal item: 2 letters, 8 digits, mod-11 check digit, ISO country of a UPU member.
``dhl_express``
    DHL Express air waybill: 9-10 digits and a mod-7 check digit.
``ups_1z``
    UPS "1Z" tracking number: 1Z + 15 alphanumerics + a mod-10 check digit.
``fedex_12``
    FedEx Express 12 digits: weighted (3,1,7) sum, mod 11 then mod 10.
``sscc``
    GS1 SSCC, 18 digits with the GS1 mod-10 check digit; ``00`` AI prefix accepted.

Whitespace inside a code is ignored (labels print digit groups; readers may pass them on).
A code that matches no accepted format is invalid; a code may match several formats, which is
fine as long as one accepts it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources

__all__ = ["FORMATS", "WaybillCheck", "check_code", "normalize"]


@dataclass(frozen=True, slots=True)
class WaybillCheck:
    """Outcome of checking one code against the accepted formats."""

    code: str  # normalized (whitespace removed, upper case)
    valid: bool
    format: str | None  # first accepted format that matched, when valid
    problem: str | None  # why it is invalid, when not valid


@cache
def _s10_countries() -> frozenset[str]:
    text = resources.files("agent").joinpath("data/s10_countries.txt").read_text("ascii")
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def normalize(raw: str) -> str:
    """Strip all whitespace and upper-case the code."""
    return "".join(raw.split()).upper()


def _s10(code: str) -> str | None:
    m = re.fullmatch(r"([A-Z]{2})(\d{8})(\d)([A-Z]{2})", code)
    if not m:
        return "not an S10 pattern"
    serial, check, country = m.group(2), int(m.group(3)), m.group(4)
    total = sum(int(d) * w for d, w in zip(serial, (8, 6, 4, 2, 3, 5, 9, 7), strict=True))
    expected = 11 - total % 11
    expected = {10: 0, 11: 5}.get(expected, expected)
    if expected != check:
        return f"S10 check digit {check} != {expected}"
    if country not in _s10_countries():
        return f"S10 country {country} is not a UPU issuer"
    return None


def _dhl_express(code: str) -> str | None:
    if not re.fullmatch(r"\d{10,11}", code):
        return "not a DHL Express pattern"
    if int(code[:-1]) % 7 != int(code[-1]):
        return "DHL Express mod-7 check digit mismatch"
    return None


def _ups_1z(code: str) -> str | None:
    m = re.fullmatch(r"1Z([A-Z0-9]{15})(\d)", code)
    if not m:
        return "not a UPS 1Z pattern"
    total = 0
    for i, c in enumerate(m.group(1)):
        value = int(c) if c.isdigit() else (ord(c) - 3) % 10
        total += value * (2 if i % 2 else 1)
    expected = (10 - total % 10) % 10
    if expected != int(m.group(2)):
        return "UPS mod-10 check digit mismatch"
    return None


def _fedex_12(code: str) -> str | None:
    if not re.fullmatch(r"\d{12}", code):
        return "not a FedEx 12-digit pattern"
    weights = (3, 1, 7, 3, 1, 7, 3, 1, 7, 3, 1)
    total = sum(int(d) * w for d, w in zip(code[:11], weights, strict=True))
    if total % 11 % 10 != int(code[11]):
        return "FedEx check digit mismatch"
    return None


def gs1_check_digit(data: str) -> int:
    """GS1 mod-10 check digit for a digit string (weights 3,1,... from the right)."""
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(data)))
    return (10 - total % 10) % 10


def _sscc(code: str) -> str | None:
    if re.fullmatch(r"00\d{18}", code):
        code = code[2:]
    if not re.fullmatch(r"\d{18}", code):
        return "not an SSCC pattern"
    if gs1_check_digit(code[:17]) != int(code[17]):
        return "SSCC check digit mismatch"
    return None


FORMATS: dict[str, Callable[[str], str | None]] = {
    "s10": _s10,
    "dhl_express": _dhl_express,
    "ups_1z": _ups_1z,
    "fedex_12": _fedex_12,
    "sscc": _sscc,
}


def check_code(raw: str, accept: Iterable[str]) -> WaybillCheck:
    """Check ``raw`` against the accepted formats, in the order given.

    Never raises on bad input: any string gets a ``WaybillCheck``.
    """
    code = normalize(raw)
    if not code:
        return WaybillCheck(code, False, None, "empty code")
    if not code.isascii() or not code.isalnum():
        return WaybillCheck(code, False, None, "code has characters outside A-Z and 0-9")
    problems = []
    for name in accept:
        problem = FORMATS[name](code)
        if problem is None:
            return WaybillCheck(code, True, name, None)
        problems.append(problem)
    # Prefer the message of a format whose shape matched (a wrong check digit says more
    # than "not an X pattern").
    specific = [p for p in problems if not p.startswith("not ")]
    return WaybillCheck(code, False, None, (specific or problems or ["no format accepted"])[0])
