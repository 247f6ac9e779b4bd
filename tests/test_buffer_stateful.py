"""A Hypothesis state machine driving an AnalyticsBuffer on trio with a virtual clock.

How the async buffer is driven from synchronous rules
-----------------------------------------------------

Hypothesis rules cannot be async, so the buffer runs in a trio event loop in
another thread, behind an anyio blocking portal
(``start_blocking_portal("trio", backend_options={"clock": clock})``; anyio
passes ``clock`` through to ``trio.run``). Each rule is one ``portal.call``.

The clock is ``MockClock()`` with its defaults: ``rate=0`` and **no
autojump**, so virtual time moves only when a rule calls ``clock.jump``.
``MockClock(autojump_threshold=0)`` does *not* work in a portal: between two
portal calls the trio loop is idle while Hypothesis computes the next step,
so autojump races through every timer in the meantime (measured: 0.2 s of
real idle time advanced the clock by 6,600 virtual seconds), and a rule could
no longer say how much time passes.

After every action a rule *settles*: ``wait_all_tasks_blocked()`` (it never
moves the clock), repeated until no worker thread is running (dead letters
are appended from a worker thread, during which trio sees every task as
blocked; ``trio.to_thread.current_default_thread_limiter().borrowed_tokens``
tells). Rules that must wait for the buffer (``flush``, the final shutdown)
jump the clock from one pending deadline to the next, settling in between,
until what they wait for is done: a step-by-step autojump that runs only
inside the rule.

Crashing the EventBuffer
------------------------

The core has no hook to crash an actor. A legitimate stand-in: the
EventBuffer unpacks every tuple it is cast as ``(event, size)``, so casting
a 3-tuple through ``supervisor.ref("event_buffer")`` makes ``handle_casts``
raise, as a bug in it would. (An unknown non-tuple cast is only logged and
dropped.) The Writer is crashed through ``MemorySink.crash_next``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    initialize,
    invariant,
    precondition,
    rule,
)
from trio.testing import MockClock, wait_all_tasks_blocked

from analytics_buffer import (
    AnalyticsBuffer,
    BufferFull,
    DeadLetter,
    Event,
    InvalidEvent,
    Settings,
)
from analytics_buffer._deadletter import DeadLetters
from analytics_buffer._segments import decode_payload, scan
from memory_sink import MemorySink
from virtual_time import VirtualTimeMachine, run_machine

POISON: Final = (None, None, None)
"""A cast the EventBuffer cannot unpack as ``(event, size)``: its handler raises."""

MAX_BUFFERED_EVENTS: Final = 100

trio_mock = pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-mock")],
)


def _invalid_events() -> Iterator[tuple[dict[str, Any], str]]:
    yield {"name": ""}, "name"
    yield {"project_id": 7}, "project_id"
    yield {"duration": -1}, "duration"
    yield {"properties": {"k": None}}, "properties.k"
    yield {"properties": {"k": math.nan}}, "properties.k"
    yield {"path": None}, "path"


INVALID: Final = list(_invalid_events())

machine_settings = st.fixed_dictionaries(
    {
        "max_batch_events": st.integers(5, 50),
        "flush_interval": st.sampled_from([0.5, 1.0, 5.0]),
        "insert_chunk_rows": st.sampled_from([2, 7, 2000]),
        "retry_attempts": st.integers(2, 4),
        "overflow": st.sampled_from(["drop_newest", "raise", "block"]),
        "tight_bytes": st.booleans(),
    }
)


class BufferMachine(VirtualTimeMachine):
    """Model: the ids accepted, and how many events were dropped or rejected."""

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir)
        self.sink = MemorySink()
        self.buffer: AnalyticsBuffer | None = None
        self.settings: Settings | None = None
        self.dead_letter_file: DeadLetters | None = None
        self.accepted: list[Any] = []
        self.accepted_set: set[Any] = set()
        self.dropped = 0
        self.refused = 0
        self.rejected = 0
        self.buffer_crashes = 0
        self.writer_crashes = 0
        self.permanent_failures = 0
        self.serial = 0

    # -- plumbing ------------------------------------------------------------------

    def new_event(self) -> Event:
        self.serial += 1
        return Event(name=f"e{self.serial}", project_id="p1", properties={"n": self.serial})

    def the_buffer(self) -> AnalyticsBuffer:
        assert self.buffer is not None
        return self.buffer

    def dead_letters(self) -> list[DeadLetter]:
        assert self.dead_letter_file is not None
        return self.dead_letter_file.read()

    def offer(self, event: Event) -> None:
        """``track`` one valid event and record the outcome in the model."""
        buffer = self.the_buffer()
        try:
            accepted = buffer.track(event)
        except BufferFull:
            assert buffer.settings.overflow in ("raise", "block")
            self.refused += 1
            return
        if accepted:
            self.accepted.append(event.id)
            self.accepted_set.add(event.id)
        else:
            assert buffer.settings.overflow == "drop_newest"
            self.dropped += 1

    # -- start and stop ------------------------------------------------------------

    @initialize(params=machine_settings)
    def start(self, params: dict[str, Any]) -> None:
        params = dict(params)
        tight_bytes = params.pop("tight_bytes")
        self.settings = Settings(
            data_dir=str(self.data_dir),
            max_buffered_events=MAX_BUFFERED_EVENTS,
            max_buffered_bytes=60 * 200 if tight_bytes else 1024 * 1024,
            max_event_bytes=4096,
            retry_initial_backoff=0.01,
            retry_max_backoff=0.05,
            shutdown_timeout=30.0,
            max_restarts=1000,
            max_seconds=1.0,
            **params,
        )
        self.dead_letter_file = DeadLetters(self.data_dir / "dead-letter", self.settings.table)
        buffer = AnalyticsBuffer(self.settings, sink=self.sink)
        self.buffer = buffer
        self.start_buffer(buffer)

    def teardown(self) -> None:
        try:
            if self.buffer_running:
                self.stop_buffer()
                self.check_all_accounted_for()
                assert self.sink.closed == 1
        finally:
            self.close()

    def replay_outbox(self) -> None:
        """Replay what went to the outbox, waiting out transient failures."""
        buffer = self.buffer
        assert buffer is not None

        self.run_until_done(buffer.replay_outbox, "outbox replay")

    # -- rules ---------------------------------------------------------------------

    @rule(count=st.integers(1, 60))
    def track_valid(self, count: int) -> None:
        events = [self.new_event() for _ in range(count)]

        def track_all() -> None:
            for event in events:
                self.offer(event)

        self.run_sync(track_all)

    @rule(case=st.sampled_from(INVALID))
    def track_invalid(self, case: tuple[dict[str, Any], str]) -> None:
        changes, field = case
        fields: dict[str, Any] = {"name": "bad", "project_id": "p1", **changes}
        event = Event(**fields)

        def track() -> None:
            with pytest.raises(InvalidEvent) as info:
                self.the_buffer().track(event)
            assert info.value.field == field

        self.run_sync(track)
        self.rejected += 1

    @rule()
    def track_json(self) -> None:
        event = self.new_event()

        def track() -> None:
            buffer = self.the_buffer()
            raw = f'{{"name": "j", "project_id": "p1", "id": "{event.id}"}}'
            try:
                accepted = buffer.track_json(raw)
            except BufferFull:
                self.refused += 1
                return
            if accepted:
                self.accepted.append(event.id)
                self.accepted_set.add(event.id)
            else:
                self.dropped += 1

        self.run_sync(track)

    @rule()
    def flush(self) -> None:
        before = list(self.accepted)
        buffer = self.the_buffer()
        self.run_until_done(buffer.flush, "flush")
        assert buffer.stats().buffered == 0
        self.check_all_accounted_for(before)

    @rule()
    def flush_async(self) -> None:
        self.run_sync(self.the_buffer().flush_async)

    @rule(fraction=st.floats(0.0, 1.0))
    def advance_time(self, fraction: float) -> None:
        assert self.settings is not None
        seconds = fraction * self.settings.flush_interval

        async def advance() -> None:
            await self.advance_by(seconds)

        self.run(advance)

    @rule(attempts=st.integers(1, 6))
    def fail_transiently(self, attempts: int) -> None:
        # Below retry_attempts the retries succeed; at or above, a chunk is dead-lettered.
        self.sink.fail_transient += attempts

    @rule()
    def fail_permanently(self) -> None:
        self.sink.fail_permanent += 1
        self.permanent_failures += 1

    @precondition(lambda self: self.writer_crashes < 5)
    @rule()
    def crash_writer(self) -> None:
        self.sink.crash_next += 1
        self.writer_crashes += 1

    @precondition(lambda self: self.buffer_crashes < 10)
    @rule(track_after=st.integers(0, 3))
    def crash_event_buffer(self, track_after: int) -> None:
        # Events tracked right after the poison land in the same run of casts.
        events = [self.new_event() for _ in range(track_after)]

        def crash() -> None:
            buffer = self.the_buffer()
            assert buffer._supervisor is not None
            buffer._supervisor.ref("event_buffer").cast(POISON)
            for event in events:
                self.offer(event)

        self.run_sync(crash)
        self.buffer_crashes += 1

    # -- invariants ----------------------------------------------------------------

    def check_all_accounted_for(self, accepted: list[Any] | None = None) -> None:
        """Every accepted event is in the sink or dead-lettered, exactly once overall."""
        accepted = self.accepted if accepted is None else accepted
        seen = [event.id for event in self.sink.rows]
        seen += [letter.event.id for letter in self.dead_letters()]
        # Spilled by the shutdown after the last replay: waiting for the next start.
        seen += [event.id for event in outbox_events(self.data_dir / "outbox")]
        counts: dict[Any, int] = {}
        for event_id in seen:
            counts[event_id] = counts.get(event_id, 0) + 1
        missing = [event_id for event_id in accepted if event_id not in counts]
        twice = [event_id for event_id, count in counts.items() if count > 1]
        assert not missing, f"{len(missing)} accepted events are neither written nor dead-lettered"
        assert not twice, f"{len(twice)} events are stored more than once"

    @invariant()
    def buffer_is_running(self) -> None:
        if self._lifetime is not None and self._lifetime.done():
            self._lifetime.result()
            raise AssertionError("the buffer stopped by itself")

    @invariant()
    def counts_add_up(self) -> None:
        if self.buffer is None:
            return
        stats = self.buffer.stats()
        assert stats.accepted == len(self.accepted)
        assert stats.dropped == self.dropped
        assert stats.rejected == self.rejected
        assert 0 <= stats.buffered <= self.buffer.settings.max_buffered_events
        assert 0 <= stats.buffered_bytes <= self.buffer.settings.max_buffered_bytes
        in_outbox = stats.outbox_spilled - stats.outbox_replayed
        assert in_outbox >= 0
        assert stats.accepted == (
            stats.written + stats.dead_lettered + stats.buffered + in_outbox
        ), stats
        assert stats.written == len(self.sink.rows)
        assert self.buffer_crashes <= stats.restarts
        assert stats.restarts <= self.buffer_crashes + self.writer_crashes

    @invariant()
    def stored_once_and_only_what_was_accepted(self) -> None:
        if self.buffer is None:
            return
        rows = [event.id for event in self.sink.rows]
        assert len(rows) == len(set(rows)), "an event was written twice"
        assert set(rows) <= self.accepted_set, "the sink holds an event never accepted"
        letters = self.dead_letters()
        dead = [letter.event.id for letter in letters]
        assert len(dead) == len(set(dead)), "an event was dead-lettered twice"
        assert set(dead) <= self.accepted_set
        assert set(dead).isdisjoint(rows), "an event was both written and dead-lettered"
        assert self.buffer.stats().dead_lettered == len(letters)
        for letter in letters:
            assert (letter.code == 16 and "Code: 16" in letter.reason) or (
                letter.code == 0
                and letter.reason.startswith(("retries exhausted", "writer crashed"))
            ), letter
        assert len({letter.token for letter in letters if letter.code == 16}) <= (
            self.permanent_failures
        )


def outbox_events(directory: Path) -> list[Event]:
    """The events in an outbox's sealed segments."""
    found: list[Event] = []
    for path in sorted(directory.glob("*.seg")):
        scanned = scan(path.read_bytes())
        assert not scanned.bad, path
        assert scanned.tail is None, path
        found += [decode_payload(payload) for _, payload in scanned.frames]
    return found


def test_buffer_state_machine(tmp_path: Path) -> None:
    run_machine(BufferMachine, tmp_path, steps=40)


@pytest.mark.anyio
@trio_mock
async def test_a_crash_in_the_middle_of_a_run_of_casts_loses_no_event(tmp_path: Path) -> None:
    # Fixed bug (_buffer.py handle_casts): when handling one cast raises, the
    # casts after it in the same run are neither handled nor carried over
    # (_serve counts the whole run as delivered), so they are lost: accepted,
    # never written nor dead-lettered, and their room in the buffer never freed.
    sink = MemorySink()
    events = [Event(name=f"e{i}", project_id="p1") for i in range(3)]
    async with AnalyticsBuffer(Settings(data_dir=str(tmp_path)), sink=sink) as buffer:
        assert buffer._supervisor is not None
        buffer._supervisor.ref("event_buffer").cast(POISON)
        for event in events:
            assert buffer.track(event)
        await buffer.flush()
        stats = buffer.stats()
        assert stats.restarts == 1
        assert [event.id for event in sink.rows] == [event.id for event in events]
        assert stats.buffered == 0


@pytest.mark.anyio
@trio_mock
async def test_a_crash_between_runs_keeps_what_the_buffer_held(tmp_path: Path) -> None:
    sink = MemorySink()
    events = [Event(name=f"e{i}", project_id="p1") for i in range(3)]
    async with AnalyticsBuffer(Settings(data_dir=str(tmp_path)), sink=sink) as buffer:
        for event in events:
            assert buffer.track(event)
        await wait_all_tasks_blocked()
        assert buffer._supervisor is not None
        buffer._supervisor.ref("event_buffer").cast(POISON)
        await wait_all_tasks_blocked()
        assert buffer.stats().restarts == 1
        assert [event.id for event in sink.rows] == [event.id for event in events]
        late = Event(name="late", project_id="p1")
        assert buffer.track(late)
        await buffer.flush()
    assert [event.id for event in sink.rows] == [event.id for event in [*events, late]]
    assert buffer.stats().buffered == 0


class CrashOnInsertSink(MemorySink):
    """A MemorySink whose insert number ``crash_on`` (1-based) raises ``RuntimeError``.

    ``crash_next`` crashes the very next insert, which cannot aim past a retry.
    """

    def __init__(self, crash_on: int) -> None:
        super().__init__()
        self.crash_on = crash_on

    async def insert(self, events: Sequence[Event], token: str) -> None:
        if self.inserts + 1 == self.crash_on:
            self.inserts += 1
            raise RuntimeError("adapter bug")
        await super().insert(events, token)


@pytest.mark.anyio
@trio_mock
async def test_a_writer_crash_keeps_the_messages_queued_behind_the_crashing_one(
    tmp_path: Path,
) -> None:
    # Fixed bug (_writer.py Writer.handle_casts): the Writer drains its mailbox in
    # bulk; when one message crashes it, the messages after it in the same run
    # are neither handled nor carried over to the restarted Writer. Batches are
    # lost (accepted, never written nor dead-lettered, their room never freed)
    # and a flush() whose reply rode behind the crash never returns.
    #
    # To queue the messages deterministically, the Writer is kept busy in a
    # retry backoff (batch A fails once) while batch B, batch C and the flush's
    # reply queue behind it; it then drains all three in one run, and B's
    # insert (the third) crashes it.
    settings = Settings(
        data_dir=str(tmp_path),
        max_batch_events=2,
        retry_initial_backoff=1.0,
        retry_max_backoff=1.0,
    )
    sink = CrashOnInsertSink(crash_on=3)
    sink.fail_transient = 1
    events = [Event(name=f"e{i}", project_id="p1") for i in range(6)]
    async with AnalyticsBuffer(settings, sink=sink) as buffer:
        for event in events[:2]:
            assert buffer.track(event)  # batch A: fails once, the Writer sleeps 1-2 s
        await wait_all_tasks_blocked()
        assert (sink.inserts, sink.rows) == (1, [])
        for event in events[2:]:
            assert buffer.track(event)  # batches B and C
        await wait_all_tasks_blocked()
        assert sink.inserts == 1  # B and C wait in the Writer's mailbox
        with anyio.fail_after(3600):  # virtual seconds: a hang fails instead of hanging
            await buffer.flush()
        stats = buffer.stats()
        assert stats.restarts == 1
        letters = DeadLetters(tmp_path / "dead-letter", settings.table).read()
        assert [letter.event.id for letter in letters] == [event.id for event in events[2:4]]
        assert all(letter.reason.startswith("writer crashed") for letter in letters)
        assert [event.id for event in sink.rows] == [e.id for e in events[:2] + events[4:]]
        assert stats.buffered == 0


@pytest.mark.anyio
@trio_mock
async def test_a_writer_crash_during_shutdown_still_writes_the_final_flush(
    tmp_path: Path,
) -> None:
    # Fixed bug (_supervisor.py Supervisor._supervise): a child that crashes
    # while it is being stopped is not restarted (``not child.stopping``), so
    # what is still queued in its mailbox, here the EventBuffer's final flush
    # (queued ahead of the stop request), is dropped by _release_mailboxes
    # ("writer stopped with 1 unhandled messages"): accepted, never written
    # nor dead-lettered.
    settings = Settings(
        data_dir=str(tmp_path),
        max_batch_events=5,
        retry_initial_backoff=1.0,
        retry_max_backoff=1.0,
    )
    sink = MemorySink()
    sink.fail_transient = 1
    events = [Event(name=f"e{i}", project_id="p1") for i in range(6)]
    async with AnalyticsBuffer(settings, sink=sink) as buffer:
        for event in events:
            assert buffer.track(event)  # five go at once and fail once; the sixth waits
        await wait_all_tasks_blocked()
        assert sink.inserts == 1
        sink.crash_next = 1  # the retry, due during the shutdown, crashes the Writer
    stats = buffer.stats()
    letters = DeadLetters(tmp_path / "dead-letter", settings.table).read()
    assert [letter.event.id for letter in letters] == [event.id for event in events[:5]]
    assert [event.id for event in sink.rows] == [events[5].id]
    assert (stats.written, stats.dead_lettered, stats.buffered) == (1, 5, 0)
