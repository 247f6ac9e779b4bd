"""Bounded actor mailboxes that are drained in bulk.

A mailbox is an anyio memory object stream of fixed capacity (never
unbounded) plus a short *carry-over* list: messages an actor instance took
but had not handled when it crashed. The next instance of the actor handles
those first, so a restart loses nothing that was still queued.

Receiving is bulk by design: one awaited ``receive()`` (one event-loop
switch), then everything already queued through ``receive_nowait()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final, Generic, NamedTuple, TypeVar, final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._exceptions import ActorDeadError, MailboxFull

__all__ = ("MAILBOX_CLOSED", "Mailbox", "MailboxStatistics")

T = TypeVar("T")

MAILBOX_CLOSED: Final = (anyio.ClosedResourceError, anyio.BrokenResourceError)
"""What the stream raises once the mailbox is closed (:meth:`Mailbox.offer` passes them on)."""


class MailboxStatistics(NamedTuple):
    """A snapshot of one mailbox."""

    queued: int
    """Messages waiting, including carried-over ones."""
    capacity: int
    """The bound on queued messages (carried-over ones aside)."""
    senders_waiting: int
    """Tasks blocked in ``send`` because the mailbox is full."""


@final
class Mailbox(Generic[T]):
    """A bounded FIFO of messages for one actor, surviving the actor's restarts.

    :param capacity: how many messages may wait; ``send_nowait`` raises
        :class:`MailboxFull` past it and ``send`` waits
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"mailbox capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        self._send: MemoryObjectSendStream[T]
        self._receive: MemoryObjectReceiveStream[T]
        self._send, self._receive = anyio.create_memory_object_stream[T](capacity)
        self._carry: list[T] = []
        self.offer: Callable[[T], None] = self._send.send_nowait
        """Queue a message without waiting, raising anyio's own errors: ``anyio.WouldBlock``
        when full, ``ClosedResourceError``/``BrokenResourceError`` when closed. It is
        :meth:`send_nowait` without the mapping, a call cheaper, for a caller's hot path."""

    def send_nowait(self, message: T) -> None:
        """Queue ``message`` without waiting.

        :raises MailboxFull: when ``capacity`` messages are already waiting
        :raises ActorDeadError: when the mailbox is closed
        """
        try:
            self._send.send_nowait(message)
        except anyio.WouldBlock:
            raise MailboxFull(f"mailbox full ({self._capacity} messages waiting)") from None
        except MAILBOX_CLOSED:
            raise ActorDeadError("the actor's mailbox is closed") from None

    async def send(self, message: T) -> None:
        """Queue ``message``, waiting for room when the mailbox is full.

        :raises ActorDeadError: when the mailbox is closed
        """
        try:
            await self._send.send(message)
        except MAILBOX_CLOSED:
            raise ActorDeadError("the actor's mailbox is closed") from None

    async def receive_batch(self, limit: int) -> list[T]:
        """Wait for at least one message, then take up to ``limit`` without waiting."""
        if self._carry:
            batch, self._carry = self._carry, []
        else:
            batch = [await self._receive.receive()]
        receive_nowait = self._receive.receive_nowait
        try:
            while len(batch) < limit:
                batch.append(receive_nowait())
        except anyio.WouldBlock:
            pass
        return batch

    def carry_over(self, messages: Iterable[T]) -> None:
        """Keep ``messages`` for the next receive, ahead of everything queued.

        They go after messages already carried over, so a handler and the
        loop around it can each hand back their unhandled part, innermost first.
        """
        self._carry.extend(messages)

    def drain_nowait(self) -> list[T]:
        """Take every message waiting now (carried-over ones first)."""
        taken, self._carry = self._carry, []
        receive_nowait = self._receive.receive_nowait
        try:
            while True:
                taken.append(receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            pass
        return taken

    def release(self) -> None:
        """Close both ends; the mailbox is finished."""
        self._send.close()
        self._receive.close()

    def statistics(self) -> MailboxStatistics:
        """Return how full the mailbox is."""
        stats = self._send.statistics()
        return MailboxStatistics(
            queued=stats.current_buffer_used + len(self._carry),
            capacity=self._capacity,
            senders_waiting=stats.tasks_waiting_send,
        )
