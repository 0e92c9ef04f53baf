"""The rate sweep's pure parts: belt speeds that keep parcels apart, and the table."""

from __future__ import annotations

from hw_sim.sweep import BASE_SPEED_MPS, COLUMNS, MIN_PITCH_M, _row, belt_speed, table


def test_belt_speed_keeps_the_mean_pitch_and_never_slows_below_the_line_speed() -> None:
    for rate in (1, 2, 5, 10, 12.5, 15, 20, 40):
        speed = belt_speed(rate)
        assert speed >= BASE_SPEED_MPS
        assert speed / rate >= MIN_PITCH_M - 1e-9
        assert speed == BASE_SPEED_MPS or (speed - 0.5) / rate < MIN_PITCH_M  # the slowest that fits
    assert belt_speed(10) == 3.0 and belt_speed(20) == 6.0


def test_a_row_derives_cpu_while_running_and_missing_records_and_the_table_shows_every_column() -> None:
    line = {"parcels": 100, "records_published": 99, "decision_ms": {"p99": 4.5}, "trigger_seen_ms": {"p99": 20.1},
            "idle_cpu_pct": 1.5, "cpu_ms_per_parcel": 3.0, "cpu_ms_per_parcel_marginal": 1.2, "late": 0,
            "wrongly_released": 0}
    row = _row(10.0, 3.0, line)
    assert row["cpu_pct"] == 2.7  # 1.5 % idle + 1.2 ms x 10 parcels a second
    assert row["records_missing"] == 1
    text = table([row, {**row, "rate": 20.0, "cpu_pct": None}]).splitlines()
    assert len(text) == 4 and all(title in text[0] for _, title in COLUMNS)
    assert text[2].startswith("| 10 | 3 | 100 | 4.5 | 20.1 | 1.5 | 2.7 |")
    assert "| – |" in text[3]  # an unknown figure is a dash, not a made-up number
