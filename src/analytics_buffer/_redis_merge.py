"""The packed session values of the Redis store, and the merging its claims do.

Pure Python, no I/O: :class:`~analytics_buffer._redis_sessions.RedisSessionStore`
reads inbox entries and stored values, and a claim turns them into work with
:func:`merge_groups`; its ``complete`` writes what :func:`changes` returns.

* An inbox :class:`Entry` is one add's events of one shard, in arrival order.
* A session's :class:`Stored` value (after a flag byte, ``p`` when it holds
  pending events, ``-`` otherwise) keeps its state, its pending events (as
  encoded), the ids written (the latest ``INLINE_WRITTEN``, 16 bytes each;
  older ones in its written set) and its screen_view history (encoded marks,
  concatenated, in arrival order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from operator import attrgetter
from typing import Any, Final, final

import msgspec

from ._event import Event
from ._session_store import SessionKey, SessionOutcome, SessionWork
from ._sessions import (
    MAX_HISTORY,
    SCREEN_VIEW,
    SESSION_END,
    ScreenViewMark,
    SessionState,
    epoch_ms,
)

__all__ = (
    "ENCODER",
    "ENTRY_DECODER",
    "EVENT_DECODER",
    "INLINE_WRITTEN",
    "STORED_DECODER",
    "Entry",
    "Held",
    "Merged",
    "Stored",
    "array_body",
    "changes",
    "decode_history",
    "has_id",
    "last_screen_views",
    "load",
    "lua_str",
    "merge_groups",
)

INLINE_WRITTEN: Final = 256
"""Written ids a session's value keeps; past that they move to its written set."""
_HISTORY_SLACK: Final = MAX_HISTORY // 4
"""Marks beyond ``MAX_HISTORY`` a value may hold before it is trimmed (amortised)."""
_SESSION_EVENTS: Final = frozenset((SCREEN_VIEW, SESSION_END))
_STR8: Final = [b"\xd9" + bytes((size,)) for size in range(256)]

_CREATED: Final = attrgetter("created_at")


class Entry(msgspec.Struct, array_like=True, frozen=True):
    """One add's events of one shard, in arrival order: the claimer groups them."""

    now: float
    events: list[Event]


class Stored(msgspec.Struct, array_like=True):
    """A session's value in the ``sessions`` hash (after its flag byte)."""

    first_ms: int
    last_ms: int
    last_seen: float
    profile: str
    screen_views: int
    ended: bool
    pending: list[msgspec.Raw]
    """Pending events, encoded, in arrival order."""
    written: bytes
    """Written ids, 16 bytes each (the latest ones when ``spilled``)."""
    spilled: bool
    """Older written ids are in the session's written set."""
    history: bytes
    """``marks`` encoded ScreenViewMarks, concatenated, in arrival order."""
    marks: int


@final
class Merged:
    """One session as a claim sees it: its stored value with the inbox merged in."""

    __slots__ = (
        "ended_before",
        "history",
        "marks",
        "name",
        "new_views",
        "pending",
        "raw",
        "spilled",
        "state",
        "touched",
        "written",
    )

    def __init__(self, name: str, state: SessionState, stored: Stored | None) -> None:
        self.name = name
        self.state = state
        self.pending: dict[int, Event] = {}
        self.raw: dict[int, msgspec.Raw] = {}
        self.new_views: list[Event] = []
        self.touched = False
        self.ended_before = state.ended
        if stored is None:
            self.written, self.spilled, self.history, self.marks = b"", False, b"", 0
        else:
            self.written, self.spilled = stored.written, stored.spilled
            self.history, self.marks = stored.history, stored.marks


@final
class Held:
    """What a claim merged, kept until its complete."""

    __slots__ = ("consumed", "merged", "own", "shard")

    def __init__(
        self, shard: int, consumed: int, merged: dict[SessionKey, Merged | None], own: list[int]
    ) -> None:
        self.shard = shard
        self.consumed = consumed
        self.merged = merged
        self.own = own


# One reused encoder and decoder per type. Ids travel as their 16 bytes.
ENCODER: Final = msgspec.msgpack.Encoder(uuid_format="bytes")
EVENT_DECODER: Final = msgspec.msgpack.Decoder(Event)
ENTRY_DECODER: Final = msgspec.msgpack.Decoder(Entry)
STORED_DECODER: Final = msgspec.msgpack.Decoder(Stored)
MARKS_DECODER: Final = msgspec.msgpack.Decoder(list[ScreenViewMark])


def lua_str(data: bytes, flag: bytes = b"") -> msgspec.Raw:
    """``flag + data`` as a msgpack ``str``: the cmsgpack in Redis cannot read ``bin``."""
    size = len(flag) + len(data)
    if size < 256:
        head = _STR8[size]
    elif size < 65536:
        head = b"\xda" + size.to_bytes(2)
    else:
        head = b"\xdb" + size.to_bytes(4)
    return msgspec.Raw(b"".join((head, flag, data)))


def array_body(encoded: bytes, count: int) -> bytes:
    """A msgpack array's items without its header (to concatenate arrays)."""
    return encoded[1 if count < 16 else 3 if count < 65536 else 5 :]


def has_id(written: bytes, event_id: bytes) -> bool:
    """Whether the 16-byte ``event_id`` is one of the ids packed in ``written``."""
    at = written.find(event_id)
    while at >= 0:
        if at % 16 == 0:
            return True
        at = written.find(event_id, at + 1)
    return False


def last_screen_views(
    shard_groups: Iterator[dict[SessionKey, tuple[list[float], list[Event]]]],
) -> list[tuple[str, msgspec.Raw]]:
    """Each profile's latest screen_view among the entries (ties: the later arrival)."""
    latest: dict[tuple[str, str], Event] = {}
    for groups in shard_groups:
        for key, (_, events) in groups.items():
            views = [event for event in events if event.name == SCREEN_VIEW]
            if not views or not key[1]:
                continue
            if len({view.profile_id for view in views}) > 1:
                candidates = views
            else:
                # One profile (the usual case): its latest, of equal ones the later arrival.
                candidates = [max(reversed(views), key=_CREATED)]
            for view in candidates:
                profile = (view.project_id, view.profile_id)
                known = latest.get(profile)
                if known is None or known.created_at <= view.created_at:
                    latest[profile] = view
    encode = ENCODER.encode
    return [
        (
            f"{len(project_id)}:{project_id}:{profile_id}",
            lua_str(b"%013d|" % epoch_ms(view.created_at) + encode(view)),
        )
        for (project_id, profile_id), view in latest.items()
    ]


def load(key: SessionKey, name: str, value: bytes | None) -> Merged | None:
    """A session as stored (``None`` when it is not), its pending events decoded."""
    if value is None:
        return None
    stored = STORED_DECODER.decode(memoryview(value)[1:])
    state = SessionState(
        project_id=key[0],
        session_id=key[1],
        profile_id=stored.profile,
        first_ms=stored.first_ms,
        last_activity_ms=stored.last_ms,
        last_seen=stored.last_seen,
        screen_views=stored.screen_views,
        ended=stored.ended,
    )
    merged = Merged(name, state, stored)
    decode = EVENT_DECODER.decode
    for raw in stored.pending:
        event = decode(raw)
        event_id = event.id.int
        merged.pending[event_id] = event
        merged.raw[event_id] = raw
    return merged


def merge_groups(
    groups: dict[SessionKey, tuple[list[float], list[Event]]],
    merged: dict[SessionKey, Merged | None],
    already: set[int],
    idle_before: float,
    name_of: Callable[[SessionKey], str],
) -> list[SessionWork]:
    """Merge each session's new events into it; return the claim's work."""
    for key, ((now,), events) in groups.items():
        first = epoch_ms(min(events, key=_CREATED).created_at)
        last = epoch_ms(max(events, key=_CREATED).created_at)
        session = merged.get(key)
        if session is None:
            profile = next((event.profile_id for event in events if event.profile_id), "")
            state = SessionState(
                project_id=key[0],
                session_id=key[1],
                profile_id=profile,
                first_ms=first,
                last_activity_ms=last,
                last_seen=now,
            )
            session = merged[key] = Merged(name_of(key), state, None)
        else:
            state = session.state
            if first < state.first_ms:
                state.first_ms = first
            if last > state.last_activity_ms:
                state.last_activity_ms = last
            if now > state.last_seen:
                state.last_seen = now
            if not state.profile_id:
                state.profile_id = next(
                    (event.profile_id for event in events if event.profile_id), ""
                )
        if key[1]:
            _take_pending(session, events, already)
    work = []
    for key, session in merged.items():
        if session is None:
            continue
        state = session.state
        idle = not state.ended and state.last_seen <= idle_before
        if session.touched or idle:
            work.append(
                SessionWork(
                    key=key,
                    state=msgspec.structs.replace(state),
                    pending=list(session.pending.values()),
                    idle=idle,
                )
            )
    return work


def _take_pending(session: Merged, events: list[Event], already: set[int]) -> None:
    """Make the session events among ``events`` pending, unless written already."""
    fresh = [event for event in events if event.name in _SESSION_EVENTS]
    if not fresh:
        return
    pending, written = session.pending, session.written
    ids = [event.id.int for event in fresh]
    if not written and not already and pending.keys().isdisjoint(ids):
        # The usual case, in bulk: new ids only (an id twice keeps its first place).
        pending.update(zip(ids, fresh, strict=True))
        session.new_views += (event for event in fresh if event.name == SCREEN_VIEW)
        session.touched = True
        return
    for event_id, event in zip(ids, fresh, strict=True):
        if event_id in pending:
            # Resent while pending: it keeps its place and takes the new value.
            pending[event_id] = event
            session.raw.pop(event_id, None)
        elif event_id in already or (written and has_id(written, event.id.bytes)):
            continue
        else:
            pending[event_id] = event
            if event.name == SCREEN_VIEW:
                session.new_views.append(event)
        session.touched = True


def changes(
    held: Held, outcomes: Sequence[SessionOutcome], name_of: Callable[[SessionKey], str]
) -> list[Any]:
    """What ``complete`` writes to the shard: see the COMPLETE script for the layout.

    The same outcomes give the same changes again (a retried ``complete``).
    """
    merged = held.merged
    new_written: dict[SessionKey, list[bytes]] = {}
    for outcome in outcomes:
        session = merged.get(outcome.key)
        if session is None:
            continue
        session.state.screen_views = outcome.state.screen_views
        session.state.ended = session.state.ended or outcome.state.ended
        pending, raw = session.pending, session.raw
        numbers = [event_id.int for event_id in outcome.written]
        for number in numbers:
            pending.pop(number, None)
            raw.pop(number, None)
        new_written.setdefault(outcome.key, []).append(
            b"".join([number.to_bytes(16) for number in numbers])
        )
    encode = ENCODER.encode
    values: list[Any] = []
    open_seen: list[str] = []
    ended_seen: list[str] = []
    unindex: list[str] = []
    spills: list[list[Any]] = []
    forget: list[str] = []
    for key, session in merged.items():
        if session is None:
            forget.append(name_of(key))
            continue
        name = session.name
        state = session.state
        written, spilled = session.written, session.spilled
        fresh = new_written.get(key)
        if fresh:
            written += b"".join(fresh)
            if len(written) > 16 * INLINE_WRITTEN:
                spills.append(
                    [
                        name,
                        *(lua_str(written[at : at + 16]) for at in range(0, len(written), 16)),
                    ]
                )
                written, spilled = b"", True
        history, marks = session.history, session.marks
        if session.new_views:
            first_arrivals: dict[int, Event] = {}
            for view in session.new_views:
                first_arrivals.setdefault(view.id.int, view)
            new_marks = [
                (epoch_ms(view.created_at), view.id, view.path, view.origin)
                for view in first_arrivals.values()
            ]
            history += array_body(encode(new_marks), len(new_marks))
            marks += len(new_marks)
            if marks > MAX_HISTORY + _HISTORY_SLACK:
                history, marks = _trimmed(history, marks)
        raws = [
            session.raw.get(number) or msgspec.Raw(encode(event))
            for number, event in session.pending.items()
        ]
        stored = Stored(
            first_ms=state.first_ms,
            last_ms=state.last_activity_ms,
            last_seen=state.last_seen,
            profile=state.profile_id,
            screen_views=state.screen_views,
            ended=state.ended,
            pending=raws,
            written=written,
            spilled=spilled,
            history=history,
            marks=marks,
        )
        values += (name, lua_str(encode(stored), b"p" if raws else b"-"))
        seen = repr(state.last_seen)
        if state.ended:
            ended_seen += (seen, name)
            if not session.ended_before:
                unindex.append(name)
        else:
            open_seen += (seen, name)
    return [values, open_seen, ended_seen, unindex, spills, forget]


def _trimmed(history: bytes, marks: int) -> tuple[bytes, int]:
    """The latest ``MAX_HISTORY`` marks (by ``created_ms``), still in arrival order."""
    decoded = decode_history(history, marks)
    order = sorted(range(marks), key=lambda at: decoded[at].created_ms)
    keep = sorted(order[-MAX_HISTORY:])
    kept = [decoded[at] for at in keep]
    return array_body(ENCODER.encode(kept), len(kept)), len(kept)


def decode_history(history: bytes, marks: int) -> list[ScreenViewMark]:
    """A stored history (``marks`` items, concatenated) as a list."""
    return MARKS_DECODER.decode(b"\xdd" + marks.to_bytes(4) + history)
