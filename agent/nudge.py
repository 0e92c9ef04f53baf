"""``Nudge``: an asyncio.Event whose wait takes a time-out without raising.

The poll loop waits up to 20 ms for an input fifty times a second, and the outbox publisher waits
for work: with ``asyncio.timeout`` around ``Event.wait`` every expiry cancels the task and turns a
CancelledError into a TimeoutError, about a fifth of the CPU of the whole wake-up on this class of
machine. A future with a timer handle does the same without an exception. Loop thread only.
"""

from __future__ import annotations

import asyncio

__all__ = ["Nudge"]


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Nudge:
    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        if self._waiter is not None:
            _wake(self._waiter)

    def is_set(self) -> bool:
        return self._set

    def clear(self) -> None:
        self._set = False

    async def wait(self, at_most_s: float | None = None) -> bool:
        """Until set, or ``at_most_s`` seconds (None: no limit); returns whether it is set."""
        if self._set:
            return True
        loop = asyncio.get_running_loop()
        fut = self._waiter = loop.create_future()
        timer = loop.call_later(at_most_s, _wake, fut) if at_most_s is not None else None
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None
        return self._set
