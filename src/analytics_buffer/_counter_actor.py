"""The CounterActor: live visitors and real-time counters, rolled up into ClickHouse.

The client appends every accepted event to a list the actor shares with it
(no message per event); the actor takes that list in bulk.

* **Every ``counter_tick``** it counts what arrived into a
  :class:`~analytics_buffer._counters.Tally` (in slices, yielding to the
  event loop between them) and *applies* the tally to the store: one round
  trip whatever the number of events. An apply carries this instance's
  sequence number, so one whose outcome is unknown is sent again as it was
  and counts once.
* **Every ``rollup_interval``** it rolls up: finish the rollup left staged
  (by a crash, here or in another instance), then stage the live counters
  (atomically, under a fresh identity), write them to ClickHouse under that
  identity and unstage them. A rollup that fails stays staged and is
  finished, under the same identity, by the next one; increments that
  arrive meanwhile go to the live counters, for the rollup after it.
* **A read** (a call) first applies what this instance holds, then adds the
  store's live and staged counts to ClickHouse's, leaving out the rows of the
  rollup still staged. If a rollup (of another instance) staged counters
  while ClickHouse was read, the read is taken again. A read is therefore
  exact for this instance's events, and for other instances' events up to
  their last tick.

While the store is unreachable (``stats().counters_degraded``), counts wait
in memory; a read raises :class:`~analytics_buffer.StoreUnavailable` rather
than answer short. Memory grows with distinct counters (project, name,
hour), not with events, and visitors are dropped from memory once outside
the live window. When the counters held pass ``max_counter_keys``, and at
each rollup while degraded, they are rolled up from memory straight into
ClickHouse under an identity of their own; nothing is lost and nothing is
counted twice. Two things wait for the store instead: visitors (live state
only), and the one apply that was on its way when the store went away (it
may have landed, so only sending it again under its sequence number is safe).

On a stop, what the actor holds goes to the store. The in-memory store dies
with the process, so it is then rolled up into ClickHouse entirely; a
rollup that fails there is logged with the counts it loses.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any, Final, TypeVar, final

import anyio
import anyio.lowlevel

from ._actor import Actor, Reply, Timer
from ._counter_store import CounterStore, MemoryCounterStore, Staged
from ._counters import DAY, Tally, day_fields, day_start
from ._event import Event, new_event_id
from ._exceptions import SinkError, StoreUnavailable
from ._rollup import RollupTarget
from ._settings import Settings
from ._stats import Counters

__all__ = (
    "COUNTER_FLUSH",
    "COUNTER_ROLLUP",
    "ActiveVisitors",
    "CountRead",
    "CounterActor",
    "CounterState",
)

log = logging.getLogger("analytics_buffer.counters")

T = TypeVar("T")

_SLICE: Final = 1_000
"""Events counted between two checkpoints."""
_READ_ATTEMPTS: Final = 8


@final
class _Message:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


COUNTER_FLUSH: Final = _Message("COUNTER_FLUSH")
"""Call: apply what this instance holds to the store now."""
COUNTER_ROLLUP: Final = _Message("COUNTER_ROLLUP")
"""Call: roll up now; replies with the number of rollups written."""
_TICK: Final = _Message("TICK")
_ROLLUP: Final = _Message("ROLLUP")
_RESUME: Final = _Message("RESUME")


@final
class CountRead:
    """Call: the counts of ``(project_id, name)`` on ``day``, by field."""

    __slots__ = ("day", "name", "project_id")

    def __init__(self, project_id: str, name: str, day: date) -> None:
        self.project_id = project_id
        self.name = name
        self.day = day


@final
class ActiveVisitors:
    """Call: profiles of ``project_id`` seen within the live window."""

    __slots__ = ("project_id",)

    def __init__(self, project_id: str) -> None:
        self.project_id = project_id


@final
class CounterState:
    """What the actor holds, owned by the client so that it survives a restart."""

    def __init__(self) -> None:
        self.arrived: list[Event] = []
        """Accepted events, appended by the client, not yet counted."""
        self.tally = Tally()
        """Counted, not yet sent to the store."""
        self.inflight: Tally | None = None
        """Sent to the store as ``seq`` with an unknown outcome: sent again as is."""
        self.seq = 0
        self.local: Staged | None = None
        """A rollup made from memory while the store was unreachable, not yet written."""


@final
class CounterActor(Actor):
    """Counts accepted events into the counter store and rolls them up (module docstring)."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: CounterStore,
        rollups: RollupTarget | None,
        state: CounterState,
        counters: Counters,
        wall_clock: Callable[[], float],
        owner: str,
    ) -> None:
        self._settings = settings
        self._store = store
        self._rollups = rollups
        self._state = state
        self._counters = counters
        self._wall_clock = wall_clock
        self._owner = owner
        self._timers: list[Timer] = []

    async def init(self) -> None:
        self._timers = [
            self.send_after(self._settings.counter_tick, _TICK),
            self.send_after(self._settings.rollup_interval, _ROLLUP),
            self.send_after(0, _RESUME),
        ]

    async def handle_info(self, message: object) -> None:
        if message is _TICK:
            try:
                await self._tick(strict=False)
            finally:
                self._timers[0] = self.send_after(self._settings.counter_tick, _TICK)
        elif message is _ROLLUP:
            try:
                await self._rollup()
            finally:
                self._timers[1] = self.send_after(self._settings.rollup_interval, _ROLLUP)
        elif message is _RESUME:
            # A half-done rollup (left by a crash) is finished before anything else.
            if self._rollups is not None:
                _, staged = await self._guard(self._store.staged())
                if staged is not None:
                    await self._finish(staged)
        else:
            await super().handle_info(message)

    async def handle_call(self, message: object, reply: Reply[Any]) -> None:
        if isinstance(message, CountRead):
            reply.send(await self._read(message))
        elif isinstance(message, ActiveVisitors):
            await self._tick(strict=True)
            now = self._wall_clock()
            since = now - self._settings.live_window
            reply.send(await self._store.active_visitors(message.project_id, since, now))
        elif message is COUNTER_FLUSH:
            await self._tick(strict=True)
            reply.send(None)
        elif message is COUNTER_ROLLUP:
            reply.send(await self._rollup())
        else:
            await super().handle_call(message, reply)

    async def terminate(self, reason: BaseException | None) -> None:
        for timer in self._timers:
            timer.cancel()
        if reason is not None:
            return  # the state outlives this instance; the next one carries on
        await self._tick(strict=False)
        state = self._state
        if state.tally.hours or state.local is not None:
            # The store is unreachable: the counters go straight into ClickHouse instead.
            await self._rollup_local()
        if state.tally.hours or state.local is not None or state.inflight is not None:
            # The in-flight apply may have landed in the store: rolling it up could count twice.
            held = state.tally.keys_held() + (state.inflight.keys_held() if state.inflight else 0)
            log.error("counter store unreachable at shutdown: %d counters lost", held)
        if isinstance(self._store, MemoryCounterStore) and self._rollups is not None:
            # Its counters die with the process: roll up everything now.
            while await self._rollup():
                pass
            staged = await self._store.staged()
            lost = self._state.tally.events + (len(staged.counts) if staged else 0)
            if staged is not None or self._state.local is not None or self._state.tally:
                log.error("counters not rolled up at shutdown are lost (%d left)", lost)

    # -- counting ------------------------------------------------------------------

    async def _absorb(self) -> None:
        """Count the events that arrived, a slice at a time."""
        state = self._state
        arrived = state.arrived  # the client's list: emptied, never replaced
        end = len(arrived)
        done = 0
        try:
            while done < end:
                # Sliced in place: a copy of a tick's worth of events would be one
                # huge young list, which makes the next garbage-collector pass stall the loop.
                taken = arrived[done : min(done + _SLICE, end)]
                state.tally.add(taken)
                done += len(taken)
                self._counters.counted += len(taken)
                if done < end:
                    await anyio.lowlevel.checkpoint()
        finally:
            # Cancelled between slices: the rest waits for the next instance.
            del arrived[:done]

    async def _tick(self, *, strict: bool) -> None:
        """Count what arrived and apply it to the store.

        :param strict: raise :class:`StoreUnavailable` instead of keeping the counts
        """
        await self._absorb()
        state = self._state
        settings = self._settings
        now = self._wall_clock()
        state.tally.forget_visitors_before(now - settings.live_window)
        try:
            if state.inflight is not None:
                await self._apply(state.inflight, state.seq, now)
                state.inflight = None
            if state.tally:
                state.seq += 1
                state.inflight, state.tally = state.tally, Tally()
                await self._apply(state.inflight, state.seq, now)
                state.inflight = None
        except StoreUnavailable as exc:
            self._degraded(exc)
            held = state.tally.keys_held() + (state.inflight.keys_held() if state.inflight else 0)
            self._counters.counter_keys_held = held
            if held > settings.max_counter_keys:
                await self._rollup_local()
            if strict:
                raise
            return
        self._recovered()
        self._counters.counter_keys_held = 0

    async def _apply(self, tally: Tally, seq: int, now: float) -> None:
        await self._store.apply(
            tally.increments(),
            tally.seen(),
            writer=self._owner,
            seq=seq,
            now=now,
            window=self._settings.live_window,
        )

    # -- rollups -------------------------------------------------------------------

    async def _rollup(self) -> int:
        """Finish a staged rollup, then roll up the live counters; return rollups written."""
        if self._rollups is None:
            return 0
        await self._tick(strict=False)
        written = 0
        if self._counters.counters_degraded:
            return int(await self._rollup_local())
        if self._state.local is not None and await self._rollup_local():
            written += 1
        for _ in range(2):  # a left-over staged rollup first, then a fresh one
            reached, staged = await self._guard(self._store.stage(f"r-{new_event_id().hex}"))
            if not reached or staged is None or not await self._finish(staged):
                break
            written += 1
        return written

    async def _finish(self, staged: Staged) -> bool:
        """Write ``staged`` to ClickHouse and unstage it; ``False`` if that failed."""
        assert self._rollups is not None
        try:
            await self._rollups.write(staged)
        except SinkError as exc:
            log.warning("rollup %s not written (%s); it stays staged", staged.id, exc)
            return False
        reached, _ = await self._guard(self._store.unstage(staged.id))
        if reached:
            self._counters.counter_rollups += 1
        return reached

    async def _rollup_local(self) -> bool:
        """Roll up the counters held in memory straight into ClickHouse."""
        state = self._state
        if self._rollups is None:
            return False
        if state.local is None:
            increments = state.tally.increments()
            if not increments:
                return False
            state.local = Staged(id=f"m-{new_event_id().hex}", counts=increments)
            state.tally.hours.clear()
        try:
            await self._rollups.write(state.local)
        except SinkError as exc:
            log.warning("rollup from memory %s not written (%s)", state.local.id, exc)
            return False
        state.local = None
        self._counters.counter_rollups += 1
        return True

    # -- reads ---------------------------------------------------------------------

    async def _read(self, query: CountRead) -> dict[str, int]:
        await self._tick(strict=True)
        fields = day_fields(query.project_id, query.name, query.day)
        start = day_start(query.day)
        local = self._state.local
        for _ in range(_READ_ATTEMPTS):
            snapshot = await self._store.snapshot(fields)
            counts = dict(snapshot.counts)
            if self._rollups is not None:
                exclude = {i for i in (snapshot.staged_id, local and local.id) if i}
                rolled = await self._rollups.totals(
                    query.project_id, query.name, start, start + DAY, exclude
                )
                if await self._store.epoch() != snapshot.epoch:
                    continue  # a rollup moved counters meanwhile: read again
                for field, count in rolled.items():
                    counts[field] = counts.get(field, 0) + count
            if local is not None:
                for field in fields:
                    counts[field] = counts.get(field, 0) + local.counts.get(field, 0)
            return {field: counts.get(field, 0) for field in fields}
        raise StoreUnavailable(f"counters kept moving during {_READ_ATTEMPTS} read attempts")

    # -- the store's health --------------------------------------------------------

    async def _guard(self, operation: Awaitable[T]) -> tuple[bool, T | None]:
        try:
            result = await operation
        except StoreUnavailable as exc:
            self._degraded(exc)
            return False, None
        self._recovered()
        return True, result

    def _degraded(self, exc: StoreUnavailable) -> None:
        if not self._counters.counters_degraded:
            log.warning("counter store unavailable (%s); counts wait in memory", exc)
        self._counters.counters_degraded = True

    def _recovered(self) -> None:
        if self._counters.counters_degraded:
            log.warning("counter store is back")
            self._counters.counters_degraded = False
