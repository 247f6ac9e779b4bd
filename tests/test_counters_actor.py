"""The CounterActor inside an AnalyticsBuffer, on trio's virtual clock.

Every test runs a real ``AnalyticsBuffer`` with a ``MemorySink``, the
in-memory counter store and ``MemoryRollups`` (tests/memory_rollups.py) on
trio with ``MockClock(autojump_threshold=0)``: ``anyio.sleep`` moves virtual
time as soon as every task is blocked. The buffer's wall clock starts at
``WALL0`` (``time.time`` is pinned while the buffer starts), so events
created at ``WALL0 + x`` are seen ``x`` seconds after the start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import anyio
import pytest
from trio.testing import MockClock

from analytics_buffer import AnalyticsBuffer, Event, InvalidArgument, Settings, StoreUnavailable
from analytics_buffer._counter_store import MemoryCounterStore, Snapshot, Staged
from memory_rollups import MemoryRollups
from memory_sink import MemorySink

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.parametrize(
        "anyio_backend",
        [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-mock")],
    ),
]

WALL0: Final = 1_714_564_800.0  # 2024-05-01 12:00:00 UTC
DAY0: Final = date(2024, 5, 1)
TICK: Final = 1.0
ROLLUP: Final = 60.0


def at(seconds: float, name: str = "signup", *, profile: str = "u1", project: str = "p1") -> Event:
    created = datetime.fromtimestamp(WALL0, UTC) + timedelta(seconds=seconds)
    return Event(name=name, project_id=project, profile_id=profile, created_at=created)


class CountingStore:
    """The in-memory store, counting calls; ``down`` makes every call unreachable."""

    def __init__(self) -> None:
        self.inner = MemoryCounterStore()
        self.applies: list[int] = []
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("redis unreachable (test)")

    async def apply(self, increments: Mapping[str, int], seen: Any, **kwargs: Any) -> None:
        self._check()
        self.applies.append(sum(count for field, count in increments.items() if field[0] == "d"))
        await self.inner.apply(increments, seen, **kwargs)

    async def active_visitors(self, project_id: str, since: float, until: float) -> int:
        self._check()
        return await self.inner.active_visitors(project_id, since, until)

    async def stage(self, rollup_id: str) -> Staged | None:
        self._check()
        return await self.inner.stage(rollup_id)

    async def staged(self) -> Staged | None:
        self._check()
        return await self.inner.staged()

    async def unstage(self, rollup_id: str) -> bool:
        self._check()
        return await self.inner.unstage(rollup_id)

    async def snapshot(self, fields: Sequence[str]) -> Snapshot:
        self._check()
        return await self.inner.snapshot(fields)

    async def epoch(self) -> int:
        self._check()
        return await self.inner.epoch()

    async def aclose(self) -> None:
        pass


@pytest.fixture
def pinned_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The buffer's wall clock reads WALL0 at its start (and then moves with the loop)."""
    monkeypatch.setattr("analytics_buffer._clock.time.time", lambda: WALL0 + 0.0)


def make_buffer(
    tmp_path: Path,
    rollups: MemoryRollups,
    store: Any = None,
    **changes: Any,
) -> AnalyticsBuffer:
    settings = Settings(
        data_dir=str(tmp_path),
        counter_tick=TICK,
        rollup_interval=ROLLUP,
        flush_interval=3600.0,
        max_restarts=10,
        **changes,
    )
    return AnalyticsBuffer(settings, sink=MemorySink(), counter_store=store, rollups=rollups)


@pytest.fixture
async def started_at(pinned_wall_clock: None) -> float:
    """The loop time at which the wall clock reads WALL0."""
    return anyio.current_time()


async def sleep_until(start: float, seconds: float) -> None:
    """Let virtual time reach ``start + seconds`` exactly."""
    await anyio.sleep(start + seconds - anyio.current_time())


async def just_after(start: float, seconds: float) -> None:
    """Let virtual time pass ``start + seconds``, so the timers due then have fired."""
    await sleep_until(start, seconds + 0.01)


async def test_a_profile_is_live_until_exactly_the_window_edge(
    tmp_path: Path, started_at: float
) -> None:
    async with make_buffer(tmp_path, MemoryRollups()) as buffer:
        for event in [at(0, profile="u1"), at(100, profile="u2"), at(-400, profile="old")]:
            assert buffer.track(event)
        buffer.track(at(0, profile="u1", project="p2"))
        buffer.track(at(50, profile=""))  # counted, but no visitor
        assert await buffer.active_visitors("p1") == 1  # u2 is dated 100 s ahead
        assert await buffer.active_visitors("p2") == 1
        await sleep_until(started_at, 100)
        assert await buffer.active_visitors("p1") == 2
        await sleep_until(started_at, 299.999)
        assert await buffer.active_visitors("p1") == 2
        await sleep_until(started_at, 300)
        assert await buffer.active_visitors("p1") == 1  # u1 is out at the edge
        assert await buffer.active_visitors("p2") == 0
        await sleep_until(started_at, 399.5)
        assert await buffer.active_visitors("p1") == 1
        buffer.track(at(399, profile="u1"))  # seen again
        assert await buffer.active_visitors("p1") == 2
        await sleep_until(started_at, 400)
        assert await buffer.active_visitors("p1") == 1
        await sleep_until(started_at, 699)
        assert await buffer.active_visitors("p1") == 0
        assert await buffer.active_visitors("nobody") == 0


async def test_a_tick_writes_the_store_once_for_many_events(
    tmp_path: Path, started_at: float
) -> None:
    store = CountingStore()
    async with make_buffer(tmp_path, MemoryRollups(), store) as buffer:
        for i in range(5000):
            buffer.track(at(i % 7200, ("signup", "click")[i % 2], profile=f"u{i % 100}"))
        assert store.applies == []
        await just_after(started_at, TICK)
        assert store.applies == [5000]  # one apply (one Redis round trip) for 5000 events
        assert buffer.stats().counted == 5000
        await just_after(started_at, 10 * TICK)
        assert store.applies == [5000]  # nothing new: nothing sent
        hours = await buffer.hourly_counts("p1", "signup", DAY0)
        assert sum(hours.values()) == await buffer.count("p1", "signup", DAY0) == 2500
        assert (hours[12], hours[13]) == (1800, 700)  # created 0-3599 s and 3600-4999 s


async def test_reads_stay_exact_through_rollups(tmp_path: Path, started_at: float) -> None:
    rollups = MemoryRollups()
    async with make_buffer(tmp_path, rollups) as buffer:
        expected = 0
        for step in range(5):
            for _ in range(3):
                buffer.track(at(step))
                expected += 1
                assert await buffer.count("p1", "signup", DAY0) == expected
            await just_after(started_at, ROLLUP * (step + 1))
            assert len(rollups.rollups) == step + 1  # the counts moved to ClickHouse...
            assert await buffer.count("p1", "signup", DAY0) == expected  # ...and still count
            assert (await buffer.hourly_counts("p1", "signup", DAY0))[12] == expected
        assert buffer.stats().counter_rollups == 5


async def test_a_failed_rollup_is_written_again_under_the_same_identity(
    tmp_path: Path, started_at: float
) -> None:
    rollups = MemoryRollups()
    rollups.fail_next = 1
    async with make_buffer(tmp_path, rollups) as buffer:
        buffer.track(at(0))
        await just_after(started_at, ROLLUP)
        assert rollups.rollups == {}
        assert await buffer.count("p1", "signup", DAY0) == 1  # still staged
        buffer.track(at(1))
        rollups.lose_reply_next = 1  # stored, but the writer cannot know
        await just_after(started_at, 2 * ROLLUP)
        assert len(rollups.rollups) == 1
        assert await buffer.count("p1", "signup", DAY0) == 2
        await just_after(started_at, 3 * ROLLUP)
        # The staged rollup was written again (same identity), then the new counts.
        assert len(rollups.rollups) == 2
        assert await buffer.count("p1", "signup", DAY0) == 2
        assert rollups.writes == 4


async def test_a_crash_inside_a_rollup_is_finished_by_the_restarted_actor(
    tmp_path: Path, started_at: float
) -> None:
    rollups = MemoryRollups()
    rollups.crash_next = 1
    async with make_buffer(tmp_path, rollups) as buffer:
        for _ in range(4):
            buffer.track(at(0))
        await just_after(started_at, ROLLUP)
        assert buffer.stats().restarts == 1
        assert len(rollups.rollups) == 1  # the new instance finished the staged rollup
        buffer.track(at(0))
        assert await buffer.count("p1", "signup", DAY0) == 5


async def test_the_memory_store_is_rolled_up_at_shutdown(tmp_path: Path, started_at: float) -> None:
    rollups = MemoryRollups()
    async with make_buffer(tmp_path, rollups) as buffer:
        for i in range(7):
            buffer.track(at(i * 600))
    assert sum(counts.get(f, 0) for counts in rollups.rollups.values() for f in counts) == 14
    async with make_buffer(tmp_path, rollups) as buffer:
        buffer.track(at(0))
        assert await buffer.count("p1", "signup", DAY0) == 8
        assert (await buffer.hourly_counts("p1", "signup", DAY0))[12] == 7


async def test_while_the_store_is_down_counts_wait_in_memory_and_reads_refuse(
    tmp_path: Path, started_at: float
) -> None:
    store = CountingStore()
    rollups = MemoryRollups()
    async with make_buffer(tmp_path, rollups, store, max_counter_keys=50) as buffer:
        buffer.track(at(0))
        await just_after(started_at, TICK)
        store.down = True
        for i in range(10):
            buffer.track(at(i * 3600.0, profile=f"u{i}"))
        await just_after(started_at, 2 * TICK)
        stats = buffer.stats()
        assert stats.counters_degraded
        assert stats.counter_keys_held == 10 + 10  # 10 hours, 10 visitors
        with pytest.raises(StoreUnavailable):
            await buffer.count("p1", "signup", DAY0)
        with pytest.raises(StoreUnavailable):
            await buffer.active_visitors("p1")
        # Past max_counter_keys, the counters go from memory straight to ClickHouse.
        for i in range(60):
            buffer.track(at(i * 3600.0 + 1800, "click"))
        await just_after(started_at, 3 * TICK)
        assert len(rollups.rollups) == 1
        store.down = False
        await just_after(started_at, 4 * TICK)
        assert not buffer.stats().counters_degraded
        assert buffer.stats().counter_keys_held == 0
        assert await buffer.count("p1", "signup", DAY0) == 1 + 10
        assert await buffer.count("p1", "click", DAY0) == 12
        total = 0
        for day in range(4):
            total += await buffer.count("p1", "click", DAY0 + timedelta(days=day))
        assert total == 60
        assert await buffer.active_visitors("p1") == 1  # u0: the others are dated hours ahead


async def test_counts_held_while_the_store_is_down_are_rolled_up_at_shutdown(
    tmp_path: Path, started_at: float
) -> None:
    store = CountingStore()
    rollups = MemoryRollups()
    async with make_buffer(tmp_path, rollups, store) as buffer:
        store.down = True
        buffer.track(at(0))
        await just_after(started_at, TICK)
        assert buffer.stats().counters_degraded
        # Tracked after the failed apply: only these are known to be in no store.
        for i in range(5):
            buffer.track(at(i * 3600.0, profile=f"u{i}"))
    assert store.applies == []
    (counts,) = rollups.rollups.values()
    assert sum(count for field, count in counts.items() if field[0] == "d") == 5


async def test_bad_read_arguments_are_refused_with_a_clear_error(
    tmp_path: Path, started_at: float
) -> None:
    async with make_buffer(tmp_path, MemoryRollups()) as buffer:
        with pytest.raises(InvalidArgument, match=r"datetime\.date, got a datetime"):
            await buffer.count("p1", "signup", datetime(2024, 5, 1, tzinfo=UTC))
        with pytest.raises(InvalidArgument, match="day must be"):
            await buffer.hourly_counts("p1", "signup", "2024-05-01")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="name must be a non-empty string"):
            await buffer.count("p1", "", DAY0)
        with pytest.raises(InvalidArgument, match="project_id"):
            await buffer.active_visitors("")
        with pytest.raises(InvalidArgument, match="profile_id"):
            await buffer.last_screen_view("p1", 7)  # type: ignore[arg-type]
