"""``ClickHouseSink`` against a real clickhouse-server 18.16 (the Debian package).

No mocks: every test talks to a real server, and the fault tests kill, pause
and restart a private one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import anyio
import anyio.lowlevel
import pytest

from analytics_buffer import (
    ConfigError,
    Event,
    PermanentSinkError,
    Settings,
    TransientSinkError,
)
from analytics_buffer._clickhouse import ClickHouseSink
from analytics_buffer._schema import events_ddl
from analytics_buffer.testing import ClickHouseServer, free_port

pytestmark = pytest.mark.anyio


def settings_for(url: str, **changes: object) -> Settings:
    return Settings(clickhouse_url=url, connect_timeout=2.0, insert_timeout=10.0).replace(**changes)


@pytest.fixture
async def sink(clickhouse_url: str) -> AsyncIterator[ClickHouseSink]:
    opened = ClickHouseSink(settings_for(clickhouse_url))
    await opened.open()
    try:
        yield opened
    finally:
        await opened.aclose()


def events(count: int, **fields: object) -> list[Event]:
    return [
        Event(name="screen_view", project_id="p1", properties={"i": str(i)}, **fields)  # type: ignore[arg-type]
        for i in range(count)
    ]


async def count(sink: ClickHouseSink, final: bool = False) -> int:
    rows = await sink.query(f"SELECT count() FROM events{' FINAL' if final else ''}")
    return int(rows[0][0])


async def test_open_creates_the_1816_table(sink: ClickHouseSink) -> None:
    caps = sink.capabilities
    assert caps is not None
    assert caps.version[:2] == (18, 16)
    assert not caps.has_datetime64
    assert not caps.has_dedup_token
    described = {row[0]: row[1] for row in await sink.query("DESCRIBE TABLE events")}
    assert described["created_at"] == "DateTime('UTC')"
    assert described["created_at_ms"] == "UInt16"
    assert described["properties.key"] == "Array(String)"
    engine = await sink.query(
        "SELECT engine FROM system.tables WHERE database = currentDatabase() AND name = 'events'"
    )
    assert engine == [("ReplacingMergeTree",)]
    assert set(sink.columns) == set(Event.__struct_fields__) - {"properties"} | {
        "created_at_ms",
        "properties.key",
        "properties.value",
    }


async def test_open_twice_and_close_twice(clickhouse_url: str) -> None:
    sink = ClickHouseSink(settings_for(clickhouse_url))
    await sink.open()
    await sink.open()
    await sink.aclose()
    await sink.aclose()


async def test_round_trip_keeps_milliseconds_and_properties(sink: ClickHouseSink) -> None:
    plus_two = timezone(timedelta(hours=2))
    sent = [
        Event(
            name="click",
            project_id="p1",
            profile_id="u1",
            session_id="s1",
            created_at=datetime(2024, 5, 1, 14, 30, 45, 999000, tzinfo=plus_two),
            path="/pricing",
            origin="https://example.com",
            referrer="https://search.example",
            duration=1234,
            properties={"plan": "pro", "seats": 3, "ratio": 0.1, "trial": False},
        ),
        Event(
            name="click",
            project_id="p1",
            created_at=datetime(2024, 5, 1, 12, 30, 46, 0, tzinfo=UTC),
        ),
        Event(
            name="view",
            project_id="p2",
            created_at=datetime(2023, 12, 31, 23, 59, 59, 1000, tzinfo=UTC),
            properties={"quote": 'it\'s "here"\n', "ünï": "cödé"},
        ),
    ]
    await sink.insert(sent, "chunk-1")
    rows = await sink.query(
        "SELECT id, name, project_id, profile_id, session_id, "
        "toUInt64(created_at) * 1000 + created_at_ms, path, origin, referrer, duration, "
        "properties.key, properties.value FROM events ORDER BY created_at, created_at_ms"
    )
    expected = sorted(sent, key=lambda e: e.created_at)
    assert [row[0] for row in rows] == [e.id for e in expected]
    first = rows[0]
    assert first[5] == 1704067199001  # 2023-12-31 23:59:59.001 UTC
    assert list(zip(first[10], first[11], strict=True)) == [
        ("quote", 'it\'s "here"\n'),
        ("ünï", "cödé"),
    ]
    by_id = {row[0]: row for row in rows}
    full = by_id[sent[0].id]
    assert full[1:5] == ("click", "p1", "u1", "s1")
    assert full[5] == 1714566645999  # 14:30:45.999 at +02:00
    assert full[6:10] == ("/pricing", "https://example.com", "https://search.example", 1234)
    assert dict(zip(full[10], full[11], strict=True)) == {
        "plan": "pro",
        "seats": "3",
        "ratio": "0.1",
        "trial": "false",
    }
    assert by_id[sent[1].id][5] == 1714566646000


async def test_a_chunk_is_one_insert_sent_in_blocks_with_turns_between(
    clickhouse_url: str,
) -> None:
    # Pins what the sink relies on in asynch's protocol connection (private API).
    sink = ClickHouseSink(settings_for(clickhouse_url, insert_block_rows=100))
    turns = 0
    inserting = True

    async def count_turns() -> None:
        nonlocal turns
        while inserting:
            turns += 1
            await anyio.lowlevel.checkpoint()

    try:
        await sink.open()
        sent = events(2_550)
        async with anyio.create_task_group() as tg:
            tg.start_soon(count_turns)
            await sink.insert(sent, "blocks")
            inserting = False
        assert await count(sink) == 2_550
        assert await sink.query("SELECT uniqExact(id) FROM events") == [(2_550,)]
        # The server squashed the 26 blocks into one part: one INSERT.
        parts = await sink.query(
            "SELECT count() FROM system.parts "
            "WHERE database = currentDatabase() AND table = 'events' AND active"
        )
        assert parts == [(1,)]
        assert turns >= 26  # the event loop had a turn after every block
        # The connection went back to the pool in a usable state.
        await sink.insert(events(3), "after")
        assert await count(sink) == 2_553
    finally:
        await sink.aclose()


async def test_a_failure_mid_insert_stores_nothing_of_the_chunk(clickhouse_url: str) -> None:
    sink = ClickHouseSink(settings_for(clickhouse_url, insert_block_rows=10))
    try:
        await sink.open()
        # Block 3 of 5 does not serialise: blocks 1-2 have reached the server by then.
        sent = events(50)
        sent[25] = Event(name="click", project_id="p1", duration=2**40)
        with pytest.raises(PermanentSinkError):
            await sink.insert(sent, "broken")
        assert await count(sink) == 0
        await sink.insert(events(5), "after")
        assert await count(sink) == 5
    finally:
        await sink.aclose()


async def test_empty_insert_is_a_no_op(sink: ClickHouseSink) -> None:
    await sink.insert([], "nothing")
    assert await count(sink) == 0


async def test_token_dedup_is_unavailable_but_duplicates_collapse(sink: ClickHouseSink) -> None:
    """18.16 has no insert_deduplication_token: a retried chunk is stored twice,
    and ReplacingMergeTree collapses the copies by event id."""
    chunk = events(50)
    await sink.insert(chunk, "same-token")
    await sink.insert(chunk, "same-token")
    assert await count(sink) == 100
    assert await count(sink, final=True) == 50
    await sink.query("OPTIMIZE TABLE events FINAL")
    assert await count(sink) == 50
    ids = await sink.query("SELECT uniqExact(id) FROM events")
    assert ids == [(50,)]


async def test_extra_table_columns_take_their_defaults(clickhouse_url: str) -> None:
    setup = ClickHouseSink(settings_for(clickhouse_url, table="custom"), create_table=False)
    ddl = events_ddl("custom", await setup.fetch_capabilities()).replace(
        "    `duration` UInt32,",
        "    `duration` UInt32,\n    `source` String DEFAULT 'web',\n"
        "    `day` Date MATERIALIZED toDate(created_at),",
    )
    await setup.query(ddl)
    await setup.open()
    try:
        assert "source" not in setup.columns
        sent = events(3, created_at=datetime(2024, 2, 3, 4, 5, 6, tzinfo=UTC))
        await setup.insert(sent, "t")
        rows = await setup.query("SELECT DISTINCT source, day FROM custom")
        assert rows == [("web", datetime(2024, 2, 3).date())]
    finally:
        await setup.aclose()


async def test_missing_columns_are_a_config_error(clickhouse_url: str) -> None:
    setup = ClickHouseSink(settings_for(clickhouse_url, table="narrow"), create_table=False)
    try:
        await setup.query(
            "CREATE TABLE narrow (id UUID, name String, created_at DateTime) "
            "ENGINE = MergeTree() ORDER BY id"
        )
        with pytest.raises(ConfigError) as raised:
            await setup.open()
    finally:
        await setup.aclose()
    message = str(raised.value)
    for column in ("project_id", "session_id", "referrer", "duration", "properties"):
        assert column in message
    assert "'narrow'" in message


async def test_late_open_of_an_unusable_table_is_permanent(clickhouse_url: str) -> None:
    """When open failed at start, insert opens; a table that does not fit is then permanent."""
    sink = ClickHouseSink(settings_for(clickhouse_url), create_table=False)
    try:
        with pytest.raises(PermanentSinkError) as raised:
            await sink.insert(events(1), "t")
        assert isinstance(raised.value.__cause__, ConfigError)
    finally:
        await sink.aclose()


async def test_missing_table_without_create_is_a_config_error(clickhouse_url: str) -> None:
    sink = ClickHouseSink(settings_for(clickhouse_url), create_table=False)
    try:
        with pytest.raises(ConfigError, match="60") as raised:
            await sink.open()
        assert isinstance(raised.value.__cause__, PermanentSinkError)
        assert raised.value.__cause__.code == 60
    finally:
        await sink.aclose()


async def test_dropped_column_is_permanent_code_16(sink: ClickHouseSink) -> None:
    await sink.query("ALTER TABLE events DROP COLUMN referrer")
    with pytest.raises(PermanentSinkError) as raised:
        await sink.insert(events(2), "t")
    assert raised.value.code == 16
    # The next insert gets a fresh connection and the same answer; nothing was written.
    with pytest.raises(PermanentSinkError):
        await sink.insert(events(2), "t")
    assert await count(sink) == 0


async def test_dropped_table_is_permanent_code_60(sink: ClickHouseSink) -> None:
    await sink.query("DROP TABLE events")
    with pytest.raises(PermanentSinkError) as raised:
        await sink.insert(events(1), "t")
    assert raised.value.code == 60


async def test_bad_query_is_permanent(sink: ClickHouseSink) -> None:
    with pytest.raises(PermanentSinkError) as raised:
        await sink.query("SELECT no_such_column FROM events")
    assert raised.value.code == 47
    assert await count(sink) == 0  # the sink still works


async def test_refused_connection_is_transient_and_not_persisted() -> None:
    url = f"clickhouse://default:@127.0.0.1:{free_port()}/default"
    sink = ClickHouseSink(settings_for(url))
    try:
        with pytest.raises(TransientSinkError) as raised:
            await sink.open()
        assert raised.value.possibly_persisted is False
        with pytest.raises(TransientSinkError):
            await sink.insert(events(1), "t")
    finally:
        await sink.aclose()


async def test_malformed_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="clickhouse_url"):
        ClickHouseSink(Settings(clickhouse_url="http://127.0.0.1:8123/"))


async def test_insert_opens_a_sink_whose_open_failed(private_clickhouse: ClickHouseServer) -> None:
    sink = ClickHouseSink(settings_for(private_clickhouse.url))
    private_clickhouse.kill()
    try:
        with pytest.raises(TransientSinkError):
            await sink.open()
        private_clickhouse.restart()
        await sink.insert(events(5), "after-restart")
        assert await count(sink) == 5
    finally:
        await sink.aclose()


async def test_killed_server_is_transient_then_recovers(
    private_clickhouse: ClickHouseServer,
) -> None:
    sink = ClickHouseSink(settings_for(private_clickhouse.url, pool_size=2))
    try:
        await sink.open()
        await sink.insert(events(5), "before")
        private_clickhouse.kill()
        with pytest.raises(TransientSinkError):
            await sink.insert(events(5), "during")
        private_clickhouse.restart()
        # The pooled connection died with the server; asynch reconnects it.
        await sink.insert(events(5), "after")
        assert await count(sink) == 10
    finally:
        await sink.aclose()


async def test_paused_server_times_out_and_the_connection_is_replaced(
    private_clickhouse: ClickHouseServer,
) -> None:
    sink = ClickHouseSink(
        settings_for(private_clickhouse.url, insert_timeout=1.0, connect_timeout=0.5)
    )
    try:
        await sink.open()
        await sink.insert(events(5), "before")
        private_clickhouse.pause()
        try:
            start = anyio.current_time()
            with pytest.raises(TransientSinkError) as raised:
                await sink.insert(events(5), "while-paused")
            assert anyio.current_time() - start < 5
            assert isinstance(raised.value.possibly_persisted, bool)
        finally:
            private_clickhouse.resume()
        await sink.insert(events(5), "after")
        # The timed-out chunk may or may not have been stored: at least 10 rows.
        assert await count(sink) in (10, 15)
    finally:
        await sink.aclose()


async def test_cancelled_insert_does_not_poison_the_pool(sink: ClickHouseSink) -> None:
    big = events(100_000)
    for delay in (0.0, 0.05, 0.2):
        with anyio.move_on_after(delay):
            await sink.insert(big, f"cancelled-{delay}")
    # Every cancelled insert closed its connection; new ones work, within the pool size.
    async with anyio.create_task_group() as tg:
        for index in range(4):
            tg.start_soon(sink.insert, events(10), f"after-{index}")
    stored = await count(sink)
    assert stored >= 40
    assert (stored - 40) % 100_000 == 0  # a cancelled chunk is all or nothing


async def test_concurrent_inserts_share_the_pool(clickhouse_url: str) -> None:
    sink = ClickHouseSink(settings_for(clickhouse_url, pool_size=2))
    try:
        await sink.open()
        async with anyio.create_task_group() as tg:
            for index in range(10):
                tg.start_soon(sink.insert, events(100), f"chunk-{index}")
        assert await count(sink) == 1000
        assert await sink.query("SELECT uniqExact(id) FROM events") == [(1000,)]
    finally:
        await sink.aclose()


async def test_long_and_non_ascii_strings_round_trip(sink: ClickHouseSink) -> None:
    path = "/" + "p" * 300
    sent = Event(
        name="ü" * 100,
        project_id="p1",
        path=path,
        properties={"k" * 200: "v" * 20_000, "é": ""},
    )
    await sink.insert([sent], "long")
    rows = await sink.query("SELECT name, path, properties.key, properties.value FROM events")
    assert rows == [("ü" * 100, path, ["k" * 200, "é"], ["v" * 20_000, ""])]
