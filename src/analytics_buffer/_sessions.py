"""Session semantics as pure functions: pairing, idle end, inheritance.

Nothing here does I/O or reads a clock; the stores and the SessionActor
call these with the state they hold and the time they read.

* **Pairing.** Within a session, ordered by ``created_at`` (ties keep
  arrival order), a screen_view's ``duration`` is the ``created_at`` of the
  next screen_view or session_end minus its own: never negative, 0 for equal
  timestamps. The last screen_view of an open session stays pending. A
  screen_view that arrives with a non-zero ``duration`` of its own keeps it
  and is written at once (it still bounds the one before it).
* **Ending.** A ``session_end`` event ends the session: nothing of it stays
  pending. An idle session (no new event for ``session_timeout``) is ended
  by :func:`settle` with ``end=True``: its pending screen_view gets the
  duration up to the session's last activity (latest ``created_at`` of any of
  its events, regular events included), and one ``session_end`` event is
  made at that time, with the session's duration (ms) and screen_view count
  in its properties. Its id is derived from the session, so two instances
  ending the same session make the same event.
* **After the end.** A session is never ended twice. A session event that
  arrives after its session ended is written at once, as it is (a late
  screen_view with duration 0, a second session_end unchanged), and the
  session stays ended.
* **Inheritance.** A regular event with a session_id and no path and origin
  of its own takes them from the session's last screen_view created before
  it, and records that screen_view's id in ``properties["__inherit_from"]``.
"""

from __future__ import annotations

import bisect
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Final

import msgspec

from ._event import Event

__all__ = (
    "SCREEN_VIEW",
    "SESSION_END",
    "ScreenViewMark",
    "SessionState",
    "Settled",
    "epoch_ms",
    "from_epoch_ms",
    "inherit",
    "is_session_event",
    "remember",
    "settle",
)

SCREEN_VIEW: Final = "screen_view"
SESSION_END: Final = "session_end"
_SESSION_END_IDS: Final = uuid.UUID("6f1c1d3e-2b4a-4c1e-9a53-5e55e5e55e55")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_CREATED: Final = attrgetter("created_at")
_BOUNDARIES: Final = frozenset((SCREEN_VIEW, SESSION_END))
MAX_HISTORY: Final = 1000
"""Screen views remembered per session for inheritance (the latest ones)."""


def is_session_event(event: Event) -> bool:
    """Whether ``event`` is paired by the SessionActor (rather than buffered as is)."""
    return bool(event.session_id) and event.name in (SCREEN_VIEW, SESSION_END)


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch (events carry millisecond precision)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def from_epoch_ms(milliseconds: int) -> datetime:
    """The UTC datetime of ``milliseconds`` since the epoch."""
    return _EPOCH + timedelta(milliseconds=milliseconds)


class ScreenViewMark(msgspec.Struct, array_like=True, frozen=True):
    """What inheritance needs of a screen_view."""

    created_ms: int
    id: uuid.UUID
    path: str
    origin: str


class SessionState(msgspec.Struct, kw_only=True):
    """What a store keeps of one session besides its pending events."""

    project_id: str
    session_id: str
    profile_id: str = ""
    first_ms: int
    """Earliest ``created_at`` of any event of the session."""
    last_activity_ms: int
    """Latest ``created_at`` of any event of the session."""
    last_seen: float
    """Wall-clock seconds when the session's latest event arrived."""
    screen_views: int = 0
    """Screen views written so far."""
    ended: bool = False


class Settled(msgspec.Struct, kw_only=True):
    """The outcome of :func:`settle`: what to write and what stays pending."""

    write: list[Event]
    pending: list[Event]
    ended: bool
    """Whether the session ended in this settle (explicitly or by idleness)."""


def settle(
    pending: Sequence[Event], state: SessionState, *, end: bool, drain: bool = False
) -> Settled:
    """Pair a session's pending events and decide what can be written.

    :param pending: the session's events not yet written, in arrival order
        (an id seen twice counts once)
    :param state: the session's state; updated in place (``screen_views``,
        ``ended``)
    :param end: end the session now (it has been idle for ``session_timeout``)
    :param drain: write the pending screen_view with the duration known so far
        (up to the last activity) without ending the session: for a store
        whose state is about to be lost (the in-memory store at shutdown)
    """
    events = _unique_sorted(pending)
    if state.ended:
        # Late arrivals for an ended session: written as they are.
        return Settled(write=events, pending=[], ended=False)
    # Each screen_view's successor is the nearest later boundary (screen_view or
    # session_end: what stores keep pending, so usually every event is one).
    created = [epoch_ms(event.created_at) for event in events]
    successors: list[int | None] = [*created[1:], None] if created else []
    if any(event.name not in _BOUNDARIES for event in events):
        boundary: int | None = None
        for at in range(len(events) - 1, -1, -1):
            successors[at] = boundary
            if events[at].name in _BOUNDARIES:
                boundary = created[at]
    write: list[Event] = []
    still_pending: list[Event] = []
    ended_now = False
    replace = msgspec.structs.replace
    for event, own, successor in zip(events, created, successors, strict=True):
        if ended_now or event.name != SCREEN_VIEW:
            write.append(event)
            ended_now = ended_now or event.name == SESSION_END
        elif event.duration:
            # The sender measured it already: keep its duration, hold nothing.
            write.append(event)
            state.screen_views += 1
        elif successor is not None or end or drain:
            until = successor if successor is not None else state.last_activity_ms
            write.append(replace(event, duration=max(0, until - own)))
            state.screen_views += 1
        else:
            still_pending.append(event)
    if end and not ended_now:
        write.append(_session_end(state))
        ended_now = True
    state.ended = ended_now
    return Settled(write=write, pending=still_pending, ended=ended_now)


def inherit(event: Event, history: Sequence[ScreenViewMark]) -> Event:
    """Give ``event`` the path and origin of the last screen_view created before it.

    ``history`` is sorted by ``created_ms``. Events with a path or origin of
    their own, or with no earlier screen_view, are returned unchanged.
    """
    if event.path or event.origin or not history:
        return event
    created = epoch_ms(event.created_at)
    position = bisect.bisect_left(history, created, key=lambda mark: mark.created_ms)
    if position == 0:
        return event
    mark = history[position - 1]
    return msgspec.structs.replace(
        event,
        path=mark.path,
        origin=mark.origin,
        properties={**event.properties, "__inherit_from": str(mark.id)},
    )


def remember(history: list[ScreenViewMark], screen_view: Event) -> None:
    """Add ``screen_view`` to ``history`` in order, keeping the latest ``MAX_HISTORY``."""
    mark = ScreenViewMark(
        epoch_ms(screen_view.created_at), screen_view.id, screen_view.path, screen_view.origin
    )
    if any(existing.id == mark.id for existing in history[-8:]):
        return
    bisect.insort(history, mark, key=lambda existing: existing.created_ms)
    del history[:-MAX_HISTORY]


def _unique_sorted(events: Sequence[Event]) -> list[Event]:
    unique = list(events)
    if len({event.id.int for event in unique}) < len(unique):
        seen: set[int] = set()
        unique = []
        for event in events:
            if event.id.int not in seen:
                seen.add(event.id.int)
                unique.append(event)
    unique.sort(key=_CREATED)  # stable: ties keep arrival order
    return unique


def _session_end(state: SessionState) -> Event:
    return Event(
        id=uuid.uuid5(_SESSION_END_IDS, f"{state.project_id}\x00{state.session_id}"),
        name=SESSION_END,
        project_id=state.project_id,
        profile_id=state.profile_id,
        session_id=state.session_id,
        created_at=from_epoch_ms(state.last_activity_ms),
        duration=max(0, state.last_activity_ms - state.first_ms),
        properties={
            "duration": max(0, state.last_activity_ms - state.first_ms),
            "screen_views": state.screen_views,
        },
    )
