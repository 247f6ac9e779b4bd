"""The whole pipeline through the embedded engine (chdb 26.x), the default.

``AnalyticsBuffer(Settings(clickhouse_url=None, data_dir=...))`` stores the
events under ``<data_dir>/chdb``; each test counts them back through a fresh
sink from ``create_sink(settings)``, opened after the buffer closed its own.
chdb serves one data directory per process, so every sink opened here is
closed again before the test ends.

The modern table holds the millisecond in ``created_at DateTime64(3, 'UTC')``
and the properties in a ``Map(String, String)``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest

from analytics_buffer import AnalyticsBuffer, Event, FlushReport, Settings, Sink
from analytics_buffer._engines import create_sink

pytestmark = [pytest.mark.anyio, pytest.mark.embedded, pytest.mark.timeout(60)]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def embedded_settings(data_dir: Path, **changes: Any) -> Settings:
    values: dict[str, Any] = {"flush_interval": 60.0}
    values.update(changes)
    return Settings(clickhouse_url=None, data_dir=str(data_dir), **values)


@asynccontextmanager
async def fresh_sink(settings: Settings) -> AsyncIterator[Sink]:
    """A sink of its own on the buffer's data, opened for reading and always closed."""
    sink = create_sink(settings, create_table=False)
    with anyio.fail_after(60):
        await sink.open()
    try:
        yield sink
    finally:
        await sink.aclose()


async def read(settings: Settings, sql: str) -> list[tuple[Any, ...]]:
    async with fresh_sink(settings) as sink:
        with anyio.fail_after(30):
            return await sink.query(sql)


def make_events(count: int) -> list[Event]:
    return [
        Event(name="click", project_id="p1", session_id=f"s{i % 4}", properties={"i": i})
        for i in range(count)
    ]


async def test_tracked_events_are_stored_and_counted_back(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path, max_batch_events=500)
    reports: list[FlushReport] = []
    events = make_events(2_000)
    tail = make_events(37)
    with anyio.fail_after(60):
        async with AnalyticsBuffer(settings, on_flush=reports.append) as buffer:
            # Four threshold batches, then an explicit flush, then what shutdown flushes.
            assert all(buffer.track(event) for event in events)
            await buffer.flush()
            assert buffer.stats().written == 2_000
            assert all(buffer.track(event) for event in tail)
        stats = buffer.stats()

    assert [report.written for report in reports] == [500, 500, 500, 500, 37]
    assert stats.accepted == stats.written == 2_037
    assert stats.dead_lettered == stats.retries == stats.buffered == 0
    assert (tmp_path / "chdb").is_dir()

    [(count, unique)] = await read(settings, "SELECT count(), uniqExact(id) FROM events")
    assert (count, unique) == (2_037, 2_037)
    stored = {uuid.UUID(row[0]) for row in await read(settings, "SELECT id FROM events")}
    assert stored == {event.id for event in events + tail}


async def test_milliseconds_and_properties_round_trip(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path)
    plus_nine = timezone(timedelta(hours=9))
    sent = [
        Event(
            name="screen_view",
            project_id="p1",
            profile_id="u1",
            session_id="s1",
            created_at=datetime(2024, 5, 6, 7, 8, 9, 123_456, tzinfo=UTC),
            path="/a/ü",
            origin="https://x.example",
            referrer="https://r.example/?q=1",
            duration=1_234,
            properties={"s": "text", "i": 42, "f": 1.5, "tiny": 0.1, "b": True, "off": False},
        ),
        Event(
            name="click",
            project_id="p1",
            created_at=datetime(2024, 3, 1, 0, 0, 0, 1_999, tzinfo=plus_nine),
        ),
    ]
    expected = {
        sent[0].id: (
            datetime(2024, 5, 6, 7, 8, 9, 123_000, tzinfo=UTC),
            {"s": "text", "i": "42", "f": "1.5", "tiny": "0.1", "b": "true", "off": "false"},
        ),
        sent[1].id: (datetime(2024, 2, 29, 15, 0, 0, 1_000, tzinfo=UTC), {}),
    }
    with anyio.fail_after(60):
        async with AnalyticsBuffer(settings) as buffer:
            for event in sent:
                assert buffer.track(event)

    columns = {
        row[0]: row[1]
        for row in await read(
            settings,
            "SELECT name, type FROM system.columns "
            "WHERE database = currentDatabase() AND table = 'events'",
        )
    }
    assert columns["created_at"] == "DateTime64(3, 'UTC')"
    assert columns["properties"] == "Map(String, String)"

    rows = await read(
        settings,
        "SELECT toString(id), name, project_id, profile_id, session_id, "
        "toUnixTimestamp64Milli(created_at), path, origin, referrer, duration, properties "
        "FROM events",
    )
    assert len(rows) == 2
    for row in rows:
        event_id = uuid.UUID(row[0])
        event = next(e for e in sent if e.id == event_id)
        created_at, properties = expected[event_id]
        assert row[1:5] == (event.name, event.project_id, event.profile_id, event.session_id)
        assert row[5] == (created_at - _EPOCH) // timedelta(milliseconds=1)
        assert row[6:10] == (event.path, event.origin, event.referrer, event.duration)
        assert row[10] == properties


async def test_a_second_buffer_on_the_same_data_dir_appends(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path)
    first, second = make_events(10), make_events(15)
    for events in (first, second):
        with anyio.fail_after(60):
            async with AnalyticsBuffer(settings) as buffer:
                for event in events:
                    buffer.track(event)
        assert buffer.stats().written == len(events)

    [(count,)] = await read(settings, "SELECT count() FROM events")
    assert count == 25
