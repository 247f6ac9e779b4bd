"""The bound on events accepted but not yet written, in events and bytes."""

from __future__ import annotations

from typing import final

import anyio

from ._stats import Counters

__all__ = ("Capacity",)


@final
class Capacity:
    """Counts what is buffered anywhere in the pipeline and wakes waiters on release.

    ``track`` takes room when it accepts an event; the Writer gives it back
    once the event is written or dead-lettered. The figures live in the
    shared :class:`Counters` so ``stats()`` shows them.
    """

    def __init__(self, counters: Counters, max_events: int, max_bytes: int) -> None:
        self.counters = counters
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._room = anyio.Event()

    def fits(self, size: int) -> bool:
        """Whether one more event of ``size`` bytes stays within the bound."""
        counters = self.counters
        return (
            counters.buffered < self.max_events and counters.buffered_bytes + size <= self.max_bytes
        )

    def take(self, size: int) -> None:
        """Account for one accepted event."""
        self.counters.buffered += 1
        self.counters.buffered_bytes += size

    def give_back(self, count: int, size: int) -> None:
        """Release ``count`` events of ``size`` bytes in all, and wake waiting ``put`` calls."""
        self.counters.buffered -= count
        self.counters.buffered_bytes -= size
        self._room.set()
        self._room = anyio.Event()

    async def wait_for_room(self, size: int) -> None:
        """Wait until an event of ``size`` bytes fits."""
        while not self.fits(size):
            await self._room.wait()
