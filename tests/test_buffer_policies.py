"""The buffer's policies, on trio with a virtual clock and an in-memory sink.

Overflow (``drop_newest``, ``raise``, ``block`` with ``put``), the flush
triggers (explicit, timer, event and byte thresholds, shutdown) and their
exact virtual times, and what the Writer does with sink failures (retry,
dead-letter with the server's code). ``MockClock(autojump_threshold=0)``
jumps to the next deadline whenever every task is blocked, so a test that
sleeps ``5`` virtual seconds returns at once, and times can be compared
exactly. ``wait_all_tasks_blocked`` lets the actors settle without moving
the clock (it takes priority over the autojump).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from analytics_buffer import (
    ActorDeadError,
    AnalyticsBuffer,
    BufferClosed,
    BufferFull,
    ConfigError,
    DeadLetter,
    Event,
    FlushReport,
    Settings,
    Stats,
)
from analytics_buffer._capacity import Capacity
from analytics_buffer._deadletter import DeadLetters
from analytics_buffer._event import check_event
from analytics_buffer._stats import Counters
from analytics_buffer._writer import Writer
from memory_sink import MemorySink

trio_mock = pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-mock")],
)

CREATED_AT = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
EPS = 1e-9


def events(count: int, prefix: str = "e") -> list[Event]:
    return [
        Event(name=f"{prefix}{i}", project_id="p1", created_at=CREATED_AT) for i in range(count)
    ]


def make_settings(tmp_path: Path, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": str(tmp_path),
        "flush_interval": 5.0,
        "max_batch_events": 100,
        "max_buffered_events": 1000,
        "retry_attempts": 4,
        "retry_initial_backoff": 0.1,
        "retry_max_backoff": 1.0,
        "put_timeout": 30.0,
        "shutdown_timeout": 10.0,
        **changes,
    }
    return Settings(**values)


def dead_letters(settings: Settings) -> list[DeadLetter]:
    return DeadLetters(Path(settings.data_dir) / "dead-letter", settings.table).read()


class Flushes:
    """An ``on_flush`` hook that records each report with the virtual time it came."""

    def __init__(self) -> None:
        self.reports: list[FlushReport] = []
        self.times: list[float] = []

    def __call__(self, report: FlushReport) -> None:
        self.reports.append(report)
        self.times.append(trio.current_time())

    def sizes(self) -> list[int]:
        return [report.written + report.dead_lettered for report in self.reports]

    def offsets(self, start: float) -> list[float]:
        return [time - start for time in self.times]


async def sleep_until(deadline: float) -> None:
    await trio.sleep_until(deadline)
    await wait_all_tasks_blocked()


def ids(items: list[Event]) -> list[Any]:
    return [event.id for event in items]


# -- overflow: drop_newest -----------------------------------------------------------


@pytest.mark.anyio
@trio_mock
async def test_drop_newest_returns_false_counts_dropped_and_loses_nothing_accepted(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, max_buffered_events=5, max_batch_events=5)
    sink = MemorySink()
    batch = events(8)
    async with AnalyticsBuffer(settings, sink=sink) as buffer:
        outcomes = [buffer.track(event) for event in batch]
        assert outcomes == [True] * 5 + [False] * 3
        stats = buffer.stats()
        assert (stats.accepted, stats.dropped, stats.buffered) == (5, 3, 5)
        await buffer.flush()
        assert ids(sink.rows) == ids(batch[:5])
        # Room again once written.
        late = events(1, "late")[0]
        assert buffer.track(late) is True
    stats = buffer.stats()
    assert (stats.accepted, stats.dropped, stats.written, stats.buffered) == (6, 3, 6, 0)
    assert ids(sink.rows) == ids([*batch[:5], late])
    assert stats.accepted + stats.dropped == len(batch) + 1


@pytest.mark.anyio
@trio_mock
async def test_the_byte_bound_also_drops(tmp_path: Path) -> None:
    sample = events(1)[0]
    size = check_event(sample, 600)[1]
    settings = make_settings(tmp_path, max_event_bytes=600, max_buffered_bytes=3 * size + size // 2)
    sink = MemorySink()
    async with AnalyticsBuffer(settings, sink=sink) as buffer:
        assert [buffer.track(event) for event in events(5)] == [True, True, True, False, False]
        stats = buffer.stats()
        assert (stats.buffered, stats.buffered_bytes, stats.dropped) == (3, 3 * size, 2)
        assert stats.buffered_bytes <= settings.max_buffered_bytes


# -- overflow: raise -----------------------------------------------------------------


@pytest.mark.anyio
@trio_mock
async def test_raise_policy_raises_buffer_full_saying_so(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_buffered_events=5, max_batch_events=5, overflow="raise")
    sink = MemorySink()
    batch = events(7)
    async with AnalyticsBuffer(settings, sink=sink) as buffer:
        for event in batch[:5]:
            assert buffer.track(event) is True
        for event in batch[5:]:
            with pytest.raises(BufferFull, match=r"buffer full \(5 events .*overflow='raise'"):
                buffer.track(event)
        stats = buffer.stats()
        assert (stats.accepted, stats.dropped, stats.buffered) == (5, 0, 5)
        await buffer.flush()
        assert buffer.track(batch[5]) is True
    assert ids(sink.rows) == ids(batch[:6])
    assert buffer.stats().written == 6


# -- overflow: block and put ---------------------------------------------------------


@pytest.mark.anyio
@trio_mock
async def test_block_policy_track_raises_telling_to_use_put(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_buffered_events=5, max_batch_events=5, overflow="block")
    async with AnalyticsBuffer(settings, sink=MemorySink()) as buffer:
        for event in events(5):
            assert buffer.track(event) is True
        with pytest.raises(BufferFull, match=r"use 'await put\(event\)'"):
            buffer.track(events(1, "x")[0])
        assert buffer.stats().dropped == 0


@pytest.mark.anyio
@trio_mock
async def test_put_waits_for_room_and_succeeds_once_the_writer_drains(tmp_path: Path) -> None:
    # Full by bytes, far below the batch thresholds: only the timer flush makes room.
    batch = events(5)
    size = check_event(batch[0], 600)[1]
    settings = make_settings(
        tmp_path,
        overflow="block",
        max_event_bytes=600,
        max_buffered_bytes=4 * size + size // 2,
        put_timeout=30.0,
    )
    sink = MemorySink()
    flushes = Flushes()
    async with AnalyticsBuffer(settings, sink=sink, on_flush=flushes) as buffer:
        start = trio.current_time()
        for event in batch[:4]:
            assert buffer.track(event) is True
        with pytest.raises(BufferFull):
            buffer.track(batch[4])
        await buffer.put(batch[4])
        assert trio.current_time() - start == pytest.approx(5.0, abs=EPS)
        assert ids(sink.rows) == ids(batch[:4])
        assert buffer.stats().accepted == 5
        await buffer.flush()
        assert ids(sink.rows) == ids(batch)
    assert flushes.sizes() == [4, 1]


@pytest.mark.anyio
@trio_mock
async def test_put_with_room_returns_at_once(tmp_path: Path) -> None:
    sink = MemorySink()
    async with AnalyticsBuffer(make_settings(tmp_path, overflow="block"), sink=sink) as buffer:
        start = trio.current_time()
        for event in events(3):
            await buffer.put(event)
        assert trio.current_time() == start
        assert buffer.stats().accepted == 3
    assert len(sink.rows) == 3


@pytest.mark.anyio
@trio_mock
async def test_a_mailbox_refusal_takes_no_room_and_counts_nothing_accepted(
    tmp_path: Path,
) -> None:
    def full(message: object) -> bool:
        return False

    def closed(message: object) -> bool:
        raise ActorDeadError("the actor's mailbox is closed")

    sink = MemorySink()
    settings = make_settings(tmp_path, overflow="drop_newest")
    async with AnalyticsBuffer(settings, sink=sink) as buffer:
        offer = buffer._offer_to_buffer
        first, second, third = events(3)
        buffer._offer_to_buffer = full
        assert buffer.track(first) is False  # a full mailbox: the overflow policy
        buffer._offer_to_buffer = closed
        with pytest.raises(ActorDeadError):
            buffer.track(second)
        stats = buffer.stats()
        assert (stats.accepted, stats.dropped, stats.buffered, stats.buffered_bytes) == (0, 1, 0, 0)
        buffer._offer_to_buffer = offer
        assert buffer.track(third) is True
    assert [event.name for event in sink.rows] == ["e2"]


@pytest.mark.anyio
@trio_mock
async def test_put_raises_buffer_full_after_put_timeout_when_the_sink_is_stuck(
    tmp_path: Path,
) -> None:
    settings = make_settings(
        tmp_path,
        overflow="block",
        max_buffered_events=5,
        max_batch_events=5,
        put_timeout=2.0,
        retry_attempts=50,
        retry_initial_backoff=1.0,
        retry_max_backoff=5.0,
    )
    sink = MemorySink()
    sink.fail_transient = 10**6
    batch = events(7)
    async with AnalyticsBuffer(settings, sink=sink) as buffer:
        for event in batch[:5]:
            assert buffer.track(event) is True  # the fifth starts a flush that keeps failing
        start = trio.current_time()
        with pytest.raises(BufferFull, match=r"no room for the event within put_timeout=2.0 s"):
            await buffer.put(batch[5])
        assert trio.current_time() - start == pytest.approx(2.0, abs=EPS)
        stats = buffer.stats()
        assert (stats.accepted, stats.buffered, stats.written) == (5, 5, 0)
        assert stats.retries >= 1
        # The sink recovers: the retries succeed, room comes back, put succeeds.
        sink.fail_transient = 0
        await buffer.flush()
        assert ids(sink.rows) == ids(batch[:5])
        start = trio.current_time()
        await buffer.put(batch[6])
        assert trio.current_time() == start
    assert ids(sink.rows) == ids([*batch[:5], batch[6]])
    assert buffer.stats().accepted == 6


# -- explicit flush ------------------------------------------------------------------


@pytest.mark.anyio
@trio_mock
async def test_flush_returns_only_after_the_earlier_events_are_in_the_sink(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, retry_initial_backoff=0.5, retry_max_backoff=5.0)
    sink = MemorySink()
    sink.fail_transient = 2
    first, second = events(3, "a"), events(2, "b")
    async with AnalyticsBuffer(settings, sink=sink) as buffer:
        for event in first:
            buffer.track(event)
        buffer.flush_async()
        for event in second:
            buffer.track(event)
        start = trio.current_time()
        await buffer.flush()
        elapsed = trio.current_time() - start
        assert ids(sink.rows) == ids(first + second)
        # Two backoffs: 0.5 and 1.0 s, each plus up to 0.5 s of jitter.
        assert 1.5 <= elapsed <= 2.5
        stats = buffer.stats()
        assert (stats.written, stats.buffered, stats.retries) == (5, 0, 2)


@pytest.mark.anyio
@trio_mock
async def test_flush_of_nothing_returns_at_once(tmp_path: Path) -> None:
    sink = MemorySink()
    flushes = Flushes()
    async with AnalyticsBuffer(make_settings(tmp_path), sink=sink, on_flush=flushes) as buffer:
        start = trio.current_time()
        await buffer.flush()
        await buffer.flush()
        assert trio.current_time() == start
    assert sink.inserts == 0
    assert flushes.reports == []


# -- timer ---------------------------------------------------------------------------


@pytest.mark.anyio
@trio_mock
async def test_timer_flushes_exactly_flush_interval_after_the_previous_flush(
    tmp_path: Path,
) -> None:
    sink = MemorySink()
    flushes = Flushes()
    settings = make_settings(tmp_path, flush_interval=5.0)
    async with AnalyticsBuffer(settings, sink=sink, on_flush=flushes) as buffer:
        start = trio.current_time()
        await sleep_until(start + 3.0)
        buffer.track(events(1, "a")[0])
        await sleep_until(start + 5.0 - 1e-6)
        assert sink.inserts == 0  # not before
        await sleep_until(start + 5.0)
        assert sink.inserts == 1
        assert flushes.offsets(start) == [pytest.approx(5.0, abs=EPS)]
        # Re-armed at 5: an event at 6 goes at 10.
        await sleep_until(start + 6.0)
        buffer.track(events(1, "b")[0])
        await sleep_until(start + 10.0 - 1e-6)
        assert sink.inserts == 1
        await sleep_until(start + 10.0)
        assert sink.inserts == 2
        # Empty ticks write nothing.
        await sleep_until(start + 60.0)
        assert sink.inserts == 2
    assert flushes.offsets(start) == [pytest.approx(5.0, abs=EPS), pytest.approx(10.0, abs=EPS)]
    assert flushes.sizes() == [1, 1]


# -- thresholds ----------------------------------------------------------------------


@pytest.mark.anyio
@trio_mock
async def test_threshold_by_events_flushes_at_once(tmp_path: Path) -> None:
    sink = MemorySink()
    flushes = Flushes()
    settings = make_settings(tmp_path, max_batch_events=10)
    batch = events(25)
    async with AnalyticsBuffer(settings, sink=sink, on_flush=flushes) as buffer:
        start = trio.current_time()
        for event in batch:
            buffer.track(event)
        await wait_all_tasks_blocked()
        assert flushes.sizes() == [10, 10]
        assert flushes.offsets(start) == [0.0, 0.0]
        await sleep_until(start + 5.0)
    assert flushes.sizes() == [10, 10, 5]
    assert flushes.offsets(start) == [0.0, 0.0, pytest.approx(5.0, abs=EPS)]
    assert ids(sink.rows) == ids(batch)


@pytest.mark.anyio
@trio_mock
async def test_threshold_by_bytes_flushes_at_once(tmp_path: Path) -> None:
    batch = events(7)
    size = check_event(batch[0], Settings().max_event_bytes)[1]
    sink = MemorySink()
    flushes = Flushes()
    settings = make_settings(tmp_path, max_batch_bytes=3 * size)
    async with AnalyticsBuffer(settings, sink=sink, on_flush=flushes) as buffer:
        start = trio.current_time()
        for event in batch:
            buffer.track(event)
        await wait_all_tasks_blocked()
        assert flushes.sizes() == [3, 3]
        assert flushes.offsets(start) == [0.0, 0.0]
    assert flushes.sizes() == [3, 3, 1]
    assert ids(sink.rows) == ids(batch)


@pytest.mark.anyio
@trio_mock
async def test_threshold_flush_rearms_the_timer(tmp_path: Path) -> None:
    sink = MemorySink()
    flushes = Flushes()
    settings = make_settings(tmp_path, flush_interval=5.0, max_batch_events=4)
    async with AnalyticsBuffer(settings, sink=sink, on_flush=flushes) as buffer:
        start = trio.current_time()
        await sleep_until(start + 3.0)
        for event in events(5):
            buffer.track(event)  # four go at 3 (threshold), the fifth waits
        await sleep_until(start + 5.0)
        assert flushes.sizes() == [4]  # no tiny flush at 5, where the old timer was due
        await sleep_until(start + 8.0 - 1e-6)
        assert flushes.sizes() == [4]
        await sleep_until(start + 8.0)
        assert flushes.sizes() == [4, 1]
    assert flushes.offsets(start) == [pytest.approx(3.0, abs=EPS), pytest.approx(8.0, abs=EPS)]


@pytest.mark.anyio
@trio_mock
async def test_explicit_flush_rearms_the_timer(tmp_path: Path) -> None:
    flushes = Flushes()
    settings = make_settings(tmp_path, flush_interval=5.0)
    async with AnalyticsBuffer(settings, sink=MemorySink(), on_flush=flushes) as buffer:
        start = trio.current_time()
        await sleep_until(start + 4.0)
        buffer.track(events(1, "a")[0])
        await buffer.flush()
        buffer.track(events(1, "b")[0])
        await sleep_until(start + 9.0 - 1e-6)
        assert flushes.sizes() == [1]
        await sleep_until(start + 9.0)
    assert flushes.offsets(start) == [pytest.approx(4.0, abs=EPS), pytest.approx(9.0, abs=EPS)]


# -- shutdown ------------------------------------------------------------------------


@pytest.mark.anyio
@trio_mock
async def test_leaving_async_with_flushes_at_once(tmp_path: Path) -> None:
    sink = MemorySink()
    flushes = Flushes()
    batch = events(7)
    settings = make_settings(tmp_path, flush_interval=60.0)
    async with AnalyticsBuffer(settings, sink=sink, on_flush=flushes) as buffer:
        start = trio.current_time()
        for event in batch:
            buffer.track(event)
        await wait_all_tasks_blocked()
        assert sink.rows == []
    assert trio.current_time() == start  # no waiting for the timer
    assert ids(sink.rows) == ids(batch)
    assert (sink.opened, sink.closed) == (1, 1)
    stats = buffer.stats()
    assert (stats.accepted, stats.written, stats.buffered, stats.buffered_bytes) == (7, 7, 0, 0)
    with pytest.raises(BufferClosed):
        buffer.track(batch[0])


async def refuse_then_take(
    settings: Settings, sink: MemorySink, on_flush: Flushes | None = None
) -> tuple[list[Event], list[Event], Stats]:
    """Track three events and flush while ``sink`` refuses them, then two more and flush."""
    refused, later = events(3, "bad"), events(2, "good")
    async with AnalyticsBuffer(settings, sink=sink, on_flush=on_flush) as buffer:
        for event in refused:
            buffer.track(event)
        await buffer.flush()
        for event in later:
            buffer.track(event)
        await buffer.flush()
    return refused, later, buffer.stats()


# -- sink failures -------------------------------------------------------------------


@pytest.mark.anyio
@trio_mock
async def test_permanent_failure_dead_letters_with_the_code_and_later_batches_flow(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path)
    sink = MemorySink()
    sink.fail_permanent = 1
    flushes = Flushes()
    refused, later, stats = await refuse_then_take(settings, sink, flushes)
    letters = dead_letters(settings)
    assert [letter.event for letter in letters] == refused
    assert {letter.code for letter in letters} == {16}
    assert all("Code: 16" in letter.reason for letter in letters)
    assert len({letter.token for letter in letters}) == 1
    assert letters[0].token == f"{flushes.reports[0].token}:0"
    assert sink.rows == later
    assert (stats.written, stats.dead_lettered, stats.retries, stats.buffered) == (2, 3, 0, 0)
    assert sink.inserts == 2  # a permanent failure is not retried
    assert [(r.written, r.dead_lettered) for r in flushes.reports] == [(0, 3), (2, 0)]


@pytest.mark.anyio
@trio_mock
async def test_a_refused_chunk_does_not_stop_the_other_chunks_of_its_batch(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, insert_chunk_rows=2)
    sink = MemorySink()
    sink.fail_permanent = 1
    flushes = Flushes()
    batch = events(5)
    async with AnalyticsBuffer(settings, sink=sink, on_flush=flushes) as buffer:
        for event in batch:
            buffer.track(event)
        await buffer.flush()
    token = flushes.reports[0].token
    assert [letter.event for letter in dead_letters(settings)] == batch[:2]
    assert sink.rows == batch[2:]
    assert sink.tokens == {f"{token}:1", f"{token}:2"}
    assert flushes.reports == [FlushReport(token, 3, 2)]


@pytest.mark.anyio
@trio_mock
async def test_transient_failures_are_retried_with_the_same_token_then_succeed(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, retry_attempts=5)
    sink = MemorySink()
    sink.fail_transient = 4
    batch = events(3)
    async with AnalyticsBuffer(settings, sink=sink) as buffer:
        for event in batch:
            buffer.track(event)
        await buffer.flush()
        assert sink.rows == batch
    stats = buffer.stats()
    assert (stats.written, stats.dead_lettered, stats.retries) == (3, 0, 4)
    assert sink.inserts == 5
    assert len(sink.tokens) == 1
    assert dead_letters(settings) == []


@pytest.mark.anyio
@trio_mock
async def test_exhausted_retries_go_to_the_outbox_and_are_replayed_once(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, retry_attempts=3)
    sink = MemorySink()
    sink.fail_transient = 3
    refused, later = events(3, "bad"), events(2, "good")
    async with AnalyticsBuffer(settings, sink=sink) as buffer:
        for event in refused:
            buffer.track(event)
        await buffer.flush()
        for event in later:
            buffer.track(event)
        await buffer.flush()
        await buffer.replay_outbox()
        stats = buffer.stats()
    assert dead_letters(settings) == []
    assert sorted(sink.rows, key=lambda e: e.name) == refused + later
    # Replayed events count as written too.
    assert (stats.written, stats.dead_lettered, stats.retries) == (5, 0, 2)
    assert (stats.outbox_spilled, stats.outbox_replayed, stats.outbox_segments) == (3, 3, 0)
    replay_tokens = {token for token in sink.tokens if token.startswith("outbox-")}
    assert len(replay_tokens) == 1
    assert sink.inserts == 5


@pytest.mark.anyio
@trio_mock
async def test_exhausted_retries_dead_letter_with_both_reasons_when_the_outbox_is_full(
    tmp_path: Path,
) -> None:
    settings = make_settings(
        tmp_path, retry_attempts=3, outbox_max_bytes=100, outbox_segment_bytes=100
    )
    sink = MemorySink()
    sink.fail_transient = 3
    refused, later, stats = await refuse_then_take(settings, sink)
    letters = dead_letters(settings)
    assert [letter.event for letter in letters] == refused
    assert {letter.code for letter in letters} == {0}
    (reason,) = {letter.reason for letter in letters}
    assert reason.startswith("retries exhausted (3): connection refused; the outbox refused it: ")
    assert "outbox_max_bytes=100" in reason
    assert sink.rows == later
    assert (stats.written, stats.dead_lettered, stats.retries) == (2, 3, 2)
    assert (stats.outbox_spilled, stats.outbox_refused) == (0, 3)
    assert sink.inserts == 4


# -- core bugs ----------------------------------------------------------------------


def test_writer_retry_configuration_raises_no_deprecation_warning(tmp_path: Path) -> None:
    # Regression: the Writer passed ``wait_exponential_jitter(initial=...)``, deprecated
    # in the locked tenacity (9.2.1); under ``filterwarnings = error`` every
    # AnalyticsBuffer start then failed (and hung, see the next test).
    counters = Counters()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Writer(
            sink=MemorySink(),
            settings=Settings(data_dir=str(tmp_path)),
            counters=counters,
            capacity=Capacity(counters, 10, 1000),
            dead_letters=DeadLetters(tmp_path, "events"),
        )
    assert [str(warning.message) for warning in caught] == []


class _UnopenableSink(MemorySink):
    """A MemorySink whose table lacks a column: ``open`` raises ``ConfigError``, as documented."""

    async def open(self) -> None:
        await super().open()
        raise ConfigError("table events lacks the column 'duration'")


def _flatten(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _flatten(inner)
    else:
        yield error


def test_a_sink_that_cannot_open_fails_the_start_instead_of_hanging(tmp_path: Path) -> None:
    # Regression: when a child failed to start, Supervisor.__aenter__ stopped
    # *every* child, including those never started; waiting for an unstarted
    # child's ``done`` never ends (shielded), so ``async with`` hung forever
    # instead of raising the sink's ConfigError. The start runs in a
    # daemon thread so the bug shows as a failure, not a hung test run. It uses
    # trio's real clock: a correct start fails without waiting for anything,
    # while a MockClock would spin a CPU forever in the hung thread.
    sink = _UnopenableSink()
    outcome: list[BaseException | None] = []

    async def start() -> None:
        settings = Settings(data_dir=str(tmp_path), shutdown_timeout=0.01)
        try:
            async with AnalyticsBuffer(settings, sink=sink):
                outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    def run() -> None:
        trio.run(start)

    thread = threading.Thread(target=run, name="unopenable-sink", daemon=True)
    thread.start()
    thread.join(timeout=10)  # returns at once when the start fails as it should
    assert not thread.is_alive(), "entering AnalyticsBuffer hung after the sink failed to open"
    assert len(outcome) == 1
    error = outcome[0]
    assert error is not None
    assert any(isinstance(inner, ConfigError) for inner in _flatten(error))
    assert sink.closed == 1


@pytest.mark.anyio
@trio_mock
async def test_stats_never_count_an_event_twice_while_a_batch_is_being_written(
    tmp_path: Path,
) -> None:
    # Regression: ``written``/``dead_lettered`` grew per chunk while ``buffered``
    # shrank only after the whole batch, so while a later chunk waited in its
    # retry backoff, accepted < written + dead_lettered + buffered.
    settings = make_settings(
        tmp_path, insert_chunk_rows=2, retry_initial_backoff=1.0, retry_max_backoff=5.0
    )
    sink = MemorySink()
    sink.fail_permanent = 1  # chunk 0 is dead-lettered ...
    sink.fail_transient = 1  # ... and chunk 1 waits in a backoff of at least 1 s
    async with AnalyticsBuffer(settings, sink=sink) as buffer:
        for event in events(4):
            buffer.track(event)
        buffer.flush_async()
        # Chunks are written concurrently: wait until chunk 0 is dead-lettered.
        # (Chunk 1 is usually still in its backoff, but the dead-letter write
        # runs in a thread, during which the virtual clock may jump past it.)
        while sink.inserts < 2 or buffer.stats().dead_lettered < 2:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        await wait_all_tasks_blocked()
        during = buffer.stats()
        await buffer.flush()
    after = buffer.stats()
    assert (after.written, after.dead_lettered, after.buffered) == (2, 2, 0)
    assert during.dead_lettered == 2
    assert during.accepted == during.written + during.dead_lettered + during.buffered, during
