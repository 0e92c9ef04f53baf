"""Reconnect delays: doubling from ``initial_s`` up to ``cap_s``, with jitter so that many lines
(or readers) that lost the same switch do not retry in lock-step. One helper for every link."""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    def __init__(
        self, initial_s: float, cap_s: float, jitter: float = 0.25, rng: Callable[[], float] = random.random
    ) -> None:
        if not 0 < initial_s <= cap_s or not 0 <= jitter < 1:
            raise ValueError("need 0 < initial_s <= cap_s and 0 <= jitter < 1")
        self.initial_s, self.cap_s, self.jitter, self._rng = initial_s, cap_s, jitter, rng
        self._next = initial_s

    def next(self) -> float:
        """The delay before the next attempt (then doubled, up to the cap)."""
        base = self._next
        self._next = min(self._next * 2, self.cap_s)
        return min(base * (1 - self.jitter + 2 * self.jitter * self._rng()), self.cap_s)

    def reset(self) -> None:
        """A success: the next failure starts from ``initial_s`` again."""
        self._next = self.initial_s
