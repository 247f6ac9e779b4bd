"""The SessionActor: pairs screen views through a session store.

Every accepted event that carries a ``session_id`` comes here as an
``(event, size)`` cast. Once per ``session_interval`` (and on ``flush()``)
the actor runs one *cycle*:

1. hand the events that arrived to the store in one call (their activity
   counts for idleness; screen_view and session_end become pending) and
   release their room in the buffer's bound;
2. give regular events their inherited path and origin, and pass them on to
   the EventBuffer;
3. claim the shards that have work, settle their sessions
   (:func:`~analytics_buffer._sessions.settle`), have the Writer store what
   that produced, and only then complete the claim, which removes the
   written events from the store.

While the store is unreachable, events wait here (bounded by the buffer's
bound, since their room is not released) and ``stats().sessions_degraded``
is true; nothing accepted is lost.

On shutdown the arrived events go to the store; with a shared (Redis) store
pending state stays there for the next start, while with the in-memory store
pending screen_views are written with the duration known so far.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, TypeVar, final

import anyio.lowlevel

from ._actor import Actor, ActorRef, Reply, Timer
from ._capacity import Capacity
from ._deadletter import DeadLetters
from ._event import Event
from ._exceptions import MailboxFull, StoreUnavailable
from ._session_store import Claim, MemorySessionStore, SessionOutcome, SessionStore
from ._sessions import inherit, is_session_event, settle
from ._settings import Settings
from ._stats import Counters
from ._writer import Batch, WriteBatch

__all__ = ("SESSION_FLUSH", "LastScreenView", "SessionActor")

log = logging.getLogger("analytics_buffer.sessions")

T = TypeVar("T")

_CLEANUP_EVERY: Final = 60
"""Cycles between two clean-ups of stale sessions."""
_CLAIM_ROUNDS: Final = 64
"""Claim rounds per cycle at most (each takes up to ``claim_size`` events per
shard), so that a cycle ends even while other instances keep adding."""
_SLICE: Final = 10_000
"""Events handed to the store per call: one round trip each, a checkpoint between."""


@final
class _SessionFlush:
    def __repr__(self) -> str:
        return "SESSION_FLUSH"


SESSION_FLUSH: Final = _SessionFlush()
"""Call: run a cycle now, reply once its writes are stored."""


@final
class LastScreenView:
    """Call: the latest screen_view of a profile, or ``None``."""

    __slots__ = ("profile_id", "project_id")

    def __init__(self, project_id: str, profile_id: str) -> None:
        self.project_id = project_id
        self.profile_id = profile_id


@final
class _Cycle:
    """The timer's message."""


_CYCLE: Final = _Cycle()


@final
class SessionActor(Actor):
    """Feeds the session store and writes what settled sessions produce.

    :param on_stored: called with the session events a durable store (Redis)
        has taken: the outbox's log lets go of them, the store keeps them
    """

    def __init__(
        self,
        *,
        settings: Settings,
        store: SessionStore,
        writer: ActorRef,
        event_buffer: ActorRef,
        owner: str,
        counters: Counters,
        capacity: Capacity,
        dead_letters: DeadLetters,
        wall_clock: Callable[[], float],
        arrived: list[tuple[Event, int]],
        on_stored: Callable[[list[Event]], None] | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._writer = writer
        self._event_buffer = event_buffer
        self._owner = owner
        self._counters = counters
        self._capacity = capacity
        self._dead_letters = dead_letters
        self._wall_clock = wall_clock
        self._on_stored = on_stored
        # Owned by the client, so events that arrived survive a restart of this actor.
        self._arrived = arrived
        self._timer: Timer | None = None
        self._cycles = 0

    async def init(self) -> None:
        self._timer = self.send_after(self._settings.session_interval, _CYCLE)

    async def handle_casts(self, messages: Iterator[object]) -> None:
        for message in messages:
            if type(message) is tuple:
                self._arrived.append(message)
                self._counters.sessions_waiting += 1
            else:
                log.warning("session actor: dropped unknown cast %r", message)

    async def handle_info(self, message: object) -> None:
        if message is _CYCLE:
            try:
                await self._cycle()
            finally:
                self._timer = self.send_after(self._settings.session_interval, _CYCLE)

    async def handle_call(self, message: object, reply: Reply[Any]) -> None:
        if message is SESSION_FLUSH:
            await self._cycle()
            reply.send(None)
        elif isinstance(message, LastScreenView):
            await self._take_arrived()
            reply.send(await self._store.last_screen_view(message.project_id, message.profile_id))
        else:
            await super().handle_call(message, reply)

    async def terminate(self, reason: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        try:
            await self._take_arrived()
            if reason is None and isinstance(self._store, MemorySessionStore):
                # Its state dies with the process: write what is pending now.
                # (After a crash it lives on, for the restarted instance.)
                await self._settle([self._store.claim_everything()], drain=True)
        finally:
            if self._arrived and reason is None:
                self._dead_letter_arrived("the session store could not take them at shutdown")

    async def _cycle(self) -> None:
        await self._take_arrived()
        if self._counters.sessions_degraded:
            return
        await self._settle_claims()
        self._cycles += 1
        if self._cycles % _CLEANUP_EVERY == 0:
            _, removed = await self._guard(
                self._store.cleanup(self._wall_clock(), self._settings.session_retention)
            )
            self._counters.stale_sessions_removed += removed or 0

    async def _take_arrived(self) -> None:
        """Hand the arrived events to the store, a slice at a time, then pass regular ones on.

        Regular events are passed on after every slice is stored, so their
        inheritance sees every screen_view that arrived in the same cycle.
        """
        regular: list[tuple[Event, int]] = []
        while self._arrived:
            arrived = self._arrived[:_SLICE]
            events = [event for event, _ in arrived]
            added, _ = await self._guard(self._store.add(events, self._wall_clock()))
            if not added:
                break
            del self._arrived[: len(arrived)]
            self._counters.sessions_waiting -= len(arrived)
            held = [(event, size) for event, size in arrived if is_session_event(event)]
            self._capacity.give_back(len(held), sum(size for _, size in held))
            if self._on_stored is not None:
                self._on_stored([event for event, _ in held])
            regular += [(event, size) for event, size in arrived if not is_session_event(event)]
            # Big bursts must not stall the event loop.
            await anyio.lowlevel.checkpoint()
        if regular:
            await self._pass_on(regular)

    async def _pass_on(self, regular: list[tuple[Event, int]]) -> None:
        needs_history = sorted(
            {(e.project_id, e.session_id) for e, _ in regular if not e.path and not e.origin}
        )
        histories = None
        if needs_history:
            # Without the store, events pass on uninherited rather than wait.
            _, histories = await self._guard(self._store.history(needs_history))
        for event, size in regular:
            if histories:
                event = inherit(event, histories.get((event.project_id, event.session_id), []))
            try:
                self._event_buffer.cast((event, size))
            except MailboxFull:
                await self._event_buffer.send((event, size))

    async def _settle_claims(self) -> None:
        """Claim and settle until no shard has work left (a claim takes a bounded part)."""
        settings = self._settings
        for _ in range(_CLAIM_ROUNDS):
            _, claims = await self._guard(
                self._store.claim(
                    self._owner,
                    self._wall_clock(),
                    timeout=settings.session_timeout,
                    lease=settings.session_lease,
                    limit=settings.session_shards,
                )
            )
            if not claims:
                return
            await self._settle(claims, drain=False)

    async def _settle(self, claims: list[Claim], *, drain: bool) -> None:
        """Settle the claims, have the Writer store what they produced, then complete them.

        Settled events go to the Writer in batches of about ``max_batch_events``
        as soon as such a batch is full, so ClickHouse stores one while the
        next is settled; a claim is completed once the batch holding the last
        of its events is stored.
        """
        counters = self._counters
        sent: list[tuple[list[tuple[Claim, list[SessionOutcome]]], Reply[None] | None]] = []
        write: list[Event] = []
        settled_claims: list[tuple[Claim, list[SessionOutcome]]] = []
        for claim in claims:
            outcomes: list[SessionOutcome] = []
            for work in claim.sessions:
                settled = settle(work.pending, work.state, end=work.idle, drain=drain)
                write += settled.write
                if settled.pending:
                    # The events settle kept pending are the very objects of the claim.
                    still = {id(event) for event in settled.pending}
                    written = [event.id for event in work.pending if id(event) not in still]
                else:
                    written = [event.id for event in work.pending]
                outcomes.append(SessionOutcome(key=work.key, state=work.state, written=written))
                counters.sessions_ended += settled.ended
                counters.session_screen_views += sum(
                    1 for event in settled.write if event.name == "screen_view"
                )
            settled_claims.append((claim, outcomes))
            if len(write) >= self._settings.max_batch_events:
                sent.append((settled_claims, await self._send(write)))
                write, settled_claims = [], []
            await anyio.lowlevel.checkpoint()
        if settled_claims:
            sent.append((settled_claims, await self._send(write)))
        for batch_claims, done in sent:
            if done is not None:
                await done.wait()
            for claim, outcomes in batch_claims:
                reached, completed = await self._guard(self._store.complete(claim, outcomes))
                if reached and not completed:
                    log.warning("claim on shard %d expired before it completed", claim.shard)

    async def _send(self, write: list[Event]) -> Reply[None] | None:
        """Hand ``write`` to the Writer as one batch; ``None`` when there is nothing."""
        if not write:
            return None
        done: Reply[None] = Reply()
        batch = Batch(_token(write), write, 0, held=0)
        await self._writer.send(WriteBatch(batch, done))
        return done

    async def _guard(self, operation: Awaitable[T]) -> tuple[bool, T | None]:
        """Await a store operation; on StoreUnavailable note the degraded state."""
        try:
            result = await operation
        except StoreUnavailable as exc:
            if not self._counters.sessions_degraded:
                log.warning("session store unavailable (%s); events wait in memory", exc)
            self._counters.sessions_degraded = True
            return False, None
        if self._counters.sessions_degraded:
            log.warning("session store is back")
            self._counters.sessions_degraded = False
        return True, result

    def _dead_letter_arrived(self, reason: str) -> None:
        events = [event for event, _ in self._arrived]
        self._dead_letters.write_now(events, reason=reason, code=0, token=f"{self._owner}-sessions")
        self._counters.dead_lettered += len(events)
        self._counters.sessions_waiting -= len(events)
        self._capacity.give_back(len(events), sum(size for _, size in self._arrived))
        self._arrived.clear()


def _token(events: list[Event]) -> str:
    """The same events settled again (after a lost claim) give the same token."""
    ids = repr(sorted([event.id.int for event in events])).encode()
    return f"s-{hashlib.blake2b(ids, digest_size=12).hexdigest()}"
