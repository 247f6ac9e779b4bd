"""The whole pipeline against a real clickhouse-server 18.16: no mock anywhere.

``track`` → EventBuffer → Writer → ``ClickHouseSink`` (asynch, native TCP) →
the server, which creates its own table at start. Rows are counted back with
a separate asynch connection. Fault tests take a private server and kill,
pause (SIGSTOP) and restart it while events keep coming.

On 18.16 the table is a ``ReplacingMergeTree`` keyed by event id (no
``insert_deduplication_token``), with ``created_at DateTime`` +
``created_at_ms UInt16`` and the properties as ``properties.key`` /
``properties.value`` arrays. A chunk whose INSERT timed out after it was sent
may have been stored and is retried anyway, so fault tests read
``count()``, ``uniqExact(id)`` and ``count() ... FINAL``: every accepted id
once after deduplication, never one missing.

Every real-time wait is event-driven (the ``on_flush`` hook) or a bounded
poll of a condition, always under ``anyio.fail_after``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from asynch import Connection

from analytics_buffer import (
    AnalyticsBuffer,
    BufferFull,
    ConfigError,
    Event,
    FlushReport,
    InvalidEvent,
    Settings,
)
from analytics_buffer._deadletter import DeadLetters
from analytics_buffer.testing import ClickHouseServer
from clickhouse_queries import query, table_counts
from polling import wait_until

# A hang anywhere (a server that never answers, a shutdown that never ends) fails
# the test instead of stalling the run.
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

TABLE = "events"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Retries that outlast a short outage by far: at most 0.25 s apart, 60 attempts.
_FAULT_TOLERANT: dict[str, Any] = {
    "insert_timeout": 0.5,
    "connect_timeout": 0.5,
    "retry_attempts": 60,
    "retry_initial_backoff": 0.05,
    "retry_max_backoff": 0.25,
}


# -- helpers ------------------------------------------------------------------------


def make_settings(url: str, data_dir: Path, **changes: Any) -> Settings:
    """Settings whose timer never fires during a test unless ``changes`` say so."""
    values: dict[str, Any] = {"flush_interval": 60.0, "shutdown_timeout": 10.0}
    values.update(changes)
    return Settings(clickhouse_url=url, data_dir=str(data_dir), **values)


def make_events(count: int, *, name: str = "click", project: str = "p1") -> list[Event]:
    return [
        Event(
            name=name,
            project_id=project,
            profile_id=f"u{i % 7}",
            session_id=f"s{i % 3}",
            path=f"/page/{i}",
            properties={"i": i},
        )
        for i in range(count)
    ]


async def execute(url: str, sql: str, *, timeout: float = 10.0) -> None:
    """Run a statement without a result (DDL) on its own connection."""
    with anyio.fail_after(timeout):
        async with Connection(dsn=url) as connection, connection.cursor() as cursor:
            await cursor.execute(sql)


async def count_rows(url: str) -> int:
    rows = await query(url, f"SELECT count() FROM {TABLE}")
    return int(rows[0][0])


async def stored_ids(url: str) -> set[uuid.UUID]:
    return {uuid.UUID(str(row[0])) for row in await query(url, f"SELECT id FROM {TABLE}")}


class FlushLog:
    """The ``on_flush`` hook: keeps every report and wakes whoever waits on them."""

    def __init__(self) -> None:
        self.reports: list[FlushReport] = []
        self._changed = anyio.Event()

    def __call__(self, report: FlushReport) -> None:
        self.reports.append(report)
        self._changed.set()
        self._changed = anyio.Event()

    @property
    def written(self) -> int:
        return sum(report.written for report in self.reports)

    @property
    def dead_lettered(self) -> int:
        return sum(report.dead_lettered for report in self.reports)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            with anyio.fail_after(timeout):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; got {self.reports}")

    async def wait_written(self, count: int, timeout: float = 10.0) -> None:
        await self.wait_until(lambda: self.written >= count, timeout, f"{count} events written")


class Producer:
    """Tracks ``per_tick`` events every 10 ms until stopped, keeping the accepted ids."""

    def __init__(self, buffer: AnalyticsBuffer, per_tick: int = 20) -> None:
        self.buffer = buffer
        self.per_tick = per_tick
        self.ids: list[uuid.UUID] = []
        self._stop = anyio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            for event in make_events(self.per_tick, name="load"):
                assert self.buffer.track(event), "the buffer refused an event"
                self.ids.append(event.id)
            await anyio.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()


@asynccontextmanager
async def paused(server: ClickHouseServer) -> AsyncIterator[None]:
    """Keep ``server`` frozen (SIGSTOP) for the block; always resumed afterwards."""
    server.pause()
    try:
        yield
    finally:
        server.resume()


# -- flush triggers -----------------------------------------------------------------


async def test_threshold_flush_writes_every_event(clickhouse_url: str, tmp_path: Path) -> None:
    flushes = FlushLog()
    settings = make_settings(clickhouse_url, tmp_path, max_batch_events=500)
    events = make_events(2_000)
    async with AnalyticsBuffer(settings, on_flush=flushes) as buffer:
        assert all(buffer.track(event) for event in events)
        # Only the size threshold can flush here: the timer is a minute away.
        await flushes.wait_written(2_000)
        stats = buffer.stats()
        assert await count_rows(clickhouse_url) == 2_000

    assert [(report.written, report.dead_lettered) for report in flushes.reports] == [(500, 0)] * 4
    assert stats.accepted == stats.written == 2_000
    assert stats.flushes == 4
    assert stats.dead_lettered == stats.dropped == stats.rejected == stats.retries == 0
    assert stats.buffered == 0
    assert await stored_ids(clickhouse_url) == {event.id for event in events}


async def test_timer_flush_writes_a_small_batch(clickhouse_url: str, tmp_path: Path) -> None:
    flushes = FlushLog()
    settings = make_settings(clickhouse_url, tmp_path, flush_interval=0.3)
    events = make_events(3)
    async with AnalyticsBuffer(settings, on_flush=flushes) as buffer:
        started = anyio.current_time()
        assert all(buffer.track(event) for event in events)
        assert flushes.reports == []
        # Far below max_batch_events: only the timer flushes these.
        await flushes.wait_written(3, timeout=5.0)
        elapsed = anyio.current_time() - started
        assert await count_rows(clickhouse_url) == 3
        assert buffer.stats().written == 3

    assert elapsed < 3.0
    assert [report.written for report in flushes.reports] == [3]


async def test_explicit_flush_returns_after_the_rows_are_stored(
    clickhouse_url: str, tmp_path: Path
) -> None:
    settings = make_settings(clickhouse_url, tmp_path)
    async with AnalyticsBuffer(settings) as buffer:
        for event in make_events(10):
            buffer.track(event)
        with anyio.fail_after(10):
            await buffer.flush()
        assert await count_rows(clickhouse_url) == 10
        assert buffer.stats().written == 10
        assert buffer.stats().buffered == 0

        # A second round, to show flush() is not a one-off.
        for event in make_events(7):
            buffer.track(event)
        with anyio.fail_after(10):
            await buffer.flush()
        assert await count_rows(clickhouse_url) == 17


async def test_shutdown_flushes_what_is_buffered(clickhouse_url: str, tmp_path: Path) -> None:
    settings = make_settings(clickhouse_url, tmp_path)
    events = make_events(1_234)
    with anyio.fail_after(20):
        async with AnalyticsBuffer(settings) as buffer:
            for event in events:
                buffer.track(event)
            assert buffer.stats().written == 0

    stats = buffer.stats()
    assert stats.accepted == stats.written == 1_234
    assert stats.buffered == stats.dead_lettered == 0
    assert await stored_ids(clickhouse_url) == {event.id for event in events}
    assert await count_rows(clickhouse_url) == 1_234


# -- what is stored -----------------------------------------------------------------


def _epoch_ms(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(milliseconds=1)


async def test_every_field_round_trips_to_the_millisecond(
    clickhouse_url: str, tmp_path: Path
) -> None:
    minus_five = timezone(timedelta(hours=-5))
    events = [
        Event(
            name="screen_view",
            project_id="proj-1",
            profile_id="user-42",
            session_id="sess-9",
            created_at=datetime(2024, 5, 6, 7, 8, 9, 123_456, tzinfo=UTC),
            path="/checkout/ünïcödé",
            origin="https://shop.example",
            referrer="https://search.example/?q=a&b=c",
            duration=4_294_967_295,
            properties={"s": "text", "i": 42, "neg": -3, "f": 1.5, "tiny": 0.1, "b": True},
        ),
        Event(
            name="click",
            project_id="proj-1",
            # Another time zone, on a leap day, at the last millisecond of a second.
            created_at=datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=minus_five),
            properties={"off": False, "big": 1e20},
        ),
        Event(name="bare", project_id="proj-2"),
    ]
    expected_ms = [
        _epoch_ms(datetime(2024, 5, 6, 7, 8, 9, 123_000, tzinfo=UTC)),
        _epoch_ms(datetime(2024, 3, 1, 4, 59, 59, 999_000, tzinfo=UTC)),
        _epoch_ms(events[2].created_at),
    ]
    expected_properties: list[dict[str, str]] = [
        {"s": "text", "i": "42", "neg": "-3", "f": "1.5", "tiny": "0.1", "b": "true"},
        {"off": "false", "big": "1e+20"},
        {},
    ]

    async with AnalyticsBuffer(make_settings(clickhouse_url, tmp_path)) as buffer:
        for event in events:
            assert buffer.track(event)
        with anyio.fail_after(10):
            await buffer.flush()

    rows = await query(
        clickhouse_url,
        "SELECT id, name, project_id, profile_id, session_id, toUnixTimestamp(created_at), "
        "created_at_ms, path, origin, referrer, duration, properties.key, properties.value "
        f"FROM {TABLE}",
    )
    by_id = {uuid.UUID(str(row[0])): row[1:] for row in rows}
    assert len(rows) == len(by_id) == 3
    for event, ms, properties in zip(events, expected_ms, expected_properties, strict=True):
        row = by_id[event.id]
        name, project, profile, session, seconds, millis, path, origin, referrer = row[:9]
        duration, keys, values = row[9:]
        assert (name, project, profile, session) == (
            event.name,
            event.project_id,
            event.profile_id,
            event.session_id,
        )
        assert seconds * 1000 + millis == ms, f"created_at of {event.name}"
        assert (path, origin, referrer, duration) == (
            event.path,
            event.origin,
            event.referrer,
            event.duration,
        )
        assert len(keys) == len(values)
        assert dict(zip(keys, values, strict=True)) == properties


async def test_invalid_event_among_good_ones_is_rejected_alone(
    clickhouse_url: str, tmp_path: Path
) -> None:
    good = make_events(10)
    async with AnalyticsBuffer(make_settings(clickhouse_url, tmp_path)) as buffer:
        for event in good[:5]:
            assert buffer.track(event)
        naive = Event(name="click", project_id="p1", created_at=datetime(2024, 1, 1))
        with pytest.raises(InvalidEvent) as caught:
            buffer.track(naive)
        assert caught.value.field == "created_at"
        for event in good[5:]:
            assert buffer.track(event)
        with anyio.fail_after(10):
            await buffer.flush()
        stats = buffer.stats()

    assert stats.rejected == 1
    assert stats.accepted == stats.written == 10
    assert stats.dead_lettered == 0
    assert await stored_ids(clickhouse_url) == {event.id for event in good}
    assert not (tmp_path / "dead-letter").exists()


@pytest.mark.timeout(10)
async def test_start_against_a_missing_database_raises_config_error(
    clickhouse_server: ClickHouseServer, tmp_path: Path
) -> None:
    """The sink's ``open`` raises ``ConfigError`` (code 81 UNKNOWN_DATABASE): entering
    the buffer must raise it, promptly, not hang."""
    url = clickhouse_server.url_for(f"missing_{uuid.uuid4().hex}")
    settings = make_settings(url, tmp_path, shutdown_timeout=0.5)
    started = anyio.current_time()
    with pytest.raises(ConfigError, match=r"[Dd]atabase"):
        async with AnalyticsBuffer(settings):
            pass
    assert anyio.current_time() - started < 5.0


# -- permanent errors ---------------------------------------------------------------


async def test_refused_batch_is_dead_lettered_and_later_batches_flow(
    clickhouse_url: str, tmp_path: Path
) -> None:
    """The table loses a column between two batches (a real server error, code 16
    NO_SUCH_COLUMN_IN_TABLE): that batch goes to the dead-letter file with the code,
    and once the column is back, the next batch is written."""
    before, refused, after = make_events(5), make_events(4), make_events(6)
    flushes = FlushLog()
    async with AnalyticsBuffer(make_settings(clickhouse_url, tmp_path), on_flush=flushes) as buffer:
        for event in before:
            buffer.track(event)
        with anyio.fail_after(10):
            await buffer.flush()

        await execute(clickhouse_url, f"ALTER TABLE {TABLE} DROP COLUMN referrer")
        for event in refused:
            buffer.track(event)
        with anyio.fail_after(10):
            await buffer.flush()
        assert buffer.stats().dead_lettered == 4

        await execute(clickhouse_url, f"ALTER TABLE {TABLE} ADD COLUMN referrer String")
        for event in after:
            buffer.track(event)
        with anyio.fail_after(10):
            await buffer.flush()
        stats = buffer.stats()

    assert [(r.written, r.dead_lettered) for r in flushes.reports] == [(5, 0), (0, 4), (6, 0)]
    assert stats.accepted == 15
    assert stats.written == 11
    assert stats.dead_lettered == 4
    assert stats.retries == 0, "a permanent error must not be retried"
    assert await stored_ids(clickhouse_url) == {e.id for e in before + after}

    letters = DeadLetters(tmp_path / "dead-letter", TABLE).read()
    assert letters, "no dead-letter file"
    assert DeadLetters(tmp_path / "dead-letter", TABLE).path == (
        tmp_path / "dead-letter" / f"{TABLE}.ndjson"
    )
    assert [letter.event for letter in letters] == refused
    assert {letter.code for letter in letters} == {16}
    assert all("referrer" in letter.reason for letter in letters)
    assert len({letter.token for letter in letters}) == 1


async def test_event_outside_the_tables_time_range_does_not_poison_its_batch(
    clickhouse_url: str, tmp_path: Path
) -> None:
    """18.16 stores ``created_at`` as ``DateTime`` (seconds in a UInt32: 1970 to
    2106). An aware datetime outside that range passes ``track``; it must be refused
    there (``InvalidEvent`` naming ``created_at``), or at least fail alone, never take
    the good events of its chunk to the dead-letter file with it."""
    good = make_events(6)
    ancient = Event(
        name="click", project_id="p1", created_at=datetime(1969, 12, 31, 23, 0, tzinfo=UTC)
    )
    async with AnalyticsBuffer(make_settings(clickhouse_url, tmp_path)) as buffer:
        for event in good[:3]:
            buffer.track(event)
        refused_field = None
        try:
            buffer.track(ancient)
        except InvalidEvent as exc:
            refused_field = exc.field
        for event in good[3:]:
            buffer.track(event)
        with anyio.fail_after(10):
            await buffer.flush()
        stats = buffer.stats()

    assert refused_field in (None, "created_at")
    dead = [letter.event.id for letter in DeadLetters(tmp_path / "dead-letter", TABLE).read()]
    assert set(dead) <= {ancient.id}, "good events were dead-lettered with the bad one"
    assert await stored_ids(clickhouse_url) >= {event.id for event in good}
    assert stats.written + stats.dead_lettered == stats.accepted


# -- faults: the server killed, paused ----------------------------------------------


@asynccontextmanager
async def steady_load(
    url: str, tmp_path: Path
) -> AsyncIterator[tuple[AnalyticsBuffer, Producer, FlushLog]]:
    """A buffer under steady tracking, past its first write; stopped and flushed on exit."""
    flushes = FlushLog()
    settings = make_settings(
        url, tmp_path, flush_interval=0.1, max_batch_events=200, **_FAULT_TOLERANT
    )
    with anyio.fail_after(45):
        async with AnalyticsBuffer(settings, on_flush=flushes) as buffer:
            producer = Producer(buffer)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(producer.run)
                await flushes.wait_written(1)
                yield buffer, producer, flushes
                producer.stop()
            await buffer.flush()


async def assert_stored_once(url: str, accepted: set[uuid.UUID]) -> None:
    """Every accepted id is in the table, once after FINAL, and nothing else is."""
    count, unique, final = await table_counts(url)
    assert unique == len(accepted), "accepted events are missing from ClickHouse"
    assert final == len(accepted)
    # A chunk whose connection broke after it was sent may be stored twice on 18.16
    # (no insert_deduplication_token); FINAL collapses those by id.
    assert count >= len(accepted)
    assert await stored_ids(url) == accepted


async def test_clickhouse_killed_and_restarted_loses_nothing(
    private_clickhouse: ClickHouseServer, tmp_path: Path
) -> None:
    server = private_clickhouse
    async with steady_load(server.url, tmp_path) as (buffer, producer, flushes):
        server.kill()
        killed_at = len(producer.ids)
        # The outage lasts until inserts have failed a few times and 2,000 more
        # events were accepted meanwhile (about a second of load).
        await wait_until(
            lambda: buffer.stats().retries >= 3 and len(producer.ids) >= killed_at + 2_000,
            "failed inserts under continued tracking",
            timeout=15,
        )
        written_during_outage = buffer.stats().written
        accepted_during_outage = len(producer.ids) - killed_at
        await anyio.to_thread.run_sync(server.start)
        # Tracking went on all along; wait for a batch to make it after the restart.
        await flushes.wait_written(written_during_outage + 1, timeout=15)
    stats = buffer.stats()

    accepted = set(producer.ids)
    assert accepted_during_outage >= 2_000
    assert len(accepted) == len(producer.ids) == stats.accepted
    assert stats.retries >= 3
    assert stats.dead_lettered == 0
    assert stats.written == stats.accepted
    assert not (tmp_path / "dead-letter").exists()
    await assert_stored_once(server.url, accepted)


async def test_clickhouse_paused_times_out_inserts_then_catches_up(
    private_clickhouse: ClickHouseServer, tmp_path: Path
) -> None:
    server = private_clickhouse
    async with steady_load(server.url, tmp_path) as (buffer, producer, flushes):
        async with paused(server):
            paused_at = anyio.current_time()
            await wait_until(lambda: buffer.stats().retries >= 2, "timed-out inserts")
            stalled_for = anyio.current_time() - paused_at
            written_while_paused = buffer.stats().written
        await flushes.wait_written(written_while_paused + 1, timeout=15)
    stats = buffer.stats()

    accepted = set(producer.ids)
    # Two attempts cannot fail before insert_timeout ran out at least once.
    assert stalled_for >= buffer.settings.insert_timeout
    assert stats.retries >= 2
    assert stats.accepted == stats.written == len(accepted)
    assert stats.dead_lettered == 0
    await assert_stored_once(server.url, accepted)


# -- overflow policies, with the server paused --------------------------------------


def _overflow_settings(url: str, data_dir: Path, **changes: Any) -> Settings:
    return make_settings(
        url,
        data_dir,
        max_buffered_events=10,
        max_batch_events=5,
        **_FAULT_TOLERANT,
        **changes,
    )


async def _fill(buffer: AnalyticsBuffer, events: Sequence[Event]) -> None:
    """Track ``events``, yielding between them so the pipeline runs (and stalls)."""
    for event in events:
        assert buffer.track(event)
        await anyio.lowlevel.checkpoint()


async def test_overflow_drop_newest_counts_what_it_drops(
    private_clickhouse: ClickHouseServer, tmp_path: Path
) -> None:
    server = private_clickhouse
    settings = _overflow_settings(server.url, tmp_path, overflow="drop_newest")
    events = make_events(15)
    with anyio.fail_after(30):
        async with AnalyticsBuffer(settings) as buffer:
            async with paused(server):
                await _fill(buffer, events[:10])
                outcomes = []
                for event in events[10:]:
                    outcomes.append(buffer.track(event))
                    await anyio.lowlevel.checkpoint()
                await wait_until(lambda: buffer.stats().retries >= 1, "a stalled insert")
                held = buffer.stats()
            await buffer.flush()
            stats = buffer.stats()

    assert outcomes == [False] * 5
    assert held.written == 0
    assert held.buffered == 10
    assert stats.dropped == 5
    assert stats.accepted == stats.written == 10
    assert stats.written + stats.dropped == len(events)
    _, unique, final = await table_counts(server.url)
    assert unique == final == 10
    assert await stored_ids(server.url) == {event.id for event in events[:10]}


async def test_overflow_raise_raises_buffer_full(
    private_clickhouse: ClickHouseServer, tmp_path: Path
) -> None:
    server = private_clickhouse
    settings = _overflow_settings(server.url, tmp_path, overflow="raise")
    events = make_events(12)
    with anyio.fail_after(30):
        async with AnalyticsBuffer(settings) as buffer:
            async with paused(server):
                await _fill(buffer, events[:10])
                for event in events[10:]:
                    with pytest.raises(BufferFull):
                        buffer.track(event)
                held = buffer.stats()
            await buffer.flush()
            stats = buffer.stats()

    assert held.written == 0
    assert held.buffered == 10
    assert stats.dropped == 0
    assert stats.accepted == stats.written == 10
    assert await stored_ids(server.url) == {event.id for event in events[:10]}


async def test_overflow_block_track_raises_and_put_waits_for_room(
    private_clickhouse: ClickHouseServer, tmp_path: Path
) -> None:
    server = private_clickhouse
    settings = _overflow_settings(server.url, tmp_path, overflow="block", put_timeout=2.0)
    events = make_events(10)
    timed_out, waiting = make_events(2)
    put_done = anyio.Event()

    async def put_waiting() -> None:
        await buffer.put(waiting)
        put_done.set()

    with anyio.fail_after(30):
        async with AnalyticsBuffer(settings) as buffer:
            async with paused(server):
                await _fill(buffer, events)
                with pytest.raises(BufferFull, match="put"):
                    buffer.track(timed_out)

                # put waits put_timeout for room that cannot come while paused...
                started = anyio.current_time()
                with pytest.raises(BufferFull):
                    await buffer.put(timed_out)
                assert anyio.current_time() - started >= settings.put_timeout * 0.9

                # ... and succeeds once the writer frees room.
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(put_waiting)
                    await anyio.wait_all_tasks_blocked()
                    assert not put_done.is_set()
                    assert buffer.stats().accepted == 10
                    server.resume()
                    await put_done.wait()
            await buffer.flush()
            stats = buffer.stats()

    assert stats.accepted == stats.written == 11
    assert stats.dropped == 0
    assert await stored_ids(server.url) == {event.id for event in [*events, waiting]}
