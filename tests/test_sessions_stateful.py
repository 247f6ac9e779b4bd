"""A Hypothesis state machine for sessions: pairing, idle ends and inheritance end to end.

The buffer runs with a ``MemorySink`` and the default in-memory session
store on trio behind an anyio blocking portal, with a ``MockClock`` that
moves only when a rule jumps it, exactly as in ``test_buffer_stateful.py``
(see its docstring for why autojump cannot be used in a portal).

What the model knows, and how
-----------------------------

Rules either *track* events (which never runs a SessionActor cycle: the
clock does not move) or *cycle* (flush, advance time, crash). Every rule is
one numbered *step*; after it the machine records, per event id:

* ``handed``: the first step after which ``stats().sessions_waiting`` was
  0, i.e. by which the SessionActor had handed the event to the store. All
  events handed in one step were handed together, at that step's first
  cycle (or its ``last_screen_view`` call);
* ``written``: the step after which it was first seen in the sink or the
  dead-letter file (a permanent sink failure dead-letters a batch).

From these the model defines a screen_view's duration exactly where the
contract does (see ``tests/test_sessions_logic.py``): a screen_view S with
no duration of its own, not late (handed no later than its session's end),
whose true successor T (the next screen_view or session_end of the session
in (created_at, first arrival) order) was handed by the step that wrote S
and not written before it, has ``T.created_at - S.created_at``.

Crashing the SessionActor
-------------------------

``test_buffer_stateful.py`` crashes the EventBuffer with a cast it cannot
unpack. That does not apply here: the SessionActor appends any tuple to an
arrival list *owned by the client* (so arrivals survive restarts), so a
poison tuple would be read again by ``terminate`` and by every restarted
instance: a crash loop, not one crash. Instead the store's ``claim`` is
made to raise a plain ``RuntimeError`` once (a bug in an injected store), at
a timer cycle. A crash must not write pending screen_views early (the
in-memory store outlives the crashed instance), so the model excuses nothing
at a crash step.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
import trio
import trio.testing
from hypothesis import strategies as st
from hypothesis.stateful import (
    initialize,
    invariant,
    precondition,
    rule,
)

from analytics_buffer import AnalyticsBuffer, Event, Settings
from analytics_buffer._deadletter import DeadLetters
from analytics_buffer._session_store import Claim, MemorySessionStore
from analytics_buffer._sessions import SCREEN_VIEW, SESSION_END, epoch_ms
from memory_sink import MemorySink
from virtual_time import VirtualTimeMachine, run_machine

TIMEOUT: Final = 10.0
INTERVAL: Final = 1.0
T0: Final = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SESSIONS: Final = {"s1": "u1", "s2": "u1", "s3": "u2"}
"""Session id -> profile id (two sessions share a profile, for last_screen_view)."""
at_ms = st.sampled_from([0, 1000, 2000, 5000]) | st.integers(0, 300).map(lambda t: t * 100)
"""Event times in a 30 s window, on a 100 ms grid, often on a few shared values:
ties (between screen_views, and with regular events) and disorder are common."""


@dataclass
class Copy:
    """One tracking of an event: every one counts as its session's activity."""

    at: float
    """Virtual time it was tracked."""
    handed: int | None = None


@dataclass
class Tracked:
    """One distinct event id the machine tracked."""

    event: Event
    index: int
    """Arrival position of its first copy (ties in created_at keep this order)."""
    copies: list[Copy]
    """Each time it was tracked."""
    handed: int | None = None
    written: int | None = None
    row: Event | None = None
    """What was written (or dead-lettered) for it."""

    @property
    def key(self) -> tuple[int, int]:
        return epoch_ms(self.event.created_at), self.index


class SessionsMachine(VirtualTimeMachine):
    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir)
        self.sink = MemorySink()
        self.store = MemorySessionStore()
        self.settings = Settings(
            data_dir=str(self.data_dir),
            session_timeout=TIMEOUT,
            session_interval=INTERVAL,
            flush_interval=5.0,
            retry_initial_backoff=0.01,
            retry_max_backoff=0.05,
            shutdown_timeout=30.0,
            max_restarts=1000,
            max_seconds=1.0,
        )
        self.letters = DeadLetters(self.data_dir / "dead-letter", self.settings.table)
        self.buffer: AnalyticsBuffer | None = None
        self.step = 0
        self.tracked: dict[uuid.UUID, Tracked] = {}
        self.track_count = 0
        self.made_ends: dict[str, list[tuple[int, Event]]] = {}
        """Session id -> session_end events the buffer made, with the step."""
        self.step_time: dict[int, float] = {}
        """Virtual time at the end of each step."""
        self.crashes = 0
        self.seen_rows = 0
        self.seen_letters = 0
        self.shut_down = False

    # -- plumbing --------------------------------------------------------------------

    def now(self) -> float:
        now: float = self.portal.call(trio.current_time)
        return now

    def the_buffer(self) -> AnalyticsBuffer:
        assert self.buffer is not None
        return self.buffer

    def begin(self) -> None:
        self.step += 1

    def observe(self) -> None:
        """Record what was handed and written during the step that just ended."""
        if not self.shut_down:
            self.step_time[self.step] = self.now()
        if self.buffer is not None and self.buffer.stats().sessions_waiting == 0:
            for waiting in self.tracked.values():
                if waiting.handed is None:
                    waiting.handed = self.step
                for copy in waiting.copies:
                    if copy.handed is None:
                        copy.handed = self.step
        fresh = list(self.sink.rows[self.seen_rows :])
        self.seen_rows = len(self.sink.rows)
        letters = self.letters.read()
        fresh += [letter.event for letter in letters[self.seen_letters :]]
        self.seen_letters = len(letters)
        for row in fresh:
            found = self.tracked.get(row.id)
            if found is None:
                assert row.name == SESSION_END, f"written but never tracked: {row}"
                self.made_ends.setdefault(row.session_id, []).append((self.step, row))
                continue
            assert found.written is None, f"written twice: {row}"
            found.written, found.row = self.step, row

    def offer(self, event: Event) -> None:
        item = self.tracked.get(event.id)
        now = self.now()
        if item is None:
            self.tracked[event.id] = Tracked(event, self.track_count, [Copy(now)])
        else:
            item.copies.append(Copy(now))
        self.track_count += 1
        self.run_sync(lambda: self._track(event))

    def _track(self, event: Event) -> None:
        assert self.the_buffer().track(event)

    def session_items(self, session: str) -> list[Tracked]:
        items = [i for i in self.tracked.values() if i.event.session_id == session]
        return sorted(items, key=lambda item: item.key)

    def end_step(self, session: str) -> int | None:
        """The step at which the session's first end (its own or a made one) was written."""
        steps = [
            i.written
            for i in self.session_items(session)
            if i.event.name == SESSION_END and i.written is not None
        ]
        steps += [step for step, _ in self.made_ends.get(session, [])]
        return min(steps, default=None)

    # -- start and stop --------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        buffer = AnalyticsBuffer(self.settings, sink=self.sink, session_store=self.store)
        self.buffer = buffer
        self.start_buffer(buffer)

    def teardown(self) -> None:
        try:
            if self.buffer_running:
                self.begin()
                self.stop_buffer()
                self.shut_down = True
                self.observe()
                self.check_final()
        finally:
            self.close()

    # -- rules: tracking -------------------------------------------------------------

    @rule(
        session=st.sampled_from(sorted(SESSIONS)),
        at=at_ms,
        measured=st.sampled_from([0] * 5 + [700]),
    )
    def track_screen_view(self, session: str, at: int, measured: int) -> None:
        self.begin()
        self.offer(
            Event(
                name=SCREEN_VIEW,
                project_id="p1",
                profile_id=SESSIONS[session],
                session_id=session,
                created_at=T0 + timedelta(milliseconds=at),
                path=f"/{session}/{at}",
                origin=f"https://{session}.example",
                duration=measured,
            )
        )
        self.observe()

    @rule(session=st.sampled_from(sorted(SESSIONS)), at=at_ms, own_path=st.booleans())
    def track_regular(self, session: str, at: int, own_path: bool) -> None:
        self.begin()
        self.offer(
            Event(
                name="click",
                project_id="p1",
                profile_id=SESSIONS[session],
                session_id=session,
                created_at=T0 + timedelta(milliseconds=at),
                path="/own" if own_path else "",
            )
        )
        self.observe()

    @rule(session=st.sampled_from(sorted(SESSIONS)), at=at_ms)
    def track_session_end(self, session: str, at: int) -> None:
        self.begin()
        self.offer(
            Event(
                name=SESSION_END,
                project_id="p1",
                profile_id=SESSIONS[session],
                session_id=session,
                created_at=T0 + timedelta(milliseconds=at),
            )
        )
        self.observe()

    @rule(session=st.sampled_from(sorted(SESSIONS)), at=at_ms)
    def track_without_session(self, session: str, at: int) -> None:
        # Same profile, no session_id: the EventBuffer's, untouched by sessions.
        self.begin()
        self.offer(
            Event(
                name=SCREEN_VIEW,
                project_id="p1",
                profile_id=SESSIONS[session],
                created_at=T0 + timedelta(milliseconds=at),
            )
        )
        self.observe()

    @precondition(lambda self: any(i.event.session_id for i in self.tracked.values()))
    @rule(pick=st.integers(0, 10_000))
    def track_again(self, pick: int) -> None:
        self.begin()
        candidates = [
            i.event
            for i in self.tracked.values()
            if i.event.session_id and i.event.name in (SCREEN_VIEW, SESSION_END)
        ]
        if candidates:
            self.offer(candidates[pick % len(candidates)])
        self.observe()

    # -- rules: time and cycles ------------------------------------------------------

    @rule()
    def flush(self) -> None:
        self.begin()
        buffer = self.the_buffer()
        self.run_until_done(buffer.flush, "flush")
        self.observe()
        stats = buffer.stats()
        assert stats.sessions_waiting == 0
        assert stats.buffered == 0
        # Nothing of an ended session is pending; of an open one, its last screen_view at most.
        for session in SESSIONS:
            waiting = [
                i
                for i in self.session_items(session)
                if i.written is None and i.event.name in (SCREEN_VIEW, SESSION_END)
            ]
            if self.end_step(session) is not None:
                assert waiting == [], f"{session} ended with events pending"
            assert len(waiting) <= 1, f"{session}: {len(waiting)} pending"
            for item in waiting:
                assert item.event.name == SCREEN_VIEW
                assert item.event.duration == 0

    @rule(fraction=st.floats(0.0, 1.0))
    def advance_time(self, fraction: float) -> None:
        self.begin()
        self.run(lambda: self.advance_by(fraction * INTERVAL))
        self.observe()

    @rule(extra=st.floats(0.0, 2 * INTERVAL))
    def advance_past_timeout(self, extra: float) -> None:
        self.begin()
        self.run(lambda: self.advance_by(TIMEOUT + extra))
        self.observe()

    @rule(profile=st.sampled_from(sorted(set(SESSIONS.values()))))
    def query_last_screen_view(self, profile: str) -> None:
        self.begin()
        got: list[Event | None] = []

        async def query() -> None:
            got.append(await self.the_buffer().last_screen_view("p1", profile))

        self.run(query)
        self.observe()
        views = [
            i
            for i in self.tracked.values()
            if i.event.name == SCREEN_VIEW and i.event.session_id and i.event.profile_id == profile
        ]
        if not views:
            assert got == [None]
            return
        newest = max(epoch_ms(i.event.created_at) for i in views)
        (answer,) = got
        assert answer is not None
        assert answer.id in {i.event.id for i in views if epoch_ms(i.event.created_at) == newest}

    @precondition(lambda self: self.crashes < 3)
    @rule()
    def crash_session_actor(self) -> None:
        self.begin()
        restarts = self.the_buffer().stats().restarts
        real_claim = self.store.claim
        armed = [True]

        async def claim(
            owner: str, now: float, *, timeout: float, lease: float, limit: int
        ) -> list[Claim]:
            if armed[0]:
                armed[0] = False
                raise RuntimeError("store bug")
            return await real_claim(owner, now, timeout=timeout, lease=lease, limit=limit)

        # Every task is blocked between portal calls: patching from here is safe.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(self.store, "claim", claim)
            self.run(lambda: self.advance_by(INTERVAL))  # the next timer cycle crashes
        self.crashes += 1
        self.observe()
        assert not armed[0]
        assert self.the_buffer().stats().restarts == restarts + 1

    @precondition(lambda self: self.sink.fail_permanent == 0)
    @rule()
    def fail_next_insert(self) -> None:
        self.begin()
        self.sink.fail_permanent += 1
        self.observe()

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def buffer_is_running(self) -> None:
        if self._lifetime is not None and self._lifetime.done() and not self.shut_down:
            self._lifetime.result()
            raise AssertionError("the buffer stopped by itself")

    @invariant()
    def a_session_ends_once_and_not_too_early(self) -> None:
        if self.buffer is None:
            return
        ended = 0
        now = self.now()
        for session in SESSIONS:
            made = self.made_ends.get(session, [])
            assert len(made) <= 1, f"{session} ended by idleness {len(made)} times"
            items = self.session_items(session)
            end = self.end_step(session)
            if end is not None:
                ended += 1
            for step, closing in made:
                handed = [i for i in items if i.handed is not None and i.handed <= step]
                assert handed, "a session with no event was ended"
                assert not [
                    i
                    for i in items
                    if i.event.name == SESSION_END and i.written is not None and i.written <= step
                ], "a session ended by its own session_end was ended again by idleness"
                # Not before session_timeout without events ...
                quiet_since = max(
                    c.at
                    for i in items
                    for c in i.copies
                    if c.handed is not None and c.handed <= step
                )
                assert self.step_time[step] >= quiet_since + TIMEOUT, "ended too early"
                # ... and at the last activity.
                last = max(epoch_ms(i.event.created_at) for i in handed)
                first = min(epoch_ms(i.event.created_at) for i in handed)
                assert epoch_ms(closing.created_at) == last
                assert closing.duration == last - first
                views = [
                    i
                    for i in items
                    if i.event.name == SCREEN_VIEW and i.written is not None and i.written <= step
                ]
                assert closing.properties == {"duration": last - first, "screen_views": len(views)}
            if not made and end is None and items and all(i.handed is not None for i in items):
                quiet_since = max(c.at for i in items for c in i.copies)
                assert now < quiet_since + TIMEOUT + 3 * INTERVAL, f"{session} was never ended"
        stats = self.buffer.stats()
        assert stats.sessions_ended == ended
        views = [
            i
            for i in self.tracked.values()
            if i.written is not None and i.event.name == SCREEN_VIEW and i.event.session_id
        ]
        assert stats.session_screen_views == len(views)

    @invariant()
    def written_events_follow_the_model(self) -> None:
        for session in SESSIONS:
            self.check_session(session)

    def check_session(self, session: str) -> None:
        items = self.session_items(session)
        end = self.end_step(session)
        made = self.made_ends.get(session, [])
        boundaries = [i for i in items if i.event.name in (SCREEN_VIEW, SESSION_END)]
        for item in items:
            row, event = item.row, item.event
            if row is None:
                continue
            assert row.duration >= 0
            if event.name != SCREEN_VIEW:
                if event.name == SESSION_END:
                    assert row == event, "a session_end of the sender is written as it is"
                else:
                    self.check_inheritance(item, items)
                continue
            assert item.written is not None
            assert item.handed is not None
            assert item.handed <= item.written
            late = end is not None and item.handed > end
            after_an_end = any(
                e.event.name == SESSION_END
                and e.key < item.key
                and e.handed is not None
                and e.handed <= item.written
                for e in items
            )
            if late or after_an_end or event.duration:
                assert row == event, "written as it is"
                continue
            # Only the duration is filled in.
            assert row.path == event.path
            assert row.created_at == event.created_at
            later = boundaries[boundaries.index(item) + 1 :]
            own = epoch_ms(event.created_at)
            if later:
                successor = later[0]
                if (
                    successor.handed is not None
                    and successor.handed <= item.written
                    and (successor.written is None or successor.written >= item.written)
                ):
                    expected = epoch_ms(successor.event.created_at) - own
                    assert row.duration == expected, (
                        f"{session}: {row.path} paired with {successor.event.path}"
                    )
                    continue
            # Written without its successor: only by an end or a shutdown.
            successor_handed = any(b.handed is not None and b.handed <= item.written for b in later)
            ended_by_then = end is not None and end <= item.written
            drained = self.shut_down and item.written == self.step
            assert successor_handed or ended_by_then or drained, (
                f"{session}: {row.path} written before its successor arrived"
            )
            if ended_by_then and made and made[0][0] == item.written and not successor_handed:
                assert row.duration == epoch_ms(made[0][1].created_at) - own

    def check_inheritance(self, item: Tracked, items: list[Tracked]) -> None:
        row, event = item.row, item.event
        assert row is not None
        if event.path or event.origin:
            assert row == event
            return
        assert item.handed is not None
        candidates = [
            i
            for i in items
            if i.event.name == SCREEN_VIEW
            and i.handed is not None
            and i.handed <= item.handed
            and i.event.created_at < event.created_at
        ]
        if not candidates:
            assert row == event
            return
        newest = max(epoch_ms(i.event.created_at) for i in candidates)
        allowed = [i.event for i in candidates if epoch_ms(i.event.created_at) == newest]
        source = [sv for sv in allowed if str(sv.id) == row.properties.get("__inherit_from")]
        assert source, f"inherited from {row.properties.get('__inherit_from')}, not the newest"
        assert (row.path, row.origin) == (source[0].path, source[0].origin)

    def check_final(self) -> None:
        """After the shutdown: every tracked id is written or dead-lettered exactly once."""
        missing = [i.event for i in self.tracked.values() if i.written is None]
        assert not missing, f"{len(missing)} events neither written nor dead-lettered"
        for item in self.tracked.values():
            if not item.event.session_id:
                assert item.row == item.event, "an event without a session is left alone"
        self.written_events_follow_the_model()
        stats = self.the_buffer().stats()
        made = sum(len(ends) for ends in self.made_ends.values())
        assert stats.written + stats.dead_lettered == len(self.tracked) + made
        assert stats.buffered == 0
        assert stats.accepted == self.track_count


def test_sessions_state_machine(tmp_path: Path) -> None:
    run_machine(SessionsMachine, tmp_path, steps=50)
