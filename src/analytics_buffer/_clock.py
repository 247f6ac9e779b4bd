"""Wall-clock time read through the event loop's clock.

Session idleness is shared between instances through Redis, so it needs a
clock they agree on: the wall clock. Reading it as the loop clock plus an
offset fixed at start keeps one source of time for everything the actors
do, so trio's ``MockClock`` moves it in tests exactly like timers.
"""

from __future__ import annotations

import time
from typing import final

import anyio

__all__ = ("WallClock",)


@final
class WallClock:
    """Seconds since the Unix epoch, advancing with ``anyio.current_time()``.

    Create it inside the event loop; the wall clock is read once, there.
    """

    __slots__ = ("_offset",)

    def __init__(self) -> None:
        self._offset = time.time() - anyio.current_time()

    def __call__(self) -> float:
        return anyio.current_time() + self._offset
