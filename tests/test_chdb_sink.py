"""``ChdbSink`` against the real embedded engine (chdb 26.x): modern DDL, token dedup, errors.

chdb serves one data directory per process, so every test closes its sink.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from analytics_buffer import ConfigError, Event, PermanentSinkError, Settings
from analytics_buffer._chdb import ChdbSink, embedded_capabilities
from analytics_buffer._engines import create_sink

pytestmark = [pytest.mark.anyio, pytest.mark.embedded]


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[ChdbSink]:
    opened = ChdbSink(Settings(data_dir=str(tmp_path)))
    await opened.open()
    try:
        yield opened
    finally:
        await opened.aclose()


def events(count: int) -> list[Event]:
    return [Event(name="click", project_id="p1", properties={"i": i}) for i in range(count)]


async def count(sink: ChdbSink, final: bool = False) -> int:
    rows = await sink.query(f"SELECT count() FROM events{' FINAL' if final else ''}")
    return int(rows[0][0])


async def test_modern_ddl_applies(sink: ChdbSink, tmp_path: Path) -> None:
    caps = sink.capabilities
    assert caps is not None
    assert caps == embedded_capabilities()
    assert caps.has_map
    assert caps.has_dedup_token
    assert sink.path == str(tmp_path / "chdb")
    described = {row[0]: row[1] for row in await sink.query("DESCRIBE TABLE events")}
    assert described["created_at"] == "DateTime64(3, 'UTC')"
    assert described["properties"] == "Map(String, String)"
    assert described["name"] == "LowCardinality(String)"
    create = await sink.query("SHOW CREATE TABLE events")
    assert "non_replicated_deduplication_window = 1000" in create[0][0]
    assert "ReplacingMergeTree" in create[0][0]


async def test_round_trip_keeps_milliseconds_and_properties(sink: ChdbSink) -> None:
    sent = [
        Event(
            name="click",
            project_id="p1",
            profile_id="u1",
            created_at=datetime(
                2024, 5, 1, 14, 30, 45, 999000, tzinfo=timezone(timedelta(hours=2))
            ),
            duration=4_000_000_000,
            properties={"plan": "pro", "seats": 3, "ratio": 0.1, "big": 1e20, "trial": True},
        ),
        Event(
            name="view",
            project_id="p2",
            created_at=datetime(2023, 12, 31, 23, 59, 59, 1000, tzinfo=UTC),
            properties={"quote": 'it\'s "here"\n\\', "ünï": "cödé"},
        ),
    ]
    await sink.insert(sent, "chunk-1")
    rows = await sink.query(
        "SELECT toString(id), name, profile_id, toUnixTimestamp64Milli(created_at), duration, "
        "properties FROM events ORDER BY created_at"
    )
    assert rows == [
        (
            str(sent[1].id),
            "view",
            "",
            1704067199001,
            0,
            {"quote": 'it\'s "here"\n\\', "ünï": "cödé"},
        ),
        (
            str(sent[0].id),
            "click",
            "u1",
            1714566645999,
            4_000_000_000,
            {"plan": "pro", "seats": "3", "ratio": "0.1", "big": "1e+20", "trial": "true"},
        ),
    ]


async def test_every_millisecond_survives(sink: ChdbSink) -> None:
    base = datetime(2026, 3, 1, tzinfo=UTC)
    sent = [
        Event(name="t", project_id="p", created_at=base + timedelta(milliseconds=ms))
        for ms in range(1000)
    ]
    await sink.insert(sent, "ms")
    rows = await sink.query(
        "SELECT toUnixTimestamp64Milli(created_at) FROM events ORDER BY created_at"
    )
    start = int(base.timestamp()) * 1000
    assert [row[0] for row in rows] == [start + ms for ms in range(1000)]


async def test_a_repeated_token_is_stored_once(sink: ChdbSink) -> None:
    chunk = events(3)
    await sink.insert(chunk, "batch-1:0")
    await sink.insert(chunk, "batch-1:0")
    assert await count(sink) == 3
    await sink.insert(events(3), "batch-1:1")
    assert await count(sink) == 6


async def test_a_token_with_quotes_is_escaped(sink: ChdbSink) -> None:
    await sink.insert(events(2), "it's a \\ token")
    await sink.insert(events(2), "it's a \\ token")
    assert await count(sink) == 2


async def test_duplicate_ids_collapse_under_final(sink: ChdbSink) -> None:
    chunk = events(4)
    await sink.insert(chunk, "first")
    await sink.insert(chunk, "second")  # another token: stored again
    assert await count(sink) == 8
    assert await count(sink, final=True) == 4


async def test_errors_map_to_permanent_codes(sink: ChdbSink) -> None:
    with pytest.raises(PermanentSinkError) as raised:
        await sink.query("SELECT no_such_column FROM events")
    assert raised.value.code == 47
    with pytest.raises(PermanentSinkError) as raised:
        await sink.query("SELECT 1 FROM no_such_table")
    assert raised.value.code == 60
    await sink.query("ALTER TABLE events DROP COLUMN referrer")
    with pytest.raises(PermanentSinkError) as raised:
        await sink.insert(events(1), "t")
    assert raised.value.code == 16
    assert await count(sink) == 0


async def test_missing_columns_are_a_config_error(tmp_path: Path) -> None:
    setup = ChdbSink(Settings(data_dir=str(tmp_path), table="narrow"), create_table=False)
    try:
        with pytest.raises(ConfigError, match="60"):
            await setup.open()
        await setup.query(
            "CREATE TABLE narrow (id UUID, name String) ENGINE = MergeTree ORDER BY id"
        )
        with pytest.raises(ConfigError, match="no column for project_id") as raised:
            await setup.open()
        assert "duration" in str(raised.value)
    finally:
        await setup.aclose()


async def test_data_survives_reopening(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path))
    first = create_sink(settings)
    assert isinstance(first, ChdbSink)
    await first.open()
    await first.insert(events(5), "t")
    await first.aclose()
    await first.aclose()
    second = ChdbSink(settings)
    try:
        await second.insert(events(5), "u")  # opens on demand
        assert await count(second) == 10
    finally:
        await second.aclose()


async def test_one_data_directory_per_process(sink: ChdbSink, tmp_path: Path) -> None:
    same = ChdbSink(Settings(data_dir=str(tmp_path)))
    other = ChdbSink(Settings(data_dir=str(tmp_path / "other")))
    try:
        await same.open()  # the same directory shares the embedded server
        with pytest.raises(ConfigError, match="one data directory per process"):
            await other.open()
    finally:
        await same.aclose()
        await other.aclose()


async def test_missing_chdb_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "chdb", None)
    with pytest.raises(ConfigError, match=r"pip install 'analytics-buffer\[embedded\]'"):
        embedded_capabilities()
    sink = ChdbSink(Settings(data_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="embedded"):
        await sink.open()
    await sink.aclose()
