"""`sortgate bench sweep`: the line at several parcel rates, one `bench line` run each.

Each rate runs for the same time on the same seed; the belt speed rises with the rate where the
parcels would otherwise not fit on the belt (a mean pitch of at least ``MIN_PITCH_M``: parcels are
0.10..0.20 m long with gaps of at least 0.10 m). Each run measures the agent's idle CPU first, so
that every row has its own marginal cost. Figures come from the simulator's side, as in
`bench line`; the table, the JSON and the plot are all made from the same rows.
"""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hw_sim.harness import RunSpec, run_line
from hw_sim.plan import make_plan

__all__ = ["MIN_PITCH_M", "belt_speed", "plot", "run_sweep", "table"]

#: the mean distance from one parcel's leading edge to the next one's that a sweep keeps
MIN_PITCH_M = 0.3
#: the belt speed of the ordinary line (m/s); faster only where the rate needs it
BASE_SPEED_MPS = 3.0

COLUMNS: list[tuple[str, str]] = [
    ("rate", "parcels/s"),
    ("speed_mps", "belt m/s"),
    ("parcels", "parcels"),
    ("decision_p99_ms", "decision p99 ms"),
    ("trigger_seen_p99_ms", "trigger seen p99 ms"),
    ("idle_cpu_pct", "idle CPU %"),
    ("cpu_pct", "CPU % while running"),
    ("cpu_ms_per_parcel", "CPU ms/parcel"),
    ("cpu_ms_per_parcel_marginal", "marginal ms/parcel"),
    ("late", "late"),
    ("wrongly_released", "wrongly released"),
    ("records_missing", "records missing"),
]


def belt_speed(rate: float) -> float:
    """The slowest belt speed, from BASE_SPEED_MPS up in 0.5 m/s steps, that gives ``rate``
    parcels a second a mean pitch of at least MIN_PITCH_M."""
    speed = BASE_SPEED_MPS
    while speed / rate < MIN_PITCH_M:
        speed += 0.5
    return speed


def _row(rate: float, speed: float, m: dict[str, Any]) -> dict[str, Any]:
    idle, marginal = m.get("idle_cpu_pct"), m.get("cpu_ms_per_parcel_marginal")
    cpu_pct = None
    if idle is not None and marginal is not None:
        cpu_pct = round(idle + marginal * rate / 10, 2)  # ms of CPU a second, as % of one core
    return {
        "rate": rate,
        "speed_mps": speed,
        "parcels": m["parcels"],
        "decision_p99_ms": m["decision_ms"]["p99"],
        "trigger_seen_p99_ms": (m.get("trigger_seen_ms") or {}).get("p99"),
        "idle_cpu_pct": idle,
        "cpu_pct": cpu_pct,
        "cpu_ms_per_parcel": m.get("cpu_ms_per_parcel"),
        "cpu_ms_per_parcel_marginal": marginal,
        "late": m["late"],
        "wrongly_released": m["wrongly_released"],
        "records_missing": m["parcels"] - m["records_published"],
        "line": m,
    }


def run_sweep(
    rates: list[float],
    seconds: float,
    idle_s: float = 20.0,
    seed: int = 1,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One `bench line` run per rate, ``seconds`` of parcels each; returns the rows."""
    rows = []
    for rate in rates:
        speed = belt_speed(rate)
        n = max(int(rate * seconds), 1)
        plan = make_plan(n, rate, seed, speed)
        spec = RunSpec(parcels=n, rate=rate, seed=seed, speed_mps=speed, plan=plan, idle_s=idle_s)
        _, metrics = asyncio.run(run_line(spec))
        row = _row(rate, speed, metrics)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def _cell(v: Any) -> str:
    return "–" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def machine() -> str:
    cores = len(__import__("os").sched_getaffinity(0))
    return f"{platform.machine()}, {cores} cores, Python {platform.python_version()}"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Decision p99, CPU and late parcels against the rate, as a PNG (matplotlib, a dev extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["rate"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
    ax = axes[0]
    ax.plot(rates, [r["decision_p99_ms"] for r in rows], "o-", label="decision p99")
    ax.plot(rates, [r["trigger_seen_p99_ms"] for r in rows], "s--", label="trigger seen p99")
    ax.set(xlabel="parcels / s", ylabel="ms", title="Latency")
    ax.legend()
    ax = axes[1]
    ax.plot(rates, [r["cpu_pct"] for r in rows], "o-", label="CPU while running, % of a core")
    ax.plot(rates, [r["idle_cpu_pct"] for r in rows], "s--", label="idle CPU, % of a core")
    ax.plot(rates, [r["cpu_ms_per_parcel_marginal"] for r in rows], "^:", label="marginal ms / parcel")
    ax.set(xlabel="parcels / s", title="Agent CPU")
    ax.legend()
    ax = axes[2]
    late = [r["late"] for r in rows]
    ax.bar(rates, late, width=1.0)
    ax.set_ylim(0, max([*late, 1]) * 1.2)
    for rate, n in zip(rates, late, strict=True):
        ax.annotate(str(n), (rate, n), ha="center", va="bottom")
    ax.set(xlabel="parcels / s", ylabel="parcels", title="Late (command after the decision point)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"sortgate bench sweep — {machine()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
