"""The one reconnect back-off: doubling, capped, jittered, reset on success."""

from __future__ import annotations

import pytest

from firmware_bridge.backoff import Backoff


def test_doubles_up_to_the_cap_and_resets() -> None:
    b = Backoff(0.1, 1.0, jitter=0.0)
    assert [round(b.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.next() == 0.1


def test_jitter_stays_within_its_share_and_under_the_cap() -> None:
    lows = Backoff(0.4, 10.0, jitter=0.25, rng=lambda: 0.0)
    highs = Backoff(0.4, 0.45, jitter=0.25, rng=lambda: 1.0)
    assert lows.next() == pytest.approx(0.3) and highs.next() == pytest.approx(0.45)


def test_nonsense_is_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)
