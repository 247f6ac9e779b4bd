"""Pure session logic: ``settle``, ``inherit`` and ``remember``, without actors or stores.

Times are milliseconds after ``BASE_MS`` (events carry millisecond precision).
The property test at the end replays random sessions through successive
``settle`` calls the way the SessionActor and the in-memory store do, and
states the contract it checks.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Final, Literal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analytics_buffer import Event
from analytics_buffer._sessions import (
    MAX_HISTORY,
    SCREEN_VIEW,
    SESSION_END,
    ScreenViewMark,
    SessionState,
    Settled,
    epoch_ms,
    from_epoch_ms,
    inherit,
    is_session_event,
    remember,
    settle,
)

BASE_MS: Final = epoch_ms(datetime(2024, 5, 1, 12, 0, tzinfo=UTC))


def ev(
    name: str,
    at: int,
    *,
    duration: int = 0,
    path: str = "",
    origin: str = "",
    session: str = "s1",
    event_id: uuid.UUID | None = None,
) -> Event:
    """An event of ``session`` created ``at`` ms after ``BASE_MS``."""
    event = Event(
        name=name,
        project_id="p1",
        profile_id="u1",
        session_id=session,
        created_at=from_epoch_ms(BASE_MS + at),
        duration=duration,
        path=path,
        origin=origin,
    )
    return event if event_id is None else msgspec.structs.replace(event, id=event_id)


def sv(
    at: int,
    *,
    duration: int = 0,
    path: str = "",
    session: str = "s1",
    event_id: uuid.UUID | None = None,
) -> Event:
    return ev(SCREEN_VIEW, at, duration=duration, path=path, session=session, event_id=event_id)


def end(at: int) -> Event:
    return ev(SESSION_END, at)


def state_of(
    events: Sequence[Event], *, ended: bool = False, screen_views: int = 0, session: str = "s1"
) -> SessionState:
    """The state a store keeps after seeing ``events`` (any kind: all are activity)."""
    times = [epoch_ms(event.created_at) for event in events]
    return SessionState(
        project_id="p1",
        session_id=session,
        profile_id="u1",
        first_ms=min(times),
        last_activity_ms=max(times),
        last_seen=0.0,
        screen_views=screen_views,
        ended=ended,
    )


def durations(settled: Settled) -> dict[uuid.UUID, int]:
    return {event.id: event.duration for event in settled.write}


def ids(events: Sequence[Event]) -> list[uuid.UUID]:
    return [event.id for event in events]


# -- pairing ---------------------------------------------------------------------------


def test_pairs_by_created_at_not_by_arrival() -> None:
    a, b, c = sv(0), sv(1000), sv(2500)
    state = state_of([a, b, c])
    settled = settle([c, a, b], state, end=False)
    assert durations(settled) == {a.id: 1000, b.id: 1500}
    assert settled.pending == [c]
    assert not settled.ended
    assert (state.screen_views, state.ended) == (2, False)
    # Written in event order, otherwise unchanged.
    assert ids(settled.write) == [a.id, b.id]
    assert settled.write[0] == msgspec.structs.replace(a, duration=1000)


def test_the_last_screen_view_stays_pending_until_its_successor_arrives() -> None:
    a, b = sv(0), sv(4000)
    state = state_of([a])
    first = settle([a], state, end=False)
    assert (first.write, first.pending) == ([], [a])
    state.last_activity_ms = epoch_ms(b.created_at)
    second = settle([*first.pending, b], state, end=False)
    assert durations(second) == {a.id: 4000}
    assert second.pending == [b]


def test_identical_timestamps_give_zero_and_ties_keep_arrival_order() -> None:
    a, b, c = sv(500), sv(500), sv(900)
    settled = settle([b, a, c], state_of([a, b, c]), end=False)
    # b arrived first: it is paired with a (0 ms), a with c.
    assert durations(settled) == {b.id: 0, a.id: 400}
    assert settled.pending == [c]
    lone, closing = sv(700), end(700)
    closed = settle([lone, closing], state_of([lone]), end=False)
    assert durations(closed) == {lone.id: 0, closing.id: 0}


def test_a_session_end_pairs_the_last_screen_view_and_leaves_nothing_pending() -> None:
    a, b, closing = sv(0), sv(1000), end(4000)
    state = state_of([a, b, closing])
    settled = settle([closing, b, a], state, end=False)
    assert durations(settled) == {a.id: 1000, b.id: 3000, closing.id: 0}
    assert settled.pending == []
    assert settled.ended
    assert state.ended
    assert state.screen_views == 2
    assert settled.write[-1] == closing, "an explicit session_end is written as it is"


def test_a_session_end_arriving_before_the_screen_views_ends_the_session_at_once() -> None:
    a, closing = sv(0), end(3000)
    state = state_of([closing])
    first = settle([closing], state, end=False)
    assert (first.write, first.pending, first.ended) == ([closing], [], True)
    # The screen_view of an ended session is late: written as it is.
    state.first_ms = epoch_ms(a.created_at)
    second = settle([a], state, end=False)
    assert (second.write, second.pending, second.ended) == ([a], [], False)
    assert state.ended
    assert state.screen_views == 0


def test_events_after_the_session_end_in_event_time_are_written_as_they_are() -> None:
    a, closing, after, measured = sv(0), end(1000), sv(2000), sv(3000, duration=50)
    state = state_of([a, closing, after, measured])
    settled = settle([after, measured, a, closing], state, end=False)
    assert settled.write == [msgspec.structs.replace(a, duration=1000), closing, after, measured]
    assert settled.pending == []
    assert state.screen_views == 1


def test_a_screen_view_with_its_own_duration_keeps_it_and_bounds_the_one_before() -> None:
    a, measured = sv(0), sv(2000, duration=777)
    state = state_of([a, measured])
    settled = settle([measured, a], state, end=False)
    assert durations(settled) == {a.id: 2000, measured.id: 777}
    assert settled.pending == []
    assert state.screen_views == 2
    # Alone and last, it is written at once too.
    lone = sv(9000, duration=5)
    alone = settle([lone], state, end=False)
    assert (alone.write, alone.pending) == ([lone], [])


def test_an_id_seen_twice_in_the_pending_events_is_written_once() -> None:
    a, b = sv(0), sv(1000)
    twin = msgspec.structs.replace(a)
    settled = settle([a, b, twin, a], state_of([a, b]), end=False)
    assert ids(settled.write) == [a.id]
    assert settled.pending == [b]
    closing = end(1500)
    closed = settle([b, closing, closing], state_of([a, b, closing]), end=False)
    assert ids(closed.write) == [b.id, closing.id]


# -- ending ----------------------------------------------------------------------------


def test_an_idle_end_pairs_up_to_the_last_activity_and_makes_one_session_end() -> None:
    a, b, click = sv(100), sv(1100), ev("click", 6100)
    state = state_of([a, b, click])  # the click counts as activity
    settled = settle([a, b], state, end=True)
    assert settled.ended
    assert state.ended
    assert settled.pending == []
    assert durations(settled)[a.id] == 1000
    assert durations(settled)[b.id] == 5000, "up to the click, the last activity"
    made = settled.write[-1]
    assert made.name == SESSION_END
    assert (made.project_id, made.session_id, made.profile_id) == ("p1", "s1", "u1")
    assert made.created_at == click.created_at
    assert made.duration == 6000
    assert made.properties == {"duration": 6000, "screen_views": 2}
    # Deterministic: the same session gives the same id, another session another one.
    again = settle([], state_of([a, click]), end=True).write[-1]
    assert again.id == made.id
    other = settle([], state_of([sv(0, session="s2")], session="s2"), end=True).write[-1]
    assert other.id != made.id
    assert other.session_id == "s2"


def test_an_idle_end_with_nothing_pending_counts_the_screen_views_written_before() -> None:
    state = state_of([sv(0), sv(4000)], screen_views=2)
    settled = settle([], state, end=True)
    (made,) = settled.write
    assert made.properties == {"duration": 4000, "screen_views": 2}
    assert made.created_at == from_epoch_ms(BASE_MS + 4000)


def test_an_idle_end_with_an_explicit_session_end_pending_makes_no_second_one() -> None:
    a, closing = sv(0), end(2000)
    settled = settle([a, closing], state_of([a, closing]), end=True)
    assert settled.write == [msgspec.structs.replace(a, duration=2000), closing]
    assert settled.ended


def test_an_ended_session_is_never_ended_again() -> None:
    state = state_of([sv(0)])
    first = settle([], state, end=True)
    assert [event.name for event in first.write] == [SESSION_END]
    again = settle([], state, end=True)
    assert (again.write, again.pending, again.ended) == ([], [], False)
    drained = settle([], state, end=False, drain=True)
    assert (drained.write, drained.pending, drained.ended) == ([], [], False)
    assert state.ended


def test_late_events_after_an_idle_end_are_written_as_they_are() -> None:
    a = sv(0)
    state = state_of([a])
    settle([a], state, end=True)
    late = [sv(5000), sv(-2000), end(6000), sv(4000, duration=9)]
    settled = settle(late, state, end=True)
    assert sorted(ids(settled.write)) == sorted(ids(late))
    assert all(event in late for event in settled.write), "unchanged"
    assert (settled.pending, settled.ended) == ([], False)
    assert (state.ended, state.screen_views) == (True, 1)


def test_drain_writes_the_pending_screen_view_without_ending_the_session() -> None:
    a, b, click = sv(0), sv(1000), ev("click", 2500)
    state = state_of([a, b, click])
    settled = settle([a, b], state, end=False, drain=True)
    assert durations(settled) == {a.id: 1000, b.id: 1500}
    assert (settled.pending, settled.ended) == ([], False)
    assert not state.ended
    assert not [event for event in settled.write if event.name == SESSION_END]
    assert settle([], state, end=False, drain=True).write == []


def test_durations_are_never_negative() -> None:
    # A state whose last activity lags the screen_view (a store that saw it late).
    a = sv(5000)
    state = state_of([sv(0)])
    settled = settle([a], state, end=True)
    assert durations(settled)[a.id] == 0
    assert settled.write[-1].properties["duration"] == 0
    drained = settle([sv(7000)], state_of([sv(0)]), end=False, drain=True)
    assert drained.write[0].duration == 0


def test_is_session_event_needs_a_session_id() -> None:
    assert is_session_event(sv(0))
    assert is_session_event(end(0))
    assert not is_session_event(ev("click", 0))
    assert not is_session_event(ev(SCREEN_VIEW, 0, session=""))


# -- inheritance -----------------------------------------------------------------------


def mark_id(path: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, path)


def marks(*pairs: tuple[int, str]) -> list[ScreenViewMark]:
    return [
        ScreenViewMark(BASE_MS + at, mark_id(path), path, f"https://{path}.example")
        for at, path in pairs
    ]


def test_inherit_takes_the_last_screen_view_created_before_the_event() -> None:
    history = marks((0, "home"), (1000, "pricing"), (2000, "signup"))
    click = ev("click", 1500)
    got = inherit(click, history)
    assert (got.path, got.origin) == ("pricing", "https://pricing.example")
    assert got.properties == {"__inherit_from": str(mark_id("pricing"))}
    assert msgspec.structs.replace(got, path="", origin="", properties={}) == click
    assert inherit(ev("click", 5000), history).path == "signup"


def test_inherit_needs_a_screen_view_strictly_before_the_event() -> None:
    history = marks((0, "home"), (1000, "pricing"))
    assert inherit(ev("click", 1000), history).path == "home"
    early, tied = ev("click", -1), ev("click", 0)
    assert inherit(early, history) is early
    assert inherit(tied, history) is tied, "a screen_view at the same ms is not before it"


def test_inherit_keeps_what_the_event_has_of_its_own() -> None:
    history = marks((0, "home"))
    with_path = ev("click", 10, path="/own")
    with_origin = ev("click", 10, origin="https://own.example")
    assert inherit(with_path, history) is with_path
    assert inherit(with_origin, history) is with_origin
    bare = ev("click", 10)
    assert inherit(bare, []) is bare
    with_props = msgspec.structs.replace(bare, properties={"plan": "pro"})
    assert inherit(with_props, history).properties == {
        "plan": "pro",
        "__inherit_from": str(mark_id("home")),
    }
    assert with_props.properties == {"plan": "pro"}, "the input is not changed"


@given(
    times=st.lists(st.integers(0, 50), max_size=30),
    at=st.integers(-5, 60),
)
def test_inherit_agrees_with_a_linear_scan(times: list[int], at: int) -> None:
    history: list[ScreenViewMark] = []
    for index, created in enumerate(times):
        remember(history, sv(created, path=f"/{index}", event_id=uuid.UUID(int=index + 1)))
    event = ev("click", at)
    before = [mark for mark in history if mark.created_ms < BASE_MS + at]
    got = inherit(event, history)
    if before:
        assert got.path == before[-1].path
        assert got.properties["__inherit_from"] == str(before[-1].id)
    else:
        assert got is event


def test_remember_keeps_history_sorted_and_ignores_a_repeated_id() -> None:
    history: list[ScreenViewMark] = []
    late, early, middle = sv(3000, path="/c"), sv(1000, path="/a"), sv(2000, path="/b")
    for event in (late, early, middle, early):
        remember(history, event)
    assert [mark.path for mark in history] == ["/a", "/b", "/c"]
    assert history[0] == ScreenViewMark(BASE_MS + 1000, early.id, "/a", "")


def test_remember_keeps_ties_in_arrival_order_and_the_latest_max_history() -> None:
    history: list[ScreenViewMark] = []
    first, second = sv(10, path="/1"), sv(10, path="/2")
    remember(history, first)
    remember(history, second)
    assert [mark.path for mark in history] == ["/1", "/2"]
    history.clear()
    for index in range(MAX_HISTORY + 5):
        remember(history, sv(index, path=f"/{index}"))
    assert len(history) == MAX_HISTORY
    assert history[0].path == "/5"
    remember(history, sv(-1, path="/ancient"))
    assert len(history) == MAX_HISTORY
    assert "/ancient" not in [mark.path for mark in history]


@given(st.integers(-(10**12), 4 * 10**12))
def test_epoch_ms_round_trips(milliseconds: int) -> None:
    assert epoch_ms(from_epoch_ms(milliseconds)) == milliseconds


def test_epoch_ms_truncates_to_the_millisecond_and_honours_time_zones() -> None:
    moment = datetime(2024, 5, 1, 12, 0, 0, 999_999, tzinfo=UTC)
    assert epoch_ms(moment) == BASE_MS + 999
    shifted = moment.astimezone(timezone(timedelta(hours=-7)))
    assert epoch_ms(shifted) == BASE_MS + 999


# -- the property test -----------------------------------------------------------------


class Scenario(msgspec.Struct, frozen=True):
    """Events of one session, how they arrive, and how the session finishes."""

    events: list[Event]
    cycles: list[list[Event]]
    """Arrivals per settle call (may repeat an event: a duplicate)."""
    in_order: bool
    """Whether arrival cycles are non-decreasing in event time."""
    final: Literal["open", "end", "drain"]
    """How the session finishes: left open, ended when idle, or drained."""


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    count = draw(st.integers(1, 9))
    events: list[Event] = []
    ending_drawn = False
    for index in range(count):
        kind = draw(st.sampled_from(["sv", "sv", "sv", "measured", "regular", "end"]))
        if kind == "end" and ending_drawn:
            kind = "sv"
        at = draw(st.integers(0, 30))  # a narrow range: ties are common
        event_id = uuid.UUID(int=index + 1)
        if kind == "sv":
            events.append(sv(at, event_id=event_id))
        elif kind == "measured":
            events.append(sv(at, duration=draw(st.integers(1, 99)), event_id=event_id))
        elif kind == "regular":
            events.append(ev("click", at, event_id=event_id))
        else:
            ending_drawn = True
            events.append(ev(SESSION_END, at, event_id=event_id))
    in_order = draw(st.booleans())
    order = draw(st.permutations(range(count)))
    if in_order:
        # Cycles non-decreasing in event time; any order within a cycle.
        order = sorted(order, key=lambda i: epoch_ms(events[i].created_at))
    cuts = sorted(draw(st.sets(st.integers(1, max(count - 1, 1)), max_size=count)))
    bounds = [0, *cuts, count]
    cycles = [[events[i] for i in order[a:b]] for a, b in itertools.pairwise(bounds)]
    cycles = [cycle for cycle in cycles if cycle] or [[]]
    rng = random.Random(draw(st.integers(0, 2**32)))
    if in_order:
        for cycle in cycles:
            rng.shuffle(cycle)
    # Duplicates: an event delivered again, in its own cycle or a later one.
    for _ in range(draw(st.integers(0, 3))):
        source = draw(st.integers(0, len(cycles) - 1))
        if not cycles[source]:
            continue
        copy = draw(st.sampled_from(cycles[source]))
        target = draw(st.integers(source, len(cycles) - 1))
        cycles[target].insert(draw(st.integers(0, len(cycles[target]))), copy)
    final: Literal["open", "end", "drain"] = draw(st.sampled_from(["open", "end", "drain"]))
    return Scenario(events=events, cycles=cycles, in_order=in_order, final=final)


def _is_boundary(event: Event) -> bool:
    return event.name in (SCREEN_VIEW, SESSION_END)


@settings(max_examples=1000, deadline=None)
@given(scenarios())
def test_settling_in_cycles_matches_the_model(scenario: Scenario) -> None:
    """Random sessions settled in random cycles, as the SessionActor does.

    Each cycle hands ``settle`` what is still pending plus the session events
    that arrived (regular events only move the session's activity bounds, as
    the store does; an id already written is not handed again, as the
    store's written set does; a duplicate of a pending one is, and ``settle``
    must drop it). The session then stays open, is ended (``end=True``), or
    is drained (``drain=True``).

    The contract, as the implementation really gives it:

    * ``settle`` pairs a screen_view with the nearest later boundary
      (screen_view or session_end) *among the events it is handed*, in
      (created_at, arrival) order. So a duration is exact (the true
      successor's created_at minus its own, in the order of all the
      session's events) whenever the true successor is handed over no later
      than the call that writes the screen_view. In particular, when events
      arrive in event-time order across cycles (any order within a cycle),
      every duration is exact: that case is checked against a full model.
    * Whatever the arrival order: every id is written at most once, and
      exactly once when the session finishes ended or drained; durations are
      never negative and never shorter than the exact one; a written event
      differs from what arrived in its duration only; after a session_end
      (or an idle end) nothing stays pending; at most one screen_view is
      pending, the last boundary of what the call was handed; one
      session_end is made, only by an idle end of a session not already
      ended by one of its own.
    """
    first_seen: dict[uuid.UUID, int] = {}
    position = 0
    for cycle in scenario.cycles:
        for event in cycle:
            if event.id not in first_seen:
                first_seen[event.id] = position
            position += 1

    def order_key(event: Event) -> tuple[int, int]:
        return epoch_ms(event.created_at), first_seen[event.id]

    arrived = {event.id: event for event in scenario.events}
    full = sorted(scenario.events, key=order_key)
    boundaries = [event for event in full if _is_boundary(event)]
    state: SessionState | None = None
    pending: list[Event] = []
    written_ids: set[uuid.UUID] = set()
    written: list[Event] = []
    made: list[Event] = []

    def run(handed: list[Event], *, end_now: bool = False, drain: bool = False) -> None:
        nonlocal pending
        assert state is not None
        was_ended = state.ended
        settled = settle(list(handed), state, end=end_now, drain=drain)
        for event in settled.write:
            if event.id in arrived:
                assert event.id not in written_ids, "written twice"
                original = arrived[event.id]
                assert msgspec.structs.replace(event, duration=original.duration) == original
                written_ids.add(event.id)
                written.append(event)
            else:
                assert event.name == SESSION_END
                assert end_now
                assert not was_ended
                made.append(event)
            assert event.duration >= 0
        assert settled.ended == (state.ended and not was_ended)
        pending = list(settled.pending)
        assert len(pending) <= 1
        if state.ended:
            assert pending == []
        for event in pending:
            assert event.name == SCREEN_VIEW
            assert event.duration == 0
            assert event.id not in written_ids
            # The last boundary of what this call was handed.
            assert order_key(event) == max(order_key(e) for e in handed if _is_boundary(e))

    for cycle in scenario.cycles:
        for event in cycle:
            created = epoch_ms(event.created_at)
            if state is None:
                state = SessionState(
                    project_id="p1",
                    session_id="s1",
                    profile_id="u1",
                    first_ms=created,
                    last_activity_ms=created,
                    last_seen=0.0,
                )
            state.first_ms = min(state.first_ms, created)
            state.last_activity_ms = max(state.last_activity_ms, created)
        handed = pending + [
            event for event in cycle if is_session_event(event) and event.id not in written_ids
        ]
        if state is not None:
            run(handed)
    assert state is not None
    if scenario.final == "end":
        run(pending, end_now=True)
    elif scenario.final == "drain":
        run(pending, drain=True)

    written_by_id = {event.id: event for event in written}
    session_events = [event for event in full if is_session_event(event)]
    if scenario.final != "open":
        assert set(written_by_id) == {event.id for event in session_events}
        assert pending == []
    else:
        assert set(written_by_id) | set(ids(pending)) == {event.id for event in session_events}

    # Bounds that hold whatever the arrival order.
    for event in written:
        if event.name != SCREEN_VIEW or arrived[event.id].duration or event == arrived[event.id]:
            continue  # kept its own duration, or written as it is after the end
        later = boundaries[boundaries.index(arrived[event.id]) + 1 :]
        own = epoch_ms(event.created_at)
        candidates = {epoch_ms(b.created_at) - own for b in later}
        candidates.add(state.last_activity_ms - own)
        assert event.duration in candidates
        if later:
            assert event.duration >= epoch_ms(later[0].created_at) - own

    # The session_end made by an idle end.
    explicit = [event for event in full if event.name == SESSION_END]
    if scenario.final == "end" and not explicit:
        (closing,) = made
        assert closing.created_at == from_epoch_ms(state.last_activity_ms)
        assert closing.properties == {
            "duration": state.last_activity_ms - state.first_ms,
            "screen_views": state.screen_views,
        }
    else:
        assert made == []
    assert state.ended == (bool(explicit) or scenario.final == "end")

    if not scenario.in_order:
        return
    # The full model: arrivals in event-time order pair every screen_view exactly.
    ended_at = full.index(explicit[0]) if explicit else len(full)
    counted = 0
    for index, event in enumerate(full):
        if not is_session_event(event):
            continue  # regular events go to the EventBuffer, not through settle
        got = written_by_id.get(event.id)
        if index > ended_at:
            assert got == event, "after the session_end: written as it is"
            continue
        if event.name != SCREEN_VIEW:
            assert got == event  # the session_end itself
            continue
        successor = next((b for b in full[index + 1 : ended_at + 1] if _is_boundary(b)), None)
        if event.duration:
            expected: int | None = event.duration
        elif successor is not None:
            expected = epoch_ms(successor.created_at) - epoch_ms(event.created_at)
        elif scenario.final != "open":
            expected = state.last_activity_ms - epoch_ms(event.created_at)
        else:
            expected = None
        if expected is None:
            assert got is None
            assert pending == [event]
        else:
            assert got is not None
            assert got.duration == expected
            counted += 1
    assert state.screen_views == counted


def test_a_screen_view_written_before_its_true_successor_arrived_keeps_its_pairing() -> None:
    """The limit of the contract: pairing is only exact among the events handed together.

    ``a`` (0) and ``c`` (2000) arrive first, so ``a`` is written paired with
    ``c``; ``b`` (1000) arrives in the next cycle and is paired with ``c``
    too: ``a`` overlaps ``b`` by 1000 ms. Likewise ``d`` (3000) arriving
    after ``e`` (4000) was written is paired with the pending ``f`` (5000),
    not with ``e``, although ``e`` is in the session's history.
    """
    a, b, c = sv(0), sv(1000), sv(2000)
    state = state_of([a, c])
    first = settle([a, c], state, end=False)
    assert durations(first) == {a.id: 2000}
    second = settle([*first.pending, b], state, end=False)
    assert durations(second) == {b.id: 1000}
    assert second.pending == [c]
    d, e, f = sv(3000), sv(4000), sv(5000)
    third = settle([*second.pending, e, f], state, end=False)
    assert durations(third) == {c.id: 2000, e.id: 1000}
    fourth = settle([*third.pending, d], state, end=False)
    assert durations(fourth) == {d.id: 2000}, "exact would be 1000 (up to e)"


@pytest.mark.parametrize("final", ["end", "drain"])
def test_nothing_stays_pending_after_a_final_settle(final: str) -> None:
    a, b = sv(0), sv(10)
    state = state_of([a, b])
    settled = settle([b, a], state, end=final == "end", drain=final == "drain")
    assert settled.pending == []
    assert durations(settled)[a.id] == 10
    assert durations(settled)[b.id] == 0
