"""The parcel plan: what arrives at the scan point, when, and where it has to go. Pure and seeded.

A plan is decided before the run, so the ground truth does not depend on what the agent does.
Each parcel has a label kind (what is physically printed) and a verdict kind (what central knows):

  label:   ok | noread (damaged/hidden label) | multi (two different waybills) | bad_check
  verdict: release | inspect | hold | none (central has nothing for it)

A parcel has to go to release only if its label is ok and central says release; everything else
has to go to inspection. Counts of each kind are exact (rounded from the fractions) and shuffled,
so a 2,000-parcel run has exactly the mix it claims.

Belt physics: the belt runs at ``speed_mps``; parcels are 0.10–0.20 m long (e-commerce polybags)
with at least ``min_gap_m`` between them; the pitch averages ``speed / rate``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from hw_sim import waybills
from hw_sim.reader_faults import TUNNEL


@dataclass(frozen=True)
class Mix:
    inspect: float = 0.20
    hold: float = 0.04
    no_verdict: float = 0.02
    noread: float = 0.02
    multi: float = 0.01
    bad_check: float = 0.01
    reader_misread: float = 0.002  # reader garbles a good label (check digit catches it)
    hidden_item: float = 0.0  # share of all parcels: "release" verdict, good label, prohibited item inside


@dataclass(frozen=True)
class SortMix:
    """What a line with a sort plan adds to the plan: hold reasons, consolidation groups, and
    labels a reader can read on a later pass round the loop."""

    hold_reasons: tuple[str, ...] = ()  # drawn evenly for every hold verdict
    groups: tuple[str, ...] = ()  # drawn evenly for the share ``grouped`` of release verdicts
    grouped: float = 0.6
    readable_again: float = 0.5  # share of unreadable labels that a reader reads on the second pass


@dataclass(frozen=True)
class PlannedParcel:
    index: int
    offset_s: float  # when its leading edge reaches the scan point, from run start
    length_m: float
    label: str  # ok | noread | multi | bad_check
    codes: tuple[str, ...]  # what is printed on it
    verdict: str  # release | inspect | hold | none
    waybill: str | None  # the code central knows it by (first printed code)
    reader_misread: bool
    decode_ms: tuple[float, ...]  # per reader: its frame leaves this long after the trailing edge
    item: str | None = None  # a prohibited item inside (battery, blade, firearm, liquid)
    scan_ms: float = 100.0  # X-ray image export delay after the trigger
    hold_reason: str | None = None  # a hold verdict's reason (sort plans)
    group: str | None = None  # a release verdict's consolidation group (sort plans)
    readable_on_pass: int | None = None  # an unreadable label a reader reads from this pass on (0: first)

    @property
    def hidden_item(self) -> bool:
        """Central said release, the label is good, but the image shows a prohibited item."""
        return self.item is not None and self.label == "ok" and self.verdict == "release"

    @property
    def expected_lane(self) -> str:
        return "release" if self.label == "ok" and self.verdict == "release" else "inspection"


@dataclass(frozen=True)
class Plan:
    parcels: list[PlannedParcel]
    speed_mps: float
    rate: float
    seed: int
    mix: Mix = field(default_factory=Mix)

    @property
    def duration_s(self) -> float:
        return self.parcels[-1].offset_s if self.parcels else 0.0


def _exact(n: int, rng: random.Random, kinds: list[tuple[str, float]], rest: str) -> list[str]:
    out: list[str] = []
    for name, frac in kinds:
        out += [name] * round(n * frac)
    out += [rest] * (n - len(out))
    rng.shuffle(out)
    return out[:n]


def make_plan(
    n: int,
    rate: float,
    seed: int = 1,
    speed_mps: float = 3.0,
    readers: int = 1,
    min_gap_m: float = 0.10,
    mix: Mix | None = None,
    sort: SortMix | None = None,
) -> Plan:
    mix = mix or Mix()
    rng = random.Random(seed)
    labels = _exact(n, rng, [("noread", mix.noread), ("multi", mix.multi), ("bad_check", mix.bad_check)], "ok")
    verdicts = _exact(
        n, rng, [("inspect", mix.inspect), ("hold", mix.hold), ("none", mix.no_verdict)], "release"
    )
    # hidden items: exactly round(n * share) of the parcels that would otherwise be released
    releasable = [i for i in range(n) if labels[i] == "ok" and verdicts[i] == "release"]
    # (a separate generator, so that plans without images stay exactly as they were)
    img_rng = random.Random(seed + 99_991)
    hidden = set(img_rng.sample(releasable, min(len(releasable), round(n * mix.hidden_item))))
    targets = ("battery", "blade", "firearm", "liquid")
    mean_pitch = speed_mps / rate
    parcels = []
    t = 1.0
    for i in range(n):
        length = rng.uniform(0.10, 0.20)
        code = waybills.any_valid(rng)
        label = labels[i]
        if label == "multi":
            codes: tuple[str, ...] = (code, waybills.any_valid(rng))
        elif label == "bad_check":
            codes = (waybills.corrupt_check_digit(code),)
        else:
            codes = (code,)
        # each reader's processing after its reading gate closes (the parcel's trailing edge)
        decode = tuple(rng.uniform(*TUNNEL.processing_ms) for _ in range(readers))
        parcels.append(
            PlannedParcel(
                index=i,
                offset_s=t,
                length_m=length,
                label=label,
                codes=codes,
                verdict=verdicts[i],
                waybill=codes[0],
                reader_misread=label == "ok" and rng.random() < mix.reader_misread and i not in hidden,
                decode_ms=decode,
                item=targets[i % 4] if i in hidden else None,
                scan_ms=img_rng.uniform(60.0, 140.0),
            )
        )
        # next leading edge: this parcel's length plus a gap of at least min_gap_m, with the
        # mean pitch matching the requested rate
        min_pitch = length + min_gap_m
        extra = max(mean_pitch - 0.15 - min_gap_m, 0.0)
        pitch = min_pitch + (rng.expovariate(1 / extra) if extra > 0 else 0.0)
        t += pitch / speed_mps
    if sort is not None:  # (its own generator: plans without a sort plan stay exactly as they were)
        parcels = _sorted(parcels, sort, random.Random(seed + 31_337))
    return Plan(parcels, speed_mps, rate, seed, mix)


def _sorted(parcels: list[PlannedParcel], sort: SortMix, rng: random.Random) -> list[PlannedParcel]:
    out = []
    for p in parcels:
        hold = rng.choice(sort.hold_reasons) if p.verdict == "hold" and sort.hold_reasons else None
        group = (rng.choice(sort.groups) if p.verdict == "release" and sort.groups and rng.random() < sort.grouped
                 else None)
        again = 1 if p.label == "noread" and rng.random() < sort.readable_again else None
        out.append(replace(p, hold_reason=hold, group=group, readable_on_pass=again))
    return out
