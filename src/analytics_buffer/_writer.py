"""The Writer actor: inserts batches into the sink, retries, dead-letters.

Batches are written one at a time, in the order they arrive, each in chunks
of ``insert_chunk_rows`` rows (one INSERT each), up to ``pool_size`` chunks
at once: while one INSERT waits for the server the next is serialised. The
sink serialises a chunk in blocks of ``insert_block_rows`` and yields to the
event loop between blocks, so the loop never stalls for a whole chunk. A
chunk's token is ``<batch token>:<chunk index>``: the same chunk carries the
same token on every attempt, which is what lets a server deduplicate a
retried insert.

Outcomes of a chunk:

* written: counted in ``written``;
* :class:`~analytics_buffer.TransientSinkError`: retried with exponential
  backoff and jitter (tenacity, sleeping through anyio) up to
  ``retry_attempts``, then handed to the disk outbox (``spill``), which
  replays it later; dead-lettered with the reason "retries exhausted" only
  when the outbox cannot take it;
* :class:`~analytics_buffer.PermanentSinkError`: dead-lettered at once with
  the server's code; later chunks and batches keep flowing.

A crash while writing dead-letters the unwritten rest of the batch (it may
be what crashed the writer) before the restart; batches still queued are
written by the next instance. If the writer is cancelled at its shutdown
deadline, what it still holds goes to the disk outbox synchronously (to be
replayed at the next start), or is dead-lettered if the outbox cannot take it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, final

import anyio
import anyio.lowlevel
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from ._actor import Actor, Reply, fail_pending_calls
from ._capacity import Capacity
from ._deadletter import DeadLetters
from ._event import Event
from ._exceptions import ActorDeadError, PermanentSinkError, TransientSinkError
from ._settings import Settings
from ._sink import Sink
from ._spill import Spill
from ._stats import Counters

__all__ = ("Batch", "FlushReport", "WriteBatch", "Writer")

log = logging.getLogger("analytics_buffer.writer")


@final
class Batch:
    """Events flushed together, with the identity they keep across retries.

    ``held`` events and ``nbytes`` bytes of the buffer's bound are released
    once the batch is written; events read back from a session store hold
    none (the store released them when it took them).

    The events are kept in a dict by position, which the garbage collector
    never walks: CPython leaves a dict untracked while nothing in it needs
    tracking, and events are not tracked (``gc=False``). Held in lists, the
    batches queued while ClickHouse is slower than ``track`` (up to
    ``max_buffered_events`` events) were all walked by one young-generation
    pass: 7.5-10.7 ms, the longest event-loop stall of the throughput
    benchmark. The dict takes about 30 bytes per event where a list took 8.
    """

    __slots__ = (
        "_by_position",
        "dead_lettered",
        "done",
        "held",
        "nbytes",
        "released",
        "released_bytes",
        "size",
        "token",
        "written",
    )

    def __init__(
        self, token: str, events: Sequence[Event], nbytes: int, held: int | None = None
    ) -> None:
        self.token = token
        self._by_position = dict(enumerate(events))
        self.size = len(events)
        """How many events the batch has."""
        self.nbytes = nbytes
        self.held = self.size if held is None else held
        self.released = 0
        self.released_bytes = 0
        self.done: set[int] = set()
        """Indices of the chunks written or dead-lettered."""
        self.written = 0
        self.dead_lettered = 0

    @property
    def events(self) -> list[Event]:
        """The events, in order (a new list)."""
        return list(self._by_position.values())

    def chunk_count(self, rows: int) -> int:
        """How many chunks of ``rows`` the batch splits into (the same on every attempt)."""
        return (self.size + rows - 1) // rows

    def chunk(self, index: int, rows: int) -> list[Event]:
        """The events of chunk ``index``."""
        end = min((index + 1) * rows, self.size)
        return list(map(self._by_position.__getitem__, range(index * rows, end)))

    def release(self, count: int) -> tuple[int, int]:
        """Mark ``count`` more events done; return the events and bytes to give back.

        Bytes are shared out in proportion (sizes are estimates anyway); the
        last release returns whatever is left, so the sums come out exact.
        """
        events = min(count, self.held - self.released)
        self.released += events
        if self.released == self.held:
            nbytes = self.nbytes - self.released_bytes
        else:
            nbytes = self.nbytes * events // max(self.held, 1)
        self.released_bytes += nbytes
        return events, nbytes


@final
class WriteBatch:
    """Write ``batch`` (if any), then answer ``reply`` (if any)."""

    __slots__ = ("batch", "reply")

    def __init__(self, batch: Batch | None, reply: Reply[Any] | None) -> None:
        self.batch = batch
        self.reply = reply


class FlushReport(NamedTuple):
    """What became of one batch; passed to the ``on_flush`` hook."""

    token: str
    written: int
    dead_lettered: int


@final
class Writer(Actor):
    """Owns the sink: writes batches in order, one at a time."""

    def __init__(
        self,
        *,
        sink: Sink,
        settings: Settings,
        counters: Counters,
        capacity: Capacity,
        dead_letters: DeadLetters,
        on_flush: Callable[[FlushReport], None] | None = None,
        spill: Spill | None = None,
    ) -> None:
        self._sink = sink
        self._spill = spill
        self._settings = settings
        self._counters = counters
        self._capacity = capacity
        self._dead_letters = dead_letters
        self._on_flush = on_flush
        self._current: WriteBatch | None = None
        self._slots = anyio.Semaphore(settings.pool_size)
        self._retrying = AsyncRetrying(
            stop=stop_after_attempt(settings.retry_attempts),
            wait=wait_exponential(
                multiplier=settings.retry_initial_backoff, max=settings.retry_max_backoff
            )
            + wait_random(0, settings.retry_initial_backoff),
            retry=retry_if_exception_type(TransientSinkError),
            sleep=anyio.sleep,
            reraise=True,
            before_sleep=self._count_retry,
        )

    async def init(self) -> None:
        try:
            await self._sink.open()
        except TransientSinkError as exc:
            # A server that is down now is retried at the first write.
            log.warning("ClickHouse is unreachable at start (%s); will retry when writing", exc)

    async def handle_casts(self, messages: Iterator[object]) -> None:
        for message in messages:
            if isinstance(message, WriteBatch):
                # After a crash, terminate settles this batch; the runtime keeps the rest.
                self._current = message
                await self._write(message)
            else:
                log.warning("writer: dropped unknown cast %r", message)

    async def terminate(self, reason: BaseException | None) -> None:
        held = [self._current] if self._current is not None else []
        self._current = None
        if reason is None:
            # Stopped: anything still queued means the shutdown deadline passed.
            queued = fail_pending_calls(
                self.ref.mailbox.drain_nowait(), ActorDeadError("writer stopped")
            )
            held += [item for item in queued if isinstance(item, WriteBatch)]
            why = "shutdown_timeout passed before ClickHouse took them"
        else:
            why = f"writer crashed while writing them: {reason!r}"
        for item in held:
            self._abandon(item, why, to_outbox=reason is None)

    async def _write(self, item: WriteBatch) -> None:
        """Write a batch's chunks, up to ``pool_size`` at once, then answer its reply."""
        batch = item.batch
        if batch is not None:
            async with anyio.create_task_group() as chunks:
                for index in range(batch.chunk_count(self._settings.insert_chunk_rows)):
                    await self._slots.acquire()
                    chunks.start_soon(self._write_chunk, batch, index)
        self._current = None
        if item.reply is not None:
            item.reply.send(None)
        if batch is not None and self._on_flush is not None:
            try:
                self._on_flush(FlushReport(batch.token, batch.written, batch.dead_lettered))
            except Exception:
                log.exception("on_flush hook failed")

    async def _write_chunk(self, batch: Batch, index: int) -> None:
        try:
            chunk = batch.chunk(index, self._settings.insert_chunk_rows)
            token = f"{batch.token}:{index}"
            try:
                await self._insert(chunk, token)
            except PermanentSinkError as exc:
                await self._dead_letter(chunk, str(exc), exc.code, token)
                batch.dead_lettered += len(chunk)
            except TransientSinkError as exc:
                reason = f"retries exhausted ({self._settings.retry_attempts}): {exc}"
                # --- outbox hook: the chunk waits on disk for replay instead.
                refusal = None
                if self._spill is None or (refusal := await self._spill.take(chunk, reason)):
                    if refusal:
                        reason = f"{reason}; the outbox refused it: {refusal}"
                    await self._dead_letter(chunk, reason, 0, token)
                    batch.dead_lettered += len(chunk)
            else:
                self._counters.written += len(chunk)
                batch.written += len(chunk)
            if self._spill is not None:
                self._spill.settle(chunk)  # --- outbox hook: written, dead-lettered or spilled
            batch.done.add(index)
            # Counted as written or dead-lettered: no longer buffered.
            self._capacity.give_back(*batch.release(len(chunk)))
        finally:
            self._slots.release()

    async def _insert(self, chunk: Sequence[Event], token: str) -> None:
        # A copy per chunk: concurrent chunks must not share one retry state.
        async for attempt in self._retrying.copy():
            with attempt:
                await self._sink.insert(chunk, token)

    async def _dead_letter(
        self, chunk: Sequence[Event], reason: str, code: int, token: str
    ) -> None:
        log.error("dead-lettering %d events (%s): %s", len(chunk), token, reason)
        await self._dead_letters.write(chunk, reason=reason, code=code, token=token)
        self._counters.dead_lettered += len(chunk)

    def _abandon(self, item: WriteBatch, reason: str, *, to_outbox: bool = False) -> None:
        """Dead-letter what ``item`` has left unwritten, synchronously, and answer it.

        :param to_outbox: offer it to the outbox first (not after a crash: the
            batch may be what crashed the writer)
        """
        batch = item.batch
        if batch is not None:
            rows = self._settings.insert_chunk_rows
            rest = [
                event
                for index in range(batch.chunk_count(rows))
                if index not in batch.done
                for event in batch.chunk(index, rows)
            ]
            if rest:
                # --- outbox hook: what is left waits on disk for replay, if the outbox takes it.
                refusal = None
                spill = self._spill if to_outbox else None
                if spill is None or (refusal := spill.take_now(rest, reason)):
                    if refusal:
                        reason = f"{reason}; the outbox refused it: {refusal}"
                    log.error("dead-lettering %d events (%s): %s", len(rest), batch.token, reason)
                    self._dead_letters.write_now(rest, reason=reason, code=0, token=batch.token)
                    self._counters.dead_lettered += len(rest)
                if self._spill is not None:
                    self._spill.settle(rest)
            self._capacity.give_back(*batch.release(batch.size))
        if item.reply is not None:
            item.reply.send(None)

    def _count_retry(self, state: RetryCallState) -> None:
        self._counters.retries += 1
        error = state.outcome.exception() if state.outcome is not None else None
        log.warning("insert attempt %d failed (%s); retrying", state.attempt_number, error)
