"""Counters through real servers: ClickHouse 18.16 and chdb rollups, Redis shared and restarted.

Reads go through the public API (``count``, ``hourly_counts``,
``active_visitors``); a rollup is asked for with the actor's
``COUNTER_ROLLUP`` call instead of waiting ``rollup_interval``. Waits on
the servers are bounded (``anyio.fail_after``) and event-driven or polls of
``stats()``; nothing sleeps blindly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final

import anyio
import pytest

from analytics_buffer import AnalyticsBuffer, Event, Settings, StoreUnavailable
from analytics_buffer._chdb import ChdbSink
from analytics_buffer._cli import main
from analytics_buffer._clickhouse import ClickHouseSink
from analytics_buffer._counter_actor import COUNTER_ROLLUP
from analytics_buffer._counter_store import Staged
from analytics_buffer._counters import Bucket, day_start, field_of
from analytics_buffer._redis_counters import RedisCounterStore
from analytics_buffer._rollup import SinkRollups, TupleSink
from analytics_buffer.testing import ClickHouseServer, RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

NOW: Final = datetime.now(UTC).replace(microsecond=0)
TODAY: Final = NOW.date()
DAY0: Final = date(2024, 5, 1)


def signup(profile: str = "u1", *, project: str = "p1", at: datetime = NOW) -> Event:
    return Event(name="signup", project_id=project, profile_id=profile, created_at=at)


def make_settings(tmp_path: Path, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": str(tmp_path),
        "counter_tick": 0.05,
        "rollup_interval": 3600.0,  # rollups are asked for
        "flush_interval": 0.2,
        "shutdown_timeout": 10.0,
        **changes,
    }
    return Settings(**values)


async def rollup(buffer: AnalyticsBuffer) -> int:
    written: int = await buffer._counters_ref.call(COUNTER_ROLLUP, timeout=30)
    return written


async def wait_for(condition: Any, what: str) -> None:
    """Poll ``condition`` (on ``stats()``) every 20 ms for at most 20 s."""
    try:
        with anyio.fail_after(20):
            while not condition():  # noqa: ASYNC110 (a counter has no event to wait on)
                await anyio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


# -- rollups on each engine ---------------------------------------------------------------


@pytest.fixture(params=["clickhouse-18.16", "chdb"])
async def rollups(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SinkRollups]:
    sink: TupleSink
    if request.param == "chdb":
        sink = ChdbSink(Settings(data_dir=str(tmp_path)))
    else:
        sink = ClickHouseSink(Settings(clickhouse_url=request.getfixturevalue("clickhouse_url")))
    try:
        yield SinkRollups(sink, "events_counters")
    finally:
        await sink.aclose()


async def test_a_rollup_written_twice_counts_once_and_a_staged_one_can_be_left_out(
    rollups: SinkRollups,
) -> None:
    start = day_start(DAY0)
    hour = field_of(Bucket("p'1\\", "sign up", "hour", start + 3600))
    day = field_of(Bucket("p'1\\", "sign up", "day", start))
    other_day = field_of(Bucket("p'1\\", "sign up", "day", start + 86400))
    first = Staged(id="r1", counts={hour: 5, day: 5, other_day: 1})
    await rollups.write(first)
    await rollups.write(first)  # a retry after an unknown outcome
    await rollups.write(Staged(id="r2", counts={hour: 2, day: 2}))
    assert await rollups.totals("p'1\\", "sign up", start, start + 86400, ()) == {hour: 7, day: 7}
    assert await rollups.totals("p'1\\", "sign up", start, start + 86400, {"r2"}) == {
        hour: 5,
        day: 5,
    }
    assert await rollups.totals("p'1\\", "sign up", start, start + 86400, {"r1", "r2"}) == {}
    assert await rollups.totals("p1", "sign up", start, start + 86400, ()) == {}


async def test_the_embedded_default_rolls_up_into_chdb_and_keeps_counting(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path)
    with anyio.fail_after(60):
        async with AnalyticsBuffer(settings) as buffer:
            for i in range(30):
                assert buffer.track(signup(f"u{i % 4}"))
            assert await buffer.count("p1", "signup", TODAY) == 30
            assert await rollup(buffer) == 1
            assert await buffer.count("p1", "signup", TODAY) == 30
            buffer.track(signup("u9"))
            assert await buffer.count("p1", "signup", TODAY) == 31
            assert await buffer.active_visitors("p1") == 5
        # Leaving the block rolled up what the in-memory store held.
        async with AnalyticsBuffer(settings) as buffer:
            assert await buffer.count("p1", "signup", TODAY) == 31
            assert (await buffer.hourly_counts("p1", "signup", TODAY))[NOW.hour] == 31
            assert await buffer.active_visitors("p1") == 0  # live state died with the process


# -- several instances, one Redis ----------------------------------------------------------


async def test_two_instances_sharing_redis_give_the_same_answers(
    tmp_path: Path, clickhouse_url: str, redis_url: str
) -> None:
    settings = make_settings(tmp_path, clickhouse_url=clickhouse_url, redis_url=redis_url)

    async def both(read: Any) -> tuple[Any, Any]:
        return await read(first), await read(second)

    async def total(buffer: AnalyticsBuffer) -> int:
        return await buffer.count("p1", "signup", TODAY)

    async def live(buffer: AnalyticsBuffer) -> int:
        return await buffer.active_visitors("p1")

    with anyio.fail_after(60):
        async with AnalyticsBuffer(settings) as first, AnalyticsBuffer(settings) as second:
            for i in range(100):
                first.track(signup(f"a{i % 10}"))
            for i in range(50):
                second.track(signup(f"b{i % 5}"))
            second.track(signup("a1"))  # seen by both instances: one visitor
            # A read applies its own instance's counts, not yet the other's (up to a tick).
            assert await both(total) == (100, 151)
            assert await both(total) == (151, 151)
            assert await both(live) == (15, 15)
            assert await rollup(first) == 1
            assert await both(total) == (151, 151)
            for _ in range(9):
                first.track(signup("a1"))
            await first.count("p1", "signup", TODAY)
            assert await both(total) == (160, 160)
            # An instance stages the live counters and dies before writing them.
            store = RedisCounterStore(redis_url)
            try:
                staged = await store.stage("r-crashed")
            finally:
                await store.aclose()
            assert staged is not None
            assert sum(staged.counts.values()) == 2 * 9
            assert await both(total) == (160, 160)
            # The next rollup (any instance) finishes it, then rolls up what is live.
            second.track(signup("b1"))
            await second.count("p1", "signup", TODAY)
            assert await rollup(second) == 2
            assert await both(total) == (161, 161)
            hours = await second.hourly_counts("p1", "signup", TODAY)
            assert hours[NOW.hour] == 161
            assert sum(hours.values()) == 161


async def test_a_redis_restart_mid_run_loses_no_count(tmp_path: Path, clickhouse_url: str) -> None:
    with RedisServer(appendonly=True) as redis_server:
        settings = make_settings(
            tmp_path, clickhouse_url=clickhouse_url, redis_url=redis_server.url
        )
        with anyio.fail_after(90):
            async with AnalyticsBuffer(settings) as buffer:
                for i in range(100):
                    buffer.track(signup(f"u{i % 10}"))
                assert await buffer.count("p1", "signup", TODAY) == 100
                redis_server.kill()
                for i in range(50):
                    buffer.track(signup(f"v{i % 5}"))
                await wait_for(lambda: buffer.stats().counters_degraded, "degraded")
                with pytest.raises(StoreUnavailable):
                    await buffer.count("p1", "signup", TODAY)
                # Those 50 were sent when Redis went: they wait to be sent again as they
                # were (they might have landed). What is counted later waits unsent...
                for _ in range(7):
                    buffer.track(signup("w1"))
                await wait_for(lambda: buffer.stats().counted == 157, "counted")
                assert buffer.stats().counter_keys_held >= 2
                # ... and a rollup takes that from memory straight to ClickHouse.
                assert await rollup(buffer) == 1
                redis_server.start()
                await wait_for(lambda: not buffer.stats().counters_degraded, "recovered")
                assert await buffer.count("p1", "signup", TODAY) == 157
                assert await buffer.active_visitors("p1") == 10 + 5 + 1
                assert await rollup(buffer) == 1
                assert await buffer.count("p1", "signup", TODAY) == 157
                assert buffer.stats().counter_keys_held == 0


# -- the schema command ----------------------------------------------------------------


def test_schema_prints_and_applies_the_counters_table(
    clickhouse_url: str, clickhouse_server: ClickHouseServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schema", "--clickhouse-url", clickhouse_url, "--apply"]) == 0
    out = capsys.readouterr().out
    assert "CREATE TABLE IF NOT EXISTS `events_counters`" in out
    ddl = out.split("`events_counters`", 1)[1]
    assert "ReplacingMergeTree()" in ddl
    assert "ORDER BY (project_id, name, period, start, rollup_id)" in ddl
    assert "non_replicated_deduplication_window" not in ddl  # 18.16 has no such setting
    database = clickhouse_url.rsplit("/", 1)[1]
    tables = clickhouse_server.query(
        f"SELECT name FROM system.tables WHERE database = '{database}' ORDER BY name"
    )
    assert tables == [("events",), ("events_counters",)]


def test_embedded_schema_has_the_modern_counters_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["schema"]) == 0
    ddl = capsys.readouterr().out.split("`events_counters`", 1)[1]
    assert "`project_id` LowCardinality(String)" in ddl
    assert "non_replicated_deduplication_window = 1000" in ddl
