"""``AnalyticsBuffer``: the client API in front of the supervised actors."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from types import TracebackType
from typing import Final, TypeVar, final

import anyio
import anyio.lowlevel

from ._buffer import FLUSH, FLUSH_SOON, EventBuffer
from ._capacity import Capacity
from ._clock import WallClock
from ._counter_actor import ActiveVisitors, CounterActor, CounterState, CountRead
from ._counter_store import CounterStore, MemoryCounterStore
from ._deadletter import DeadLetters
from ._event import Event, check_event, decode_event, new_event_id
from ._exceptions import (
    BufferClosed,
    BufferFull,
    InvalidArgument,
    InvalidEvent,
    OutboxError,
)
from ._outbox import Outbox
from ._replay import REPLAY_NOW, SEGMENT_READY, Replayer
from ._rollup import RollupTarget, SinkRollups, TupleSink, counters_table
from ._session_actor import SESSION_FLUSH, LastScreenView, SessionActor
from ._session_store import MemorySessionStore, SessionStore
from ._settings import Settings
from ._sink import Sink
from ._spill import Spill
from ._stats import Counters, Stats
from ._supervisor import ChildSpec, Supervisor
from ._writer import FlushReport, Writer

__all__ = ("AnalyticsBuffer",)

T = TypeVar("T")

_CONTROL_MESSAGES: Final = 1024
"""Room in the EventBuffer's mailbox beyond ``max_buffered_events``, for calls and ticks."""
_WRITER_MAILBOX: Final = 64
_COUNTER_MAILBOX: Final = 256


@final
class AnalyticsBuffer:
    """Tracks events and gets them into ClickHouse in batches.

    Use it as an async context manager; leaving the block stops the actors
    in order, flushing what they hold (bounded by ``shutdown_timeout``)::

        async with AnalyticsBuffer(Settings(clickhouse_url=url)) as buffer:
            buffer.track(Event(name="signup", project_id="p1", profile_id="u1"))

    ``track`` and ``track_json`` are synchronous and never wait: call them
    from the event loop's thread. An accepted event is later counted in
    exactly one of ``stats().written`` or ``stats().dead_lettered``.

    :param settings: defaults to ``Settings.from_env()``
    :param sink: where events go; defaults to ClickHouse (``clickhouse_url``)
        or the embedded engine
    :param session_store: where session state lives; defaults to Redis
        (``redis_url``) or this process's memory
    :param on_flush: called after each batch with what became of it
    :param counter_store: where counters and live visitors live; defaults to
        Redis (``redis_url``) or this process's memory
    :param rollups: where counters are rolled up; defaults to a counters
        table next to the events table when the sink is ClickHouse or chdb
        (with another sink and no ``rollups``, counters stay in the store)
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        sink: Sink | None = None,
        session_store: SessionStore | None = None,
        on_flush: Callable[[FlushReport], None] | None = None,
        counter_store: CounterStore | None = None,
        rollups: RollupTarget | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings.from_env()
        self._sink = sink
        self._session_store = session_store
        self._session_arrivals: list[tuple[Event, int]] = []
        self._on_flush = on_flush
        self._counter_store = counter_store
        self._rollups = rollups
        self._counter_state = CounterState()
        # Every accepted event is appended here; the CounterActor takes them in bulk.
        self._counted = self._counter_state.arrived
        self._counters = Counters()
        self._capacity = Capacity(
            self._counters, self.settings.max_buffered_events, self.settings.max_buffered_bytes
        )
        self._max_event_bytes = self.settings.max_event_bytes
        self._max_buffered_events = self.settings.max_buffered_events
        self._max_buffered_bytes = self.settings.max_buffered_bytes
        self._supervisor: Supervisor | None = None
        self._running = False
        self._entered = False
        # --- durable outbox (issue 5)
        self._outbox: Outbox | None = None
        self._wal: Outbox | None = None
        """The outbox in ``wal`` durability: events are appended before they are accepted."""

    async def __aenter__(self) -> AnalyticsBuffer:
        if self._entered:
            raise RuntimeError("an AnalyticsBuffer can be entered only once")
        self._entered = True
        settings = self.settings
        if self._sink is None:
            # Imported here: a caller that brings its own sink never loads a driver.
            from ._engines import create_sink

            self._sink = create_sink(settings)
        sink = self._sink
        if self._session_store is None:
            self._session_store = _create_session_store(settings)
        store = self._session_store
        if self._counter_store is None:
            self._counter_store = _create_counter_store(settings)
        counter_store = self._counter_store
        if self._rollups is None:
            self._rollups = _rollups_for(sink, settings)
        rollups = self._rollups
        wall_clock = WallClock()
        dead_letters = DeadLetters(Path(settings.data_dir) / "dead-letter", settings.table)
        prefix = new_event_id().hex[:16]
        tokens = (f"{prefix}-{seq}" for seq in itertools.count())
        # --- durable outbox: what the last run left is recovered before anything is accepted.
        outbox = Outbox.for_settings(settings, wal=settings.durability == "wal")
        try:
            await anyio.to_thread.run_sync(outbox.open)
        except OutboxError:
            with anyio.CancelScope(shield=True):
                await sink.aclose()
                await store.aclose()
            raise
        self._outbox = outbox
        self._wal = outbox if outbox.wal else None
        # Dead-lettered from anywhere (writer, buffer, sessions): out of the log, not replayed.
        dead_letters.on_written = outbox.settle

        def spilled() -> None:
            if outbox.owner:
                assert self._supervisor is not None
                self._supervisor.ref("replayer").info(SEGMENT_READY)

        spill = Spill(outbox, spilled)

        def make_replayer() -> Replayer:
            return Replayer(
                outbox=outbox,
                sink=sink,
                settings=settings,
                counters=self._counters,
                dead_letters=dead_letters,
            )

        def make_writer() -> Writer:
            return Writer(
                sink=sink,
                settings=settings,
                counters=self._counters,
                capacity=self._capacity,
                dead_letters=dead_letters,
                on_flush=self._on_flush,
                spill=spill,
            )

        def make_buffer() -> EventBuffer:
            assert self._supervisor is not None
            return EventBuffer(
                settings=settings,
                writer=self._supervisor.ref("writer"),
                tokens=tokens,
                counters=self._counters,
                capacity=self._capacity,
                dead_letters=dead_letters,
            )

        def make_sessions() -> SessionActor:
            assert self._supervisor is not None
            return SessionActor(
                settings=settings,
                store=store,
                writer=self._supervisor.ref("writer"),
                event_buffer=self._supervisor.ref("event_buffer"),
                owner=prefix,
                counters=self._counters,
                capacity=self._capacity,
                dead_letters=dead_letters,
                wall_clock=wall_clock,
                arrived=self._session_arrivals,
                # Redis keeps what it took; this process's memory does not outlive a crash.
                on_stored=None if isinstance(store, MemorySessionStore) else outbox.settle,
            )

        def make_counters() -> CounterActor:
            return CounterActor(
                settings=settings,
                store=counter_store,
                rollups=rollups,
                state=self._counter_state,
                counters=self._counters,
                wall_clock=wall_clock,
                owner=prefix,
            )

        # The replayer only where this buffer owns the outbox; first, so it stops last.
        replayer = [ChildSpec("replayer", make_replayer, shutdown=settings.shutdown_timeout)]
        self._supervisor = Supervisor(
            [
                *(replayer if outbox.owner else []),
                ChildSpec(
                    "writer",
                    make_writer,
                    shutdown=settings.shutdown_timeout,
                    mailbox_size=_WRITER_MAILBOX,
                ),
                ChildSpec(
                    "event_buffer",
                    make_buffer,
                    shutdown=settings.shutdown_timeout,
                    mailbox_size=settings.max_buffered_events + _CONTROL_MESSAGES,
                ),
                ChildSpec(
                    "sessions",
                    make_sessions,
                    shutdown=settings.shutdown_timeout,
                    mailbox_size=settings.max_buffered_events + _CONTROL_MESSAGES,
                ),
                ChildSpec(
                    "counters",
                    make_counters,
                    shutdown=settings.shutdown_timeout,
                    mailbox_size=_COUNTER_MAILBOX,
                ),
            ],
            max_restarts=settings.max_restarts,
            max_seconds=settings.max_seconds,
            on_restart=self._count_restart,
        )
        try:
            await self._supervisor.__aenter__()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(outbox.close)
                await sink.aclose()
                await store.aclose()
                await counter_store.aclose()
            raise
        self._buffer_ref = self._supervisor.ref("event_buffer")
        self._sessions_ref = self._supervisor.ref("sessions")
        self._counters_ref = self._supervisor.ref("counters")
        self._offer_to_buffer = self._buffer_ref.mailbox.offer
        self._offer_to_sessions = self._sessions_ref.mailbox.offer
        self._running = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        self._running = False
        assert self._supervisor is not None
        assert self._sink is not None
        try:
            return await self._supervisor.__aexit__(exc_type, exc, traceback)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    if self._outbox is not None:
                        # After the writer: what it spilled or settled is on disk by now.
                        await anyio.to_thread.run_sync(self._outbox.close)
                finally:
                    # A failing outbox (a failed fsync) still lets the connections close.
                    await self._sink.aclose()
                    if self._session_store is not None:
                        await self._session_store.aclose()
                    if self._counter_store is not None:
                        await self._counter_store.aclose()

    def __del__(self) -> None:
        if self._running:
            warnings.warn(
                "AnalyticsBuffer was never closed: leave its 'async with' block",
                ResourceWarning,
                stacklevel=1,
            )

    def track(self, event: Event) -> bool:
        """Accept ``event`` for writing; never waits.

        :returns: ``True`` when accepted, ``False`` when the buffer is full and
            ``overflow`` is ``drop_newest`` (the event is counted as dropped)
        :raises InvalidEvent: naming the field at fault; nothing else is affected
        :raises BufferFull: when full and ``overflow`` is ``raise`` or ``block``
        :raises BufferClosed: when the buffer is not running
        """
        return self._offer(check_event, event) is None or self._overflow()

    def track_json(self, raw: bytes | bytearray | memoryview | str) -> bool:
        """Accept one event given as JSON (as an HTTP handler received it).

        Same outcomes as :meth:`track`; malformed JSON or fields raise
        :class:`InvalidEvent`.
        """
        return self._offer(decode_event, raw) is None or self._overflow()

    async def put(self, event: Event) -> None:
        """Accept ``event``, waiting for room when the buffer is full.

        The overflow policy does not apply: ``put`` waits up to ``put_timeout``.
        With room available it returns without yielding to other tasks, so a
        producer that puts many events in a row should yield now and then.

        :raises BufferFull: when no room came within ``put_timeout``
        :raises OutboxError: in ``wal`` durability, when the outbox's log refuses
            the event (an :class:`~analytics_buffer.OutboxFull` at its cap or on a
            full disk), whatever ``overflow`` says
        :raises InvalidEvent: as for :meth:`track`
        """
        refused = self._offer(check_event, event, True)  # a refusal raises (positional: cheaper)
        if refused is None:
            return
        event, size = refused
        capacity = self._capacity
        with anyio.move_on_after(self.settings.put_timeout):
            await capacity.wait_for_room(size)
            wal = self._wal
            if wal is not None:
                self._log(wal, event, True)  # put: a refusal raises
            capacity.take(size)
            try:
                actor = self._sessions_ref if event.session_id else self._buffer_ref
                await actor.send((event, size))
            except BaseException:
                capacity.give_back(1, size)
                if wal is not None:
                    wal.retract(event)
                raise
            self._counters.accepted += 1
            self._counted.append(event)
            return
        raise BufferFull(f"no room for the event within put_timeout={self.settings.put_timeout} s")

    async def flush(self) -> None:
        """Return once every event accepted before the call is written or dead-lettered.

        Session events that must wait are the exception: a screen view
        waiting for its successor, and, while the session store is
        unreachable, session events held in memory.

        It waits as long as the Writer's retries take; bound it with
        ``anyio.move_on_after`` if you need to.
        """
        # Sessions first: what they settle and pass on reaches the EventBuffer before its flush.
        await self._sessions_ref.call(SESSION_FLUSH, timeout=None)
        await self._buffer_ref.call(FLUSH, timeout=None)

    async def last_screen_view(self, project_id: str, profile_id: str) -> Event | None:
        """Return the latest screen_view (by ``created_at``) of a profile, or ``None``.

        :raises InvalidArgument: ``project_id`` or ``profile_id`` is not a non-empty string
        """
        _check_text("project_id", project_id)
        _check_text("profile_id", profile_id)
        event: Event | None = await self._sessions_ref.call(
            LastScreenView(project_id, profile_id), timeout=None
        )
        return event

    async def active_visitors(self, project_id: str) -> int:
        """Return how many profiles of ``project_id`` were seen within ``live_window``.

        A profile is seen at the ``created_at`` of its events; it counts while
        that is less than ``live_window`` seconds before now (on the buffer's
        clock), so exactly at the window's edge it no longer does.

        :raises InvalidArgument: ``project_id`` is not a non-empty string
        :raises StoreUnavailable: the counter store (Redis) cannot be reached
        """
        _check_text("project_id", project_id)
        visitors: int = await self._counters_ref.call(ActiveVisitors(project_id), timeout=None)
        return visitors

    async def count(self, project_id: str, name: str, day: date) -> int:
        """Return how many accepted events of ``(project_id, name)`` were created on UTC ``day``.

        Exact at every moment: rolled-up counts (ClickHouse) plus those not
        yet rolled up (the store, and this instance's memory).

        :raises InvalidArgument: ``project_id`` or ``name`` is not a non-empty
            string, or ``day`` is not a ``datetime.date`` (a ``datetime`` is refused)
        :raises StoreUnavailable: the counter store (Redis) cannot be reached
        :raises SinkError: ClickHouse cannot be read
        """
        counts = await self._read_counts(project_id, name, day)
        return counts[0]

    async def hourly_counts(self, project_id: str, name: str, day: date) -> dict[int, int]:
        """Return the counts of ``(project_id, name)`` for each UTC hour (0-23) of ``day``.

        As exact as :meth:`count`, whose value is their sum; raises as it does.
        """
        counts = await self._read_counts(project_id, name, day)
        return dict(enumerate(counts[1:]))

    def flush_async(self) -> None:
        """Ask for a flush now and return at once."""
        self._buffer_ref.cast(FLUSH_SOON)

    async def replay_outbox(self) -> None:
        """Replay the disk outbox now; return once no segment is waiting.

        Like :meth:`flush`, it waits as long as ClickHouse stays down (the
        replay retries with backoff); bound it with ``anyio.move_on_after``.
        A buffer that shares its ``data_dir`` with the outbox's owner returns at once.
        """
        if self._outbox is None or not self._outbox.owner:
            return
        assert self._supervisor is not None
        await self._supervisor.ref("replayer").call(REPLAY_NOW, timeout=None)

    def stats(self) -> Stats:
        """Return a snapshot of the counters."""
        stats = self._counters.snapshot()
        if self._outbox is None:
            return stats
        return stats._replace(**self._outbox.figures()._asdict())  # --- durable outbox

    async def _read_counts(self, project_id: str, name: str, day: date) -> list[int]:
        """The day's count, then its 24 hours'."""
        _check_text("project_id", project_id)
        _check_text("name", name)
        if type(day) is not date:
            kind = "a datetime: pass its .date()" if isinstance(day, datetime) else type(day)
            raise InvalidArgument(f"day must be a datetime.date, got {kind}")
        counts: dict[str, int] = await self._counters_ref.call(
            CountRead(project_id, name, day), timeout=None
        )
        return list(counts.values())

    def _offer(
        self,
        validate: Callable[[T, int], tuple[Event, int]],
        value: T,
        refusal_raises: bool = False,
        /,
    ) -> tuple[Event, int] | None:
        """Validate ``value`` and hand the event to its actor if there is room.

        The path every accepted event takes, so it is written out flat:
        ``Capacity.fits``, ``Capacity.take`` and ``ActorRef.cast`` are inlined
        (measured side by side, such calls cost about 0.25 us of a 1.4 us
        ``track``). In ``wal`` durability the event is appended to the
        outbox's log first (:meth:`_log`) and retracted if no actor takes it.

        :returns: ``None`` once accepted; the checked event and its size when
            there is no room, for the caller's overflow policy or wait
        :raises InvalidEvent: counted as rejected
        """
        if not self._running:
            raise BufferClosed("the buffer is not running: track inside 'async with'")
        counters = self._counters
        try:
            event, size = validate(value, self._max_event_bytes)
        except InvalidEvent:
            counters.rejected += 1
            raise
        if (
            counters.buffered < self._max_buffered_events
            and counters.buffered_bytes + size <= self._max_buffered_bytes
        ):
            wal = self._wal
            if wal is None or self._log(wal, event, refusal_raises):
                # Events of a session go through the SessionActor, the others straight on.
                offer = self._offer_to_sessions if event.session_id else self._offer_to_buffer
                try:
                    offered = offer((event, size))
                except BaseException:  # a closed mailbox: ActorDeadError
                    if wal is not None:
                        wal.retract(event)
                    raise
                if offered:
                    counters.buffered += 1
                    counters.buffered_bytes += size
                    counters.accepted += 1
                    self._counted.append(event)
                    return None
                if wal is not None:
                    wal.retract(event)
        return event, size

    def _log(self, wal: Outbox, event: Event, refusal_raises: bool) -> bool:
        """Append ``event`` to the outbox's log (``wal`` durability): on disk before it counts.

        When the log refuses it (``outbox_max_bytes``, a full disk, a failed
        write or fsync), ``drop_newest`` gets ``False`` (the event counts as
        dropped, and as ``outbox_refused``); other policies, and ``put``
        (``refusal_raises``), get the :class:`~analytics_buffer.OutboxError`
        (an :class:`~analytics_buffer.OutboxFull` is also a ``BufferFull``).
        """
        try:
            wal.append(event)
        except OutboxError:
            if refusal_raises or self.settings.overflow != "drop_newest":
                raise
            return False
        return True

    def _overflow(self) -> bool:
        policy = self.settings.overflow
        if policy == "drop_newest":
            self._counters.dropped += 1
            return False
        counters = self._counters
        held = f"{counters.buffered} events / {counters.buffered_bytes} bytes buffered"
        if policy == "block":
            raise BufferFull(f"buffer full ({held}); track cannot wait: use 'await put(event)'")
        raise BufferFull(f"buffer full ({held}); overflow='raise'")

    def _count_restart(self, child: str, reason: Exception) -> None:
        self._counters.restarts += 1


def _check_text(what: str, value: object) -> None:
    if type(value) is not str or not value:
        raise InvalidArgument(f"{what} must be a non-empty string, got {value!r}")


def _create_counter_store(settings: Settings) -> CounterStore:
    if settings.redis_url is None:
        return MemoryCounterStore()
    from ._redis_counters import RedisCounterStore

    return RedisCounterStore(
        settings.redis_url, prefix=settings.redis_prefix, retention=settings.counter_retention
    )


def _rollups_for(sink: Sink, settings: Settings) -> RollupTarget | None:
    """The counters table next to the events table, when the sink is one of ours."""
    if not isinstance(sink, TupleSink):
        return None
    return SinkRollups(sink, counters_table(settings.table))


def _create_session_store(settings: Settings) -> SessionStore:
    if settings.redis_url is None:
        return MemorySessionStore(settings.session_shards)
    from ._redis_sessions import RedisSessionStore

    return RedisSessionStore(
        settings.redis_url,
        prefix=settings.redis_prefix,
        shards=settings.session_shards,
        retention=settings.session_retention,
    )
