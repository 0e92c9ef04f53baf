"""Line statistics for central, every ``[health] stats_interval_s`` (``{root}/stats``, QoS 0)."""

from __future__ import annotations

import time
from typing import Any

from agent.central import messages
from agent.config import Config
from agent.pipeline.state import LineState, Metrics

__all__ = ["StatsReporter", "percentile"]


def percentile(values: list[float], q: float, digits: int = 2) -> float | None:
    """The nearest-rank ``q`` quantile (0..1) of ``values``; None when there are none."""
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], digits)


class StatsReporter:
    """Figures for the interval since the last report, and the counters' totals."""

    def __init__(self, cfg: Config, metrics: Metrics, state: LineState) -> None:
        self.cfg, self.metrics, self.state = cfg, metrics, state
        self._mark: tuple[float, dict[str, int], int] = (time.monotonic(), {}, 0)

    def report(self, now: float, outbox_pending: int, problems: list[str]) -> dict[str, Any]:
        """``problems``: everything wrong now (the line's and the agent's links)."""
        t0, before, lat_from = self._mark
        counters = dict(self.metrics.counters)
        delta = {k: v - before.get(k, 0) for k, v in counters.items()}
        latencies = self.metrics.latencies_ms
        lat = latencies[lat_from:]
        if len(latencies) > 100_000:  # bounded memory; the next interval starts after the cut
            del latencies[:50_000]
        self._mark = (now, counters, len(latencies))
        interval = max(now - t0, 1e-6)
        parcels = delta.get("triggers", 0)
        released = delta.get("decided_release", 0) + delta.get("decided_consolidation", 0)
        return {
            "schema": messages.SCHEMA_STATS,
            "at": messages.iso(),
            "site": self.cfg.line.site,
            "line": self.cfg.line.line,
            "interval_s": round(interval, 3),
            "parcels": parcels,
            "parcels_per_hour": round(parcels * 3600 / interval, 1),
            "released": released,
            "inspected": delta.get("decided_inspection", 0),
            "held": delta.get("decided_hold", 0),
            "recirculated": delta.get("decided_recirculation", 0),
            "release_ratio": round(released / parcels, 4) if parcels else None,
            "noread_rate": round(delta.get("reason_no_read", 0) / parcels, 4) if parcels else None,
            "decision_ms": {
                "p50": percentile(lat, 0.50), "p99": percentile(lat, 0.99), "max": percentile(lat, 1.0),
            },
            "outbox_pending": outbox_pending,
            "problems": problems,
            "mode": self.state.mode.value,
            "counters": counters,
        }
