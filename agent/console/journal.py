"""Reads of the agent's journal (parcel records and findings kept locally, in outbox.sqlite) for
the console: search, one parcel's chain, flagged images, and the stats by minute. Read-only, from
the console's own process: SQLite's WAL lets it read while the agent writes, and nothing here can
hold up the agent's commits."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

__all__ = ["Journal"]

MAX_ROWS = 200


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 2)


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "outbox.sqlite"

    def _q(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=2.0)
        try:
            return con.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []  # an agent older than the journal, or not started yet
            raise
        finally:
            con.close()

    def search(self, q: str, limit: int = 50) -> list[dict[str, Any]]:
        """Parcels whose waybill or record id is ``q`` (or, for 4+ characters, starts with it), newest first."""
        q = q.strip()
        if not q:
            return []
        like = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._q(
            "SELECT payload FROM journal WHERE kind = 'parcel' AND (waybill = ? OR record_id = ? OR "
            "(length(?) >= 4 AND (waybill LIKE ? ESCAPE '\\' OR record_id LIKE ? ESCAPE '\\'))) "
            "ORDER BY at DESC LIMIT ?",
            (q, q, q, like, like, min(limit, MAX_ROWS)),
        )
        return [json.loads(r[0]) for r in rows]

    def parcel(self, record_id: str) -> dict[str, Any] | None:
        rows = self._q("SELECT payload FROM journal WHERE record_id = ? AND kind = 'parcel'", (record_id,))
        return json.loads(rows[0][0]) if rows else None

    def pending(self, record_id: str) -> bool:
        """The record is still in the outbox: not yet acknowledged by the broker."""
        return bool(self._q("SELECT 1 FROM outbox WHERE record_id = ? LIMIT 1", (record_id,)))

    def findings(self, record_id: str) -> list[dict[str, Any]]:
        rows = self._q("SELECT payload FROM journal WHERE kind = 'finding' AND parcel = ? ORDER BY at", (record_id,))
        return [json.loads(r[0]) for r in rows]

    def latest_by_waybill(self, waybill: str) -> dict[str, Any] | None:
        rows = self._q(
            "SELECT payload FROM journal WHERE kind = 'parcel' AND waybill = ? ORDER BY at DESC LIMIT 1",
            (waybill.strip(),),
        )
        return json.loads(rows[0][0]) if rows else None

    def flagged(self, limit: int = 30) -> list[dict[str, Any]]:
        rows = self._q(
            "SELECT payload FROM journal WHERE kind = 'parcel' AND flagged = 1 ORDER BY at DESC LIMIT ?",
            (min(limit, MAX_ROWS),),
        )
        return [json.loads(r[0]) for r in rows]

    def stats(self, hours: float = 6.0) -> dict[str, Any]:
        """Per minute over the last ``hours``: parcels, inspections by reason, decision and image
        check latency p50/p99 (plotted by the console)."""
        since = time.time() - hours * 3600
        rows = self._q(
            "SELECT CAST(at / 60 AS INTEGER), lane_class, reasons, decision_ms, image_ms FROM journal "
            "WHERE kind = 'parcel' AND at >= ? ORDER BY at",
            (since,),
        )
        minutes: dict[int, dict[str, Any]] = {}
        reasons_seen: dict[str, int] = {}
        for minute, lane_class, reasons, dms, ims in rows:
            m = minutes.setdefault(minute, {"n": 0, "inspected": {}, "dms": [], "ims": []})
            m["n"] += 1
            if lane_class in (None, "inspection"):  # (release, consolidation, hold and the loop are not)
                for reason in (reasons or "no_decision").split(",")[:1]:  # the first reason names it
                    m["inspected"][reason] = m["inspected"].get(reason, 0) + 1
                    reasons_seen[reason] = reasons_seen.get(reason, 0) + 1
            if dms is not None:
                m["dms"].append(dms)
            if ims is not None:
                m["ims"].append(ims)
        top = sorted(reasons_seen, key=lambda r: -reasons_seen[r])[:6]
        keys = sorted(minutes)
        return {
            "t": [k * 60 for k in keys],
            "parcels_per_min": [minutes[k]["n"] for k in keys],
            "inspected_pct": {
                r: [round(100 * minutes[k]["inspected"].get(r, 0) / minutes[k]["n"], 1) for k in keys] for r in top
            },
            "decision_p50": [_pct(minutes[k]["dms"], 0.5) for k in keys],
            "decision_p99": [_pct(minutes[k]["dms"], 0.99) for k in keys],
            "image_p50": [_pct(minutes[k]["ims"], 0.5) for k in keys],
            "image_p99": [_pct(minutes[k]["ims"], 0.99) for k in keys],
            "parcels": len(rows),
        }
