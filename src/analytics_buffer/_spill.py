"""``Spill``: what the Writer calls instead of dead-lettering a transiently failed chunk.

The Writer knows nothing of the outbox beyond this small object: after a
chunk's outcome it calls :meth:`Spill.settle` (the write-ahead log may drop
those events), and when a chunk's retries run out for a transient reason
it offers the chunk to :meth:`Spill.take` (or :meth:`Spill.take_now` on a
shutdown path that cannot wait). Only when the outbox cannot take it either
(its cap, a full disk) does the chunk go to the dead-letter file, with both
reasons.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import final

import anyio

from ._event import Event
from ._exceptions import OutboxError
from ._outbox import Outbox

__all__ = ("Spill",)

log = logging.getLogger("analytics_buffer.outbox")


@final
class Spill:
    """Moves failed chunks into the outbox; settles written ones out of its log."""

    def __init__(self, outbox: Outbox, on_spilled: Callable[[], None] | None = None) -> None:
        self._outbox = outbox
        self._on_spilled = on_spilled
        self.settle = outbox.settle

    async def take(self, events: Sequence[Event], reason: str) -> str | None:
        """Write ``events`` to the outbox; return ``None``, or why it could not."""
        refusal = await anyio.to_thread.run_sync(self.take_now, events, reason)
        if refusal is None and self._on_spilled is not None:
            self._on_spilled()
        return refusal

    def take_now(self, events: Sequence[Event], reason: str) -> str | None:
        """:meth:`take`, synchronously."""
        try:
            segment = self._outbox.spill(events)
        except OutboxError as exc:
            log.error("the outbox cannot take %d events (%s): %s", len(events), reason, exc)
            return str(exc)
        log.warning("%d events to the outbox (%s) as %s", len(events), reason, segment.name)
        return None
