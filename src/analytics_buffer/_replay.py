"""The Replayer actor: writes the outbox's sealed segments to ClickHouse, oldest first.

One chunk per step: a step takes the oldest waiting segment (cut into
chunks in a worker thread, bad records quarantined), reads and inserts its
next chunk, and queues the next step; only that chunk's events are in
memory, kept for its retries until they are written. A chunk is the
records starting in one range of ``REPLAY_CHUNK_BYTES`` (4 MiB, about 16k
typical events) of the file: chunk ``i`` of segment ``S`` always carries
the token ``outbox-<S>:<i>`` (a sealed segment's bytes never move, and the
range is fixed rather than a setting, so a restart with other settings cuts
the same chunks; a record found bad only leaves its chunk smaller), on every
attempt and after a restart, so a chunk that reached ClickHouse just before
a failure or a crash is deduplicated by servers with
``insert_deduplication_token`` (22.2+); older servers store it twice and the
``ReplacingMergeTree`` table collapses the copies by event id (read with
``FINAL``).

A transient failure waits with exponential backoff (``retry_initial_backoff``
doubling up to ``retry_max_backoff``, with jitter) and retries the same
chunk, for as long as it takes: the data is safe on disk meanwhile. A
permanent refusal dead-letters the chunk with the server's code. The
segment is deleted once every chunk is written or dead-lettered.

Replayed events count in ``written`` (or ``dead_lettered``) like any other,
and in ``outbox_replayed``; so for one run, ``accepted == written +
dead_lettered + buffered + outbox_spilled - outbox_replayed -
outbox_quarantined`` (events of earlier runs add to both sides' replays).

Segments waiting at start-up (the previous run's) are the oldest, so they
are replayed first. While idle, the actor looks for new segments every
``flush_interval`` (other buffers sharing the directory may spill into it)
and at once when this buffer spills (:data:`SEGMENT_READY`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any, Final, final

import anyio

from ._actor import Actor, Reply, Timer
from ._deadletter import DeadLetters
from ._event import Event
from ._exceptions import ActorDeadError, PermanentSinkError, TransientSinkError
from ._outbox import Chunk, Outbox, Segment
from ._settings import Settings
from ._sink import Sink
from ._stats import Counters

__all__ = ("REPLAY_CHUNK_BYTES", "REPLAY_NOW", "SEGMENT_READY", "Replayer")

log = logging.getLogger("analytics_buffer.replay")


@final
class _Step:
    def __repr__(self) -> str:
        return "STEP"


@final
class _ReplayNow:
    def __repr__(self) -> str:
        return "REPLAY_NOW"


@final
class _SegmentReady:
    def __repr__(self) -> str:
        return "SEGMENT_READY"


REPLAY_CHUNK_BYTES: Final = 4 * 1024 * 1024
"""Bytes of a segment whose records make one replayed chunk; a constant, not a
setting: a chunk's token must name the same records in every run."""
_STEP: Final = _Step()
SEGMENT_READY: Final = _SegmentReady()
"""Info: a segment was spilled; look for it now rather than at the next poll."""
REPLAY_NOW: Final = _ReplayNow()
"""Call: replay every waiting segment now (backoff restarts from its first
step); reply ``None`` once no segment is waiting."""


@final
class Replayer(Actor):
    """Replays the outbox (see the module docstring)."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        sink: Sink,
        settings: Settings,
        counters: Counters,
        dead_letters: DeadLetters,
    ) -> None:
        self._outbox = outbox
        self._counters = counters
        self._sink = sink
        self._dead_letters = dead_letters
        self._poll = settings.flush_interval
        self._first_backoff = settings.retry_initial_backoff
        self._max_backoff = settings.retry_max_backoff
        self._backoff = self._first_backoff
        self._segment: Segment | None = None
        self._chunks: list[Chunk] = []
        self._chunk = 0
        self._events: list[Event] | None = None
        """The current chunk's events, once read (kept for its retries)."""
        self._timer: Timer | None = None
        self._waiting: list[Reply[Any]] = []

    async def init(self) -> None:
        self._schedule(0.0)

    async def handle_info(self, message: object) -> None:
        if message is _STEP:
            self._timer = None
            await self._step()
        elif message is SEGMENT_READY and self._segment is None:
            self._schedule(0.0)

    async def handle_call(self, message: object, reply: Reply[Any]) -> None:
        if message is REPLAY_NOW:
            self._waiting.append(reply)
            self._backoff = self._first_backoff
            self._schedule(0.0)
        else:
            await super().handle_call(message, reply)

    async def handle_casts(self, messages: Iterator[object]) -> None:
        for message in messages:
            log.warning("replayer: dropped unknown cast %r", message)

    async def terminate(self, reason: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for reply in self._waiting:
            reply.fail(ActorDeadError("the replayer stopped before the outbox was empty"))

    def _schedule(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.send_after(delay, _STEP)

    async def _step(self) -> None:
        outbox = self._outbox
        if self._segment is None:
            # A listing of a small directory: cheaper than a trip to a worker thread.
            waiting = outbox.replayable()
            if not waiting:
                self._answer()
                self._schedule(self._poll)
                return
            self._segment = waiting[0]
            self._chunks = await anyio.to_thread.run_sync(
                outbox.chunks, self._segment, REPLAY_CHUNK_BYTES
            )
            self._chunk = 0
        segment = self._segment
        if self._chunk < len(self._chunks):
            if self._events is None:
                self._events = await anyio.to_thread.run_sync(
                    outbox.read_chunk, segment, self._chunks[self._chunk]
                )
            chunk = self._events
            token = f"{segment.token}:{self._chunks[self._chunk].number}"
            try:
                if chunk:
                    await self._sink.insert(chunk, token)
            except TransientSinkError as exc:
                delay = self._backoff + random.uniform(0, self._first_backoff)
                self._backoff = min(self._backoff * 2, self._max_backoff)
                log.warning("outbox replay of %s failed (%s); again in %.2f s", token, exc, delay)
                self._schedule(delay)
                return
            except PermanentSinkError as exc:
                log.error("dead-lettering %d replayed events (%s): %s", len(chunk), token, exc)
                await self._dead_letters.write(chunk, reason=str(exc), code=exc.code, token=token)
                self._counters.dead_lettered += len(chunk)
            else:
                self._counters.written += len(chunk)
            outbox.replayed += len(chunk)
            self._backoff = self._first_backoff
            self._events = None
        self._chunk += 1
        if self._chunk >= len(self._chunks):
            await anyio.to_thread.run_sync(outbox.remove, segment)
            log.info("outbox segment %s replayed", segment.name)
            self._segment, self._chunks = None, []
        self._schedule(0.0)

    def _answer(self) -> None:
        """Tell the REPLAY_NOW callers that no segment is waiting."""
        waiting, self._waiting = self._waiting, []
        for reply in waiting:
            reply.send(None)
