"""Generate waybill numbers with correct (or deliberately wrong) check digits."""

from __future__ import annotations

import random
import string

from agent.pipeline.waybill import check_code, gs1_check_digit

_S10_PREFIXES = ["EE", "LX", "RB", "CP", "UA", "LP", "RR"]
_S10_COUNTRIES = ["CN", "HK", "GB", "US", "DE", "FR", "JP", "SG", "KR", "NL"]


def s10(rng: random.Random) -> str:
    serial = f"{rng.randrange(10**8):08d}"
    total = sum(int(d) * w for d, w in zip(serial, (8, 6, 4, 2, 3, 5, 9, 7), strict=True))
    cd = 11 - total % 11
    cd = {10: 0, 11: 5}.get(cd, cd)
    return f"{rng.choice(_S10_PREFIXES)}{serial}{cd}{rng.choice(_S10_COUNTRIES)}"


def dhl_express(rng: random.Random) -> str:
    serial = rng.randrange(10**9, 10**10)
    return f"{serial}{serial % 7}"


def ups_1z(rng: random.Random) -> str:
    alnum = string.ascii_uppercase + string.digits
    body = "".join(rng.choice(alnum) for _ in range(6)) + f"{rng.randrange(100):02d}"
    body += f"{rng.randrange(10**7):07d}"
    for cd in range(10):
        if check_code(f"1Z{body}{cd}", ["ups_1z"]).valid:
            return f"1Z{body}{cd}"
    raise AssertionError("unreachable: one check digit always fits")


def fedex_12(rng: random.Random) -> str:
    body = f"{rng.randrange(10**11):011d}"
    total = sum(int(d) * w for d, w in zip(body, (3, 1, 7) * 4, strict=False))
    return f"{body}{total % 11 % 10}"


def sscc(rng: random.Random) -> str:
    body = f"{rng.randrange(10):d}{rng.randrange(10**16):016d}"
    return f"{body}{gs1_check_digit(body)}"


GENERATORS = {"s10": s10, "dhl_express": dhl_express, "ups_1z": ups_1z, "fedex_12": fedex_12, "sscc": sscc}
#: e-commerce polybags: mostly postal S10, the rest express carriers
MIX = [("s10", 0.6), ("ups_1z", 0.1), ("dhl_express", 0.1), ("fedex_12", 0.1), ("sscc", 0.1)]


def any_valid(rng: random.Random) -> str:
    r = rng.random()
    for name, p in MIX:
        if r < p:
            return GENERATORS[name](rng)
        r -= p
    return GENERATORS[MIX[-1][0]](rng)


def corrupt_check_digit(code: str) -> str:
    """Same code with a wrong check digit (what a mis-printed label carries)."""
    if code.startswith("1Z") or code[-1].isdigit():
        i = len(code) - 1
    else:  # S10: check digit before the country code
        i = len(code) - 3
    # Every other digit, until the result is valid in no format at all (an 11-digit DHL number
    # with a wrong mod-7 digit could otherwise still pass as something else).
    for step in range(1, 10):
        out = code[:i] + str((int(code[i]) + step) % 10) + code[i + 1 :]
        if not check_code(out, list(GENERATORS)).valid:
            return out
    raise AssertionError(f"no invalid variant of {code}")


def misread(code: str, rng: random.Random) -> str:
    """A reader's substitution error: one digit replaced by another, invalid in every format.

    A check digit does not catch every substitution (S10's mod 11 maps two remainders to 5), but
    the barcode symbology's own check character (Code 128's) makes a misread that is still a
    valid waybill vanishingly rare on a real reader; the simulator does not produce one."""
    digits = [i for i, ch in enumerate(code) if ch.isdigit()]
    while True:
        i = rng.choice(digits)
        out = code[:i] + str((int(code[i]) + rng.randrange(1, 10)) % 10) + code[i + 1 :]
        if not check_code(out, list(GENERATORS)).valid:
            return out
