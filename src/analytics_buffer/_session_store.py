"""Where session state lives: the store interface and the in-memory store.

A store keeps, per session (``(project_id, session_id)``): its
:class:`~analytics_buffer._sessions.SessionState`, its pending session
events (by id, so an id seen twice is held once), the ids already written
(so an id seen again later is not written twice), and its screen_view
history for inheritance; per ``(project_id, profile_id)``: the last
screen_view.

Work is handed out by *claims* on shards (sessions are spread over
``shards`` by a hash of their key). A claim returns the sessions of a shard
that have new events or have been idle for ``session_timeout``; the claimer
settles them, has the Writer store what they produce, and only then calls
:meth:`SessionStore.complete`, which removes the written events. The Redis
store makes claims exclusive with a lease, so two instances never settle
the same session at once and a crashed instance's claim expires.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Sequence
from typing import Protocol, final

import msgspec

from ._event import Event
from ._sessions import (
    SCREEN_VIEW,
    ScreenViewMark,
    SessionState,
    epoch_ms,
    is_session_event,
    remember,
)

__all__ = (
    "Claim",
    "MemorySessionStore",
    "SessionKey",
    "SessionOutcome",
    "SessionStore",
    "SessionWork",
    "shard_of",
)

SessionKey = tuple[str, str]
"""``(project_id, session_id)``."""


def shard_of(key: SessionKey, shards: int) -> int:
    """The shard a session belongs to: stable across processes and restarts."""
    project_id, session_id = key
    return zlib.crc32(f"{len(project_id)}:{project_id}:{session_id}".encode()) % shards


class SessionWork(msgspec.Struct, kw_only=True):
    """One claimed session: its state, its pending events, and whether it is idle."""

    key: SessionKey
    state: SessionState
    pending: list[Event]
    idle: bool


class Claim(msgspec.Struct, kw_only=True):
    """The sessions of one shard, held by one claimer until :meth:`SessionStore.complete`."""

    shard: int
    token: str
    sessions: list[SessionWork]


class SessionOutcome(msgspec.Struct, kw_only=True):
    """What settling one claimed session changed."""

    key: SessionKey
    state: SessionState
    written: list[uuid.UUID]
    """Ids of the pending events now in ClickHouse (or dead-lettered). An
    outcome belongs to a session of its claim's shard."""


class SessionStore(Protocol):
    """Session state shared by the SessionActors of one or many instances."""

    async def add(self, events: Sequence[Event], now: float) -> None:
        """Record events that carry a session_id, arrived at wall-clock ``now``.

        Every one counts as activity of its session; session events
        (screen_view, session_end) also become pending.
        """

    async def claim(
        self, owner: str, now: float, *, timeout: float, lease: float, limit: int
    ) -> list[Claim]:
        """Claim up to ``limit`` shards that have work, for ``lease`` seconds."""

    async def complete(self, claim: Claim, outcomes: Sequence[SessionOutcome]) -> bool:
        """Apply ``outcomes`` and release ``claim``; ``False`` if the claim had expired."""

    async def history(self, keys: Sequence[SessionKey]) -> dict[SessionKey, list[ScreenViewMark]]:
        """The screen_view history of each session, oldest first."""

    async def last_screen_view(self, project_id: str, profile_id: str) -> Event | None:
        """The latest screen_view (by ``created_at``) of a profile."""

    async def cleanup(self, now: float, retention: float) -> int:
        """Forget ended sessions last seen before ``now - retention``; return how many."""

    async def aclose(self) -> None:
        """Release connections."""


@final
class _Session:
    __slots__ = ("history", "pending", "state", "written")

    def __init__(self, state: SessionState) -> None:
        self.state = state
        self.pending: dict[uuid.UUID, Event] = {}
        self.written: set[uuid.UUID] = set()
        self.history: list[ScreenViewMark] = []


@final
class MemorySessionStore:
    """The single-process store: plain dictionaries, claims always granted.

    The embedded default. Its state dies with the process; on shutdown the
    SessionActor writes pending screen_views with the duration known so far.
    """

    def __init__(self, shards: int = 16) -> None:
        self._shards = shards
        self._sessions: dict[SessionKey, _Session] = {}
        self._dirty: set[SessionKey] = set()
        self._last_screen_views: dict[tuple[str, str], Event] = {}
        self._claims = 0

    async def add(self, events: Sequence[Event], now: float) -> None:
        for event in events:
            key = (event.project_id, event.session_id)
            created = epoch_ms(event.created_at)
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = _Session(
                    SessionState(
                        project_id=event.project_id,
                        session_id=event.session_id,
                        profile_id=event.profile_id,
                        first_ms=created,
                        last_activity_ms=created,
                        last_seen=now,
                    )
                )
            state = session.state
            state.first_ms = min(state.first_ms, created)
            state.last_activity_ms = max(state.last_activity_ms, created)
            state.last_seen = max(state.last_seen, now)
            state.profile_id = state.profile_id or event.profile_id
            if not is_session_event(event):
                continue
            event_id = event.id
            if event_id in session.written:
                continue
            session.pending[event_id] = event
            self._dirty.add(key)
            if event.name == SCREEN_VIEW:
                remember(session.history, event)
                self._remember_last(event)

    async def claim(
        self, owner: str, now: float, *, timeout: float, lease: float, limit: int
    ) -> list[Claim]:
        idle_before = now - timeout
        by_shard: dict[int, list[SessionWork]] = {}
        for key, session in self._sessions.items():
            idle = not session.state.ended and session.state.last_seen <= idle_before
            if key in self._dirty or idle:
                by_shard.setdefault(shard_of(key, self._shards), []).append(
                    SessionWork(
                        key=key,
                        state=msgspec.structs.replace(session.state),
                        pending=list(session.pending.values()),
                        idle=idle,
                    )
                )
        claims = []
        for shard in sorted(by_shard)[:limit]:
            self._claims += 1
            claims.append(
                Claim(shard=shard, token=f"{owner}-{self._claims}", sessions=by_shard[shard])
            )
            self._dirty.difference_update(work.key for work in by_shard[shard])
        return claims

    async def complete(self, claim: Claim, outcomes: Sequence[SessionOutcome]) -> bool:
        for outcome in outcomes:
            session = self._sessions.get(outcome.key)
            if session is None:
                continue
            # Activity is add's to keep (adds may land while a claim is out).
            session.state.screen_views = outcome.state.screen_views
            session.state.ended = session.state.ended or outcome.state.ended
            for event_id in outcome.written:
                session.pending.pop(event_id, None)
                session.written.add(event_id)
        return True

    async def history(self, keys: Sequence[SessionKey]) -> dict[SessionKey, list[ScreenViewMark]]:
        found = {}
        for key in keys:
            session = self._sessions.get(key)
            if session is not None:
                found[key] = list(session.history)
        return found

    async def last_screen_view(self, project_id: str, profile_id: str) -> Event | None:
        return self._last_screen_views.get((project_id, profile_id))

    async def cleanup(self, now: float, retention: float) -> int:
        stale = [
            key
            for key, session in self._sessions.items()
            if session.state.ended
            and not session.pending
            and session.state.last_seen < now - retention
        ]
        for key in stale:
            state = self._sessions.pop(key).state
            profile = (state.project_id, state.profile_id)
            last = self._last_screen_views.get(profile)
            if last is not None and last.session_id == state.session_id:
                del self._last_screen_views[profile]
        return len(stale)

    async def aclose(self) -> None:
        pass

    def claim_everything(self) -> Claim:
        """One claim over every session that holds pending events (for shutdown)."""
        return Claim(
            shard=-1,
            token="shutdown",
            sessions=[
                SessionWork(
                    key=key,
                    state=msgspec.structs.replace(session.state),
                    pending=list(session.pending.values()),
                    idle=False,
                )
                for key, session in self._sessions.items()
                if session.pending
            ],
        )

    def _remember_last(self, screen_view: Event) -> None:
        key = (screen_view.project_id, screen_view.profile_id)
        known = self._last_screen_views.get(key)
        if known is None or known.created_at <= screen_view.created_at:
            self._last_screen_views[key] = screen_view
