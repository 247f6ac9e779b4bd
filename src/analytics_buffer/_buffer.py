"""The EventBuffer actor: gathers accepted events into batches for the Writer.

A batch is handed to the Writer when it reaches ``max_batch_events`` or
``max_batch_bytes`` (threshold), when ``flush_interval`` has passed since
the previous flush (timer), on ``flush()`` / ``flush_async()`` (explicit),
and when the actor terminates (shutdown, or a crash: what it held is
flushed before the restart). Every flush, whatever its trigger, re-arms the
timer, so a threshold flush is never followed by a tiny timer flush.

Events arrive as ``(event, size)`` tuples, cast by the client.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Final, final

from ._actor import Actor, ActorRef, Reply, Timer
from ._capacity import Capacity
from ._deadletter import DeadLetters
from ._event import Event
from ._settings import Settings
from ._stats import Counters
from ._writer import Batch, WriteBatch

__all__ = ("FLUSH", "FLUSH_SOON", "EventBuffer")

log = logging.getLogger("analytics_buffer.buffer")


@final
class _FlushCall:
    def __repr__(self) -> str:
        return "FLUSH"


@final
class _FlushSoon:
    def __repr__(self) -> str:
        return "FLUSH_SOON"


FLUSH: Final = _FlushCall()
"""Call: flush now and reply once everything before it is written."""
FLUSH_SOON: Final = _FlushSoon()
"""Cast: flush now, reply to nobody."""


@final
class _Tick:
    __slots__ = ("generation",)

    def __init__(self, generation: int) -> None:
        self.generation = generation


@final
class EventBuffer(Actor):
    """Holds the batch being filled; the Writer does the I/O."""

    def __init__(
        self,
        *,
        settings: Settings,
        writer: ActorRef,
        tokens: Iterator[str],
        counters: Counters,
        capacity: Capacity,
        dead_letters: DeadLetters,
    ) -> None:
        self._writer = writer
        self._tokens = tokens
        self._counters = counters
        self._capacity = capacity
        self._dead_letters = dead_letters
        self._interval = settings.flush_interval
        self._max_events = settings.max_batch_events
        self._max_bytes = settings.max_batch_bytes
        self._pending: list[Event] = []
        self._pending_bytes = 0
        self._timer: Timer | None = None
        self._generation = 0

    async def init(self) -> None:
        self._arm_timer()

    async def handle_casts(self, messages: Iterator[object]) -> None:
        pending = self._pending
        max_events, max_bytes = self._max_events, self._max_bytes
        for message in messages:
            if type(message) is tuple:
                event, size = message
                pending.append(event)
                self._pending_bytes += size
                if len(pending) >= max_events or self._pending_bytes >= max_bytes:
                    await self._flush(None)
                    pending = self._pending
            elif message is FLUSH_SOON:
                await self._flush(None)
                pending = self._pending
            else:
                log.warning("event buffer: dropped unknown cast %r", message)

    async def handle_call(self, message: object, reply: Reply[Any]) -> None:
        if message is FLUSH:
            await self._flush(reply)
        else:
            await super().handle_call(message, reply)

    async def handle_info(self, message: object) -> None:
        # A tick from a timer that a flush has since re-armed is stale.
        if isinstance(message, _Tick) and message.generation == self._generation:
            await self._flush(None)

    async def terminate(self, reason: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        batch = self._take_batch()
        if batch is None:
            return
        handed = False
        try:
            await self._writer.send(WriteBatch(batch, None))
            handed = True
        finally:
            if not handed:
                # The writer is gone or the deadline passed: keep the events on disk.
                why = "the writer could not take them at shutdown"
                log.error("dead-lettering %d events: %s", batch.size, why)
                self._dead_letters.write_now(batch.events, reason=why, code=0, token=batch.token)
                self._counters.dead_lettered += batch.size
                self._capacity.give_back(batch.size, batch.nbytes)

    def _take_batch(self) -> Batch | None:
        if not self._pending:
            return None
        batch = Batch(next(self._tokens), self._pending, self._pending_bytes)
        self._pending, self._pending_bytes = [], 0
        self._counters.flushes += 1
        return batch

    async def _flush(self, reply: Reply[Any] | None) -> None:
        batch = self._take_batch()
        self._arm_timer()
        if batch is None and reply is None:
            return
        try:
            await self._writer.send(WriteBatch(batch, reply))
        except BaseException:
            if batch is not None:
                # Not handed over: hold the events again, for terminate to deal with.
                self._pending[:0] = batch.events
                self._pending_bytes += batch.nbytes
                self._counters.flushes -= 1
            raise

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._generation += 1
        self._timer = self.send_after(self._interval, _Tick(self._generation))
