"""A live terminal view of a simulated run, and the ground-truth summary at the end."""

from __future__ import annotations

from typing import IO, Any

from hw_sim.harness import LineRun
from hw_sim.sortline import CLEARED

_CLEAR = "\x1b[H\x1b[2J"


class LiveView:
    def __init__(self, out: IO[str], plain: bool = False, rows: int = 12) -> None:
        self.out = out
        self.plain = plain or not out.isatty()
        self.rows = rows
        self._printed = 0

    HEADER = (
        f"{'seq':>5}  {'waybill':<22} {'label':<12} {'verdict':<8} {'lane':<10} "
        f"{'disposition':<21} {'ms':>5}  agent's reasons"
    )

    def update(self, run: LineRun) -> None:
        done = [t for t in run.truth if t.lane_reached is not None]
        records = run.central.records_by_parcel() if run.central else {}
        if self.plain:
            if self._printed == 0 and done:
                self.out.write(self.HEADER + "\n")
            # a row is printed once its record has arrived (or it is long overdue)
            while self._printed < len(done):
                t = done[self._printed]
                if t.tracked and t.key not in records and len(done) - self._printed < 20:
                    break
                self.out.write(self._line(t, records) + "\n")
                self._printed += 1
            self.out.flush()
            return
        released = sum(t.reached in CLEARED for t in done)
        wrong = sum(t.reached in CLEARED and not t.cleared for t in done)  # as the harness counts it
        lines = [
            f"sortgate sim — {run.spec.site}/{run.spec.line}  belt {run.spec.speed_mps} m/s  "
            f"{run.spec.rate}/s  controller {run.spec.transport}"
            + (f"  console {run.console.url}" if run.console else ""),
            f"parcels {len(done)}/{len(run.truth)}   release {released}   inspection {len(done) - released}"
            f"   wrongly released {wrong}   records {len(records)}",
            "",
            self.HEADER,
        ]
        lines += [self._line(t, records) for t in done[-self.rows :]]
        self.out.write(_CLEAR + "\n".join(lines) + "\n")
        self.out.flush()

    @staticmethod
    def _line(t: Any, records: dict[tuple[int, int], dict[str, Any]]) -> str:
        p = t.planned
        ms = f"{t.decision_ms:5.1f}" if t.decision_ms is not None else "    -"
        seq = t.tracked.seq if t.tracked else 0
        rec = records.get(t.key)
        reasons = ",".join(rec["decision"]["reasons"]) if rec and rec.get("decision") else "…"
        label = p.label if not p.item else f"{p.label}+{p.item}"
        return (
            f"{seq:>5}  {p.codes[0]:<22} {label:<12} {p.verdict:<8} {t.reached:<10} "
            f"{t.disposition or '-':<21} {ms}  {reasons}"
        )

    def summary(self, run: LineRun, metrics: dict[str, Any]) -> None:
        if self.plain:
            self._printed_all(run)
        else:
            self.update(run)
        m = metrics
        self.out.write(
            "\nGround truth\n"
            f"  parcels            {m['parcels']}\n"
            f"  had to be released {m['expected_release']}   released {m['released']}\n"
            f"  inspected          {m['inspected']}\n"
            f"  wrongly released   {m['wrongly_released']}\n"
            f"  wrong identity     {m['wrong_identity']}   (records naming a code not printed on the parcel)\n"
            f"  needless inspections {sum(m['needless_inspections'].values()) if m['needless_inspections'] else 0}"
            f"   {', '.join(f'{k} {v}' for k, v in m['needless_inspections'].items()) or ''}\n"
            + (f"  reader faults      {', '.join(f'{k} {v}' for k, v in m['reader_faults'].items())}\n"
               if m.get("reader_faults") else "")
            + f"  missorted          {m['missorted']}\n"
            f"  late (defaulted)   {m['late']}\n"
            f"  records published  {m['records_published']}\n"
            + (f"  hidden items       {m['hidden_items']}   caught {m['hidden_items_caught']}   "
               f"released {m['hidden_items_released']}\n" if "hidden_items" in m else "")
            + "  decision ms        p50 {p50}  p99 {p99}  max {max}\n".format(**m["decision_ms"])
            + f"  agent              rss {m.get('rss_mb')} MB, cpu {m.get('cpu_ms_per_parcel')} ms/parcel\n"
            + (f"  console            {run.console.url} (stopped with the run)\n" if run.console else "")
        )
        self.out.flush()

    def _printed_all(self, run: LineRun) -> None:
        records = run.central.records_by_parcel() if run.central else {}
        done = [t for t in run.truth if t.lane_reached is not None]
        for t in done[self._printed :]:
            self.out.write(self._line(t, records) + "\n")
        self._printed = len(done)
