"""Waybill validators against the public conformance numbers (jkeen/tracking_number_data, MIT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.pipeline.waybill import FORMATS, check_code, gs1_check_digit

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "tracking_number_data"

# Our format name -> (courier file, tracking_numbers id/name) in the shared data set.
SOURCES = {
    "s10": ("s10.json", "s10"),
    "dhl_express": ("dhl.json", "dhl_express"),
    "ups_1z": ("ups.json", "ups"),
    "fedex_12": ("fedex.json", "fedex_12"),
    "sscc": ("fedex.json", "fedex_ground_sscc_18"),
}

# Copied from the data set so the tests also run where shared/ is absent.
EMBEDDED = {
    "s10": (["RB123456785GB", "RB123456785US", "RB123456785CV", "RB123456785CF"],
            ["RB123456786US", "RB123456785XX"]),
    "dhl_express": (["3318810025", "73891051146", "8487135506", "1099255990", "3821724944",
                     "3318810036", "3318810014"], ["3318810010", "3318810034", "3318810011"]),
    "ups_1z": (["1Z5R89390357567127", "1Z879E930346834440", "1Z410E7W0392751591",
                "1Z8V92A70367203024", " 1 Z 8 V 9 2 A 7 0 3 6 7 2 0 3 0 2 4 ",
                "1ZXX3150YW44070023"],
               ["2Z5R89390357567127", "1A5R89390357567127", "1Z1111111111111111"]),
    "fedex_12": (["986578788855", "477179081230", "799531274483", "790535312317",
                  " 7 9 0 5 3 5 3 1 2 3 1 7 ", "974367662710"], ["996578788855"]),
    "sscc": (["00 0123 4500 0000 0027", " 0 0   0 1 2 3   4 5 0 0   0 0 0 0   0 0 2 7 "],
             ["000000000000000001"]),
}


def _public_numbers(fmt: str) -> tuple[list[str], list[str]]:
    path, ident = SOURCES[fmt]
    if not (DATA / path).exists():
        return EMBEDDED[fmt]
    courier = json.loads((DATA / path).read_text())
    for entry in courier["tracking_numbers"]:
        if entry.get("id", entry["name"]) == ident:
            return entry["test_numbers"]["valid"], entry["test_numbers"]["invalid"]
    raise AssertionError(f"{ident} not found in {path}")


CASES = [(fmt, num, True) for fmt in SOURCES for num in _public_numbers(fmt)[0]] + [
    (fmt, num, False) for fmt in SOURCES for num in _public_numbers(fmt)[1]
]


@pytest.mark.parametrize(("fmt", "number", "valid"), CASES)
def test_public_numbers(fmt: str, number: str, valid: bool) -> None:
    result = check_code(number, [fmt])
    assert result.valid is valid, result
    if valid:
        assert result.format == fmt
    else:
        assert result.problem


def test_embedded_copy_matches_shared_data() -> None:
    if not DATA.exists():
        pytest.skip("shared/ data set not present beside the checkout")
    for fmt in SOURCES:
        valid, invalid = _public_numbers(fmt)
        assert (valid, invalid) == EMBEDDED[fmt]


def test_s10_check_digit_special_cases() -> None:
    # mod-11 remainder 1 gives 10 -> check digit 0; remainder 0 gives 11 -> check digit 5.
    from agent.pipeline.waybill import _s10

    for serial in ("00000000", "12345678", "99999999", "00000001", "31415926"):
        total = sum(int(d) * w for d, w in zip(serial, (8, 6, 4, 2, 3, 5, 9, 7), strict=True))
        cd = {10: 0, 11: 5}.get(11 - total % 11, 11 - total % 11)
        assert _s10(f"EE{serial}{cd}CN") is None
        assert _s10(f"EE{serial}{(cd + 1) % 10}CN") is not None


def test_gs1_check_digit_known_value() -> None:
    # Same GS1 mod-10 as EAN-13; 4006381333931 is the textbook EAN-13 example.
    assert gs1_check_digit("400638133393") == 1


@pytest.mark.parametrize(
    "garbage",
    ["", "   ", "\x00\x01\x02", "RB12345678\u00e9GB", "NOREAD", "1Z" + "A" * 500, "💥", "-- --"],
)
def test_garbage_is_invalid_never_raises(garbage: str) -> None:
    result = check_code(garbage, list(FORMATS))
    assert result.valid is False
    assert result.problem


def test_order_of_accepted_formats_and_restriction() -> None:
    # A valid UPS number is invalid where only S10 is accepted.
    assert check_code("1Z5R89390357567127", ["s10"]).valid is False
    assert check_code("1Z5R89390357567127", ["s10", "ups_1z"]).format == "ups_1z"


def test_wrong_check_digit_message_is_specific() -> None:
    result = check_code("RB123456786US", list(FORMATS))
    assert result.problem == "S10 check digit 6 != 5"
