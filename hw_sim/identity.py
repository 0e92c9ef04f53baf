"""Identity at scale: the matching and decision logic in virtual time, with ground truth.

``sortgate bench identity`` runs the agent's own ``Matcher``, ``capture_interval`` and ``decide``
— the very code of the pipeline — against a simulated line in virtual time: no wires, no sleeping,
so a million parcels take minutes, not days. What is simulated is everything the pipeline cannot
see directly:

* a belt whose speed changes (ramps between 0.5 and 3.5 m/s), parcels of 0.1–0.8 m with gaps of at
  least 0.1 m, and bursts of back-to-back polybags at the minimum gap;
* the controller: the encoder latched at each leading edge, the ring entry published up to
  ``PUBLISH_S`` later, the length measured;
* the agent's polls every ``POLL_S`` (each trigger and each trailing edge is first seen by the poll
  after it, exactly as on the wire), and an immediate poll when a reader frame arrives;
* readers (``hw_sim.reader_faults``): a frame 3–8 ms after the trailing edge plus transit and
  occasional latency spikes inside the window, with or without a trigger counter, and every reader
  fault at a given rate;
* agent restarts: the agent is dead for 0.5–2 s (frames meanwhile are lost, its triggers never
  seen) and starts again with a fresh matcher.

After every decision it checks the record against ground truth: no read and no waybill may carry a
code printed on another parcel, and nothing may be released that ground truth sends to inspection.
The first violation stops the run with the parcel's story (``IdentityViolation``).
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.pipeline.decision import DecisionInputs, ReaderOutcome, VerdictLookup, decide
from agent.pipeline.matching import Capture, Matcher, Note, Outcome, SourceSpec, capture_interval
from agent.pipeline.waybill import FORMATS
from hw_sim import waybills
from hw_sim.reader_faults import FAULTS, RESTART_S, TUNNEL, plan_cycles

POLL_S = 0.004
RTT_S = 0.0005
PUBLISH_S = 0.001  # the controller shows a trigger in its ring at most this long after the edge
COUNTS_PER_M = 1000
DECISION_M = 1.5
MARGIN_S = 0.08  # safety margin plus the reserve for look-up and command
WINDOW_S = (0.002, 0.016)  # the agent's reader window after the trailing edge
ACCEPT = tuple(FORMATS)


class IdentityViolation(AssertionError):
    """A record carried another parcel's code, or a parcel was released wrongly."""


@dataclass(slots=True)
class _Parcel:
    index: int
    lead: float
    trail: float
    speed: float  # m/s while it passes
    codes: tuple[str, ...]
    label: str  # ok | noread | multi | bad_check | misread
    verdict: str  # release | inspect | hold | none
    reads: dict[str, ReaderOutcome] = field(default_factory=dict)
    seen: bool = False
    decided: bool = False
    released: bool = False
    reasons: tuple[str, ...] = ()
    faults: list[str] = field(default_factory=list)

    @property
    def should_release(self) -> bool:
        return self.label == "ok" and self.verdict == "release"


@dataclass
class IdentitySpec:
    parcels: int = 100_000
    seed: int = 1
    readers: int = 2
    counter: str = "all"  # all | none | mixed (the first reader counts, the others do not)
    faults: tuple[str, ...] = FAULTS
    fault_rate: float = 0.01  # per parcel and reader
    restart_every: int = 20_000  # parcels between agent restarts, on average (0: none)


class IdentityRun:
    def __init__(self, spec: IdentitySpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.fault_rng = random.Random(spec.seed + 1)
        names = [f"reader{i + 1}" for i in range(spec.readers)]
        self.counted = {n: spec.counter == "all" or (spec.counter == "mixed" and i == 0) for i, n in enumerate(names)}
        self.sources = [
            SourceSpec(n, *WINDOW_S, "trailing_edge", 10_000 if self.counted[n] else None) for n in names
        ]
        self.names = names
        self.events: list[tuple[float, int, str, Any]] = []
        self._n = 0
        self.parcels: dict[int, _Parcel] = {}  # undecided, by trigger seq
        self.code_owner: dict[str, int] = {}
        self.figures: Counter[str] = Counter()
        self.needless: Counter[str] = Counter()
        self.reader_counter = dict.fromkeys(names, 0)
        self.reader_down_until = dict.fromkeys(names, -1.0)
        self.agent_up = True
        self.agent_down_until = -1.0
        self.matcher = self._new_matcher(0.0)
        self.phase = self.rng.uniform(0, POLL_S)
        self.unseen: list[tuple[float, int, _Parcel]] = []  # heap: (published, seq, parcel)
        self.untrailed: list[tuple[float, int, _Parcel]] = []  # heap: (trailing edge, seq, parcel)
        self.last_poll = 0.0  # when the last poll the agent processed was sent
        self.ignore_before = 0.0  # triggers published before this are not the running agent's

    # --- the agent side ---------------------------------------------------------------------
    def _new_matcher(self, known_since: float) -> Matcher:
        m = Matcher(self.sources, max_pass_s=0.8 / 0.5)
        m.new_session(known_since)
        return m

    def _poll_after(self, t: float) -> float:
        """The first poll sent at or after ``t``."""
        k = -(-(t - self.phase) // POLL_S)
        return self.phase + k * POLL_S

    def _push(self, t: float, kind: str, data: Any) -> None:
        self._n += 1
        heapq.heappush(self.events, (t, self._n, kind, data))

    # --- the line -----------------------------------------------------------------------------
    def _plan(self) -> None:
        """Lay every parcel on the belt and schedule what the agent will see of it."""
        rng = self.rng
        t = 1.0
        speed = target = 2.0
        burst = 0
        seq = 0
        restart_at = self._next_restart(0)
        for i in range(self.spec.parcels):
            if i == restart_at:
                down = rng.uniform(0.5, 2.0)
                self._push(t - 0.05, "agent_down", down)
                restart_at = self._next_restart(i)
            # the belt ramps towards a target speed; a new target now and then
            if rng.random() < 0.002:
                target = rng.uniform(0.5, 3.5)
            speed += max(-0.05, min(0.05, target - speed))
            if burst == 0 and rng.random() < 0.01:
                burst = rng.randint(5, 30)
            if burst:
                burst -= 1
                length = rng.uniform(0.10, 0.25)
                gap = 0.10
            else:
                length = rng.uniform(0.10, 0.30) if rng.random() < 0.7 else rng.uniform(0.30, 0.80)
                gap = 0.10 + rng.expovariate(1 / 0.25)
            p = self._make_parcel(i, t, length, speed, rng)
            seq = 1 if seq >= 0xFFFF else seq + 1
            self._schedule_parcel(seq, p)
            t = p.trail + gap / speed

    def _next_restart(self, i: int) -> int:
        every = self.spec.restart_every
        return i + max(1000, int(self.rng.expovariate(1 / every))) if every else -1

    def _unique(self, rng: random.Random) -> str:
        """A waybill no other parcel of the run carries (a million random ones can repeat)."""
        while (code := waybills.any_valid(rng)) in self.code_owner:
            pass
        return code

    def _make_parcel(self, i: int, lead: float, length: float, speed: float, rng: random.Random) -> _Parcel:
        code = self._unique(rng)
        r = rng.random()
        label = "ok" if r < 0.955 else "noread" if r < 0.975 else "multi" if r < 0.985 else (
            "bad_check" if r < 0.995 else "misread")
        if label == "multi":
            codes: tuple[str, ...] = (code, self._unique(rng))
        elif label == "bad_check":
            codes = (waybills.corrupt_check_digit(code),)
        else:
            codes = (code,)
        for c in codes:
            self.code_owner[c] = i
        v = rng.random()
        verdict = "release" if v < 0.75 else "inspect" if v < 0.95 else "hold" if v < 0.98 else "none"
        return _Parcel(i, lead, lead + length / speed, speed, codes, label, verdict)

    def _schedule_parcel(self, seq: int, p: _Parcel) -> None:
        rng = self.rng
        # the controller publishes the trigger; the first poll after that shows it, and the first
        # poll after its trailing edge shows the encoder past it
        published = p.lead + rng.uniform(0, PUBLISH_S)
        heapq.heappush(self.unseen, (published, seq, p))
        heapq.heappush(self.untrailed, (p.trail, seq, p))
        self._push(self._poll_after(published) + RTT_S, "poll", self._poll_after(published))
        self._push(self._poll_after(p.trail) + RTT_S, "poll", self._poll_after(p.trail))
        deadline = p.lead + DECISION_M / p.speed - MARGIN_S
        self._push(deadline, "deadline", (seq, p))
        self._push(p.trail + WINDOW_S[1] + 2 * POLL_S + 0.01, "tick", None)
        codes = None if p.label == "noread" else p.codes
        if p.label == "misread":
            codes = (waybills.misread(p.codes[0], rng),)
        for name in self.names:
            self._reader_cycles(p, name, codes)

    def _reader_cycles(self, p: _Parcel, name: str, codes: tuple[str, ...] | None) -> None:
        rng = self.fault_rng
        fault = rng.choice(self.spec.faults) if self.spec.faults and rng.random() < self.spec.fault_rate else None
        if fault:
            p.faults.append(fault)
            self.figures[f"fault_{fault}"] += 1
        if fault == "restart":
            self.reader_counter[name] = 0
            self.reader_down_until[name] = p.lead + RESTART_S
            return
        if p.lead < self.reader_down_until[name]:
            return
        processing = rng.uniform(TUNNEL.processing_ms[0] / 1000, TUNNEL.processing_ms[1] / 1000)
        passing = p.trail - p.lead
        pitch = 0.15  # for the delay fault: roughly the next parcel's
        cycles = plan_cycles(codes, passing, processing, pitch, passing + pitch, fault, rng)
        for cycle in cycles:
            self.reader_counter[name] = (self.reader_counter[name] + 1) % 10_000
            if not cycle.send:
                continue
            transit = rng.uniform(0.0, 0.001) + (rng.uniform(0.0, 0.006) if rng.random() < 0.01 else 0.0)
            frame = _Frame(cycle.codes, self.reader_counter[name] if self.counted[name] else None)
            at = p.lead + cycle.at + transit
            self._push(at, "frame", (name, frame))
            if cycle.repeat_after is not None:
                self._push(at + cycle.repeat_after, "frame", (name, frame))

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        self._plan()
        events = self.events
        while events:
            t, _, kind, data = heapq.heappop(events)
            self._handle(t, kind, data)
        elapsed = time.perf_counter() - started
        f = self.figures
        return {
            "bench": "identity",
            "parcels": self.spec.parcels,
            "readers": self.spec.readers,
            "counter": self.spec.counter,
            "fault_rate": self.spec.fault_rate,
            "decided": f["decided"],  # the rest were triggered while no agent ran (controller default)
            "released": f["released"],
            "wrong_identity": f["wrong_identity"],
            "wrongly_released": f["wrongly_released"],
            "needless_inspections": dict(sorted(self.needless.items())),
            "needless_inspected_parcels": f["needless"],
            "not_decided": self.spec.parcels - f["decided"],
            "agent_restarts": f["agent_restarts"],
            "reader_faults": {k[6:]: v for k, v in sorted(f.items()) if k.startswith("fault_")},
            "parcels_per_s": round(self.spec.parcels / elapsed),
            "seconds": round(elapsed, 1),
        }

    def _handle(self, t: float, kind: str, data: Any) -> None:
        if kind == "agent_down":
            self._agent_down(t, data)
            return
        if kind == "agent_up":
            self.agent_up = True
            first_poll = self._poll_after(t)
            self.ignore_before = first_poll  # the new agent starts from the ring's head
            self.matcher = self._new_matcher(first_poll + RTT_S)
            return
        if not self.agent_up:
            return  # a dead agent sees nothing; the reader's bytes are dropped when it reopens
        m = self.matcher
        if kind == "poll":
            self._poll(t, data)
        elif kind == "frame":
            name, frame = data
            self._apply(t, m.add_frame(name, frame, t, frame.counter))
            if m.holding():  # the agent polls at once; the answer comes back a round trip later
                self._push(t + RTT_S, "poll", t)
            return
        elif kind == "deadline":
            seq, p = data
            assert isinstance(p, _Parcel)
            if self.parcels.get(seq) is p and not p.decided:
                # as the parcel task does at its deadline: what is not final becomes a time-out, and
                # the parcel is decided once (with room left for the command: not late)
                self._apply(t, m.give_up(seq))
                if not p.decided:
                    self._decide(t, seq, p, late=False)
            return
        self._apply(t, m.advance(t))

    def _poll(self, now: float, sent: float) -> None:
        """A status poll sent at ``sent`` returns at ``now``: what it shows, in the agent's order
        (new triggers, trailing edges the encoder has passed, then the horizon)."""
        if sent <= self.last_poll:
            return  # a poll that already happened
        m = self.matcher
        after = self.last_poll  # that poll did not show what this one shows
        while self.unseen and self.unseen[0][0] <= sent:
            published, seq, p = heapq.heappop(self.unseen)
            if published <= self.ignore_before or sent + RTT_S <= m.known_since:
                continue  # in the ring before this agent read its head: never decided by it
            self.parcels[seq] = p
            travelled = round((sent + RTT_S / 2 - p.lead) * p.speed * COUNTS_PER_M)
            cps = p.speed * COUNTS_PER_M * self.rng.uniform(0.98, 1.02)  # the agent's speed estimate
            lo, hi = capture_interval(sent, now, after - PUBLISH_S, travelled, cps, PUBLISH_S)
            m.add_trigger(Capture(seq, lo, hi, measured=True))
        while self.untrailed and self.untrailed[0][0] <= sent:
            _, seq, p = heapq.heappop(self.untrailed)
            if self.parcels.get(seq) is p:
                past = round((sent + RTT_S / 2 - p.trail) * p.speed * COUNTS_PER_M)
                cps = p.speed * COUNTS_PER_M * self.rng.uniform(0.98, 1.02)
                lo, hi = capture_interval(sent, now, after - PUBLISH_S, past, cps, PUBLISH_S)
                m.set_trailing(seq, lo, hi)
        m.set_horizon(sent - PUBLISH_S)
        self.last_poll = sent

    def _agent_down(self, t: float, down: float) -> None:
        self.agent_up = False
        self.figures["agent_restarts"] += 1
        for p in self.parcels.values():
            p.seen = False  # their tasks died with the agent: the controller defaults them
        self.parcels.clear()
        self._push(t + down, "agent_up", None)

    def _apply(self, t: float, events: Sequence[Outcome | Note]) -> None:
        for ev in events:
            if isinstance(ev, Note):
                self.figures[f"note_{ev.kind}"] += 1
                continue
            p = self.parcels.get(ev.seq)
            if p is None or p.decided:
                continue
            frame = ev.payload if ev.status == "read" else None
            p.reads[ev.source] = ReaderOutcome(
                ev.source, tuple(frame.codes or ()) if frame else (), no_read=bool(frame and not frame.codes),
                timed_out=ev.status == "timed_out",
                problem="unmatched" if ev.unmatched else (
                    ev.status if ev.status in ("ambiguous", "conflict") else None
                ),
                counter=ev.counter,
            )
            if len(p.reads) == len(self.names):
                self._decide(t, ev.seq, p, late=False)

    def _decide(self, t: float, seq: int, p: _Parcel, late: bool) -> None:
        p.decided = True
        self.parcels.pop(seq, None)
        reads = tuple(p.reads.get(n) or ReaderOutcome(n, timed_out=True) for n in self.names)
        waybill_codes = {c for r in reads for c in r.codes}
        verdict = VerdictLookup("hit", p.verdict) if p.verdict != "none" else VerdictLookup("miss")
        d = decide(DecisionInputs(reads, ACCEPT, verdict, None, late=late))
        f = self.figures
        f["decided"] += 1
        foreign = [c for c in waybill_codes if self.code_owner.get(c, p.index) != p.index]
        if foreign or (d.waybill is not None and d.waybill not in p.codes):
            f["wrong_identity"] += 1
            raise IdentityViolation(
                f"parcel {p.index} (seq {seq}, printed {p.codes}, faults {p.faults}) got {foreign or d.waybill}"
                f" from parcel(s) {[self.code_owner.get(c) for c in foreign]}; reads {reads}"
            )
        if d.released:
            f["released"] += 1
            if not p.should_release:
                f["wrongly_released"] += 1
                raise IdentityViolation(f"parcel {p.index} released: label {p.label}, verdict {p.verdict}")
        elif p.should_release:
            f["needless"] += 1
            for reason in d.reasons:
                self.needless[reason] += 1


@dataclass(frozen=True, slots=True)
class _Frame:
    codes: tuple[str, ...] | None
    counter: int | None

    @property
    def raw(self) -> tuple[tuple[str, ...] | None, int | None]:
        return self.codes, self.counter


def run_identity(spec: IdentitySpec) -> dict[str, Any]:
    return IdentityRun(spec).run()
