"""A Hypothesis state machine for counters, through real Redis and ClickHouse 18.16.

The buffer runs on asyncio in a blocking portal (redis-py and asynch need
asyncio, so no virtual clock here): ``counter_tick`` and
``rollup_interval`` are an hour, so nothing happens unless a rule asks.
Rules track events, read counts, roll up, make a rollup fail or crash at
each of its steps, and restart the buffer; the model is the exact count of
every ``(project, name, day)`` and hour tracked so far. Every read must
equal it, whatever happened before.

Faults, one at a time and one-shot:

* ``after_stage``: the store staged the live counters, then the actor
  crashes (a plain ``RuntimeError`` from a timer's rollup, so the
  supervisor restarts it; the new instance finishes the staged rollup);
* ``after_write``: ClickHouse stored the rollup, then the actor crashes
  before unstaging it (it is written again under the same identity);
* ``lost_reply``: ClickHouse stored it but the write reports a transient
  failure, as a broken connection would; the rollup stays staged;
* ``refused``: ClickHouse did not store it (transient failure).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from analytics_buffer import AnalyticsBuffer, Event, Settings, TransientSinkError
from analytics_buffer._clickhouse import ClickHouseSink
from analytics_buffer._counter_actor import _ROLLUP, COUNTER_ROLLUP
from analytics_buffer._counter_store import Snapshot, Staged
from analytics_buffer._redis_counters import RedisCounterStore
from analytics_buffer._rollup import SinkRollups
from analytics_buffer.testing import ClickHouseServer, RedisServer
from virtual_time import hold_open

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DAY0: Final = date(2024, 5, 1)
T0: Final = datetime(2024, 5, 1, tzinfo=UTC)
PROJECTS: Final = ("p1", "p2")
NAMES: Final = ("signup", "click")
FAULTS: Final = ("after_stage", "after_write", "lost_reply", "refused")


class FaultyStore:
    """The Redis store, crashing once right after staging when armed."""

    def __init__(self, inner: RedisCounterStore) -> None:
        self.inner = inner
        self.crash_after_stage = False

    async def apply(self, *args: Any, **kwargs: Any) -> None:
        await self.inner.apply(*args, **kwargs)

    async def active_visitors(self, project_id: str, since: float, until: float) -> int:
        return await self.inner.active_visitors(project_id, since, until)

    async def stage(self, rollup_id: str) -> Staged | None:
        staged = await self.inner.stage(rollup_id)
        if self.crash_after_stage:
            self.crash_after_stage = False
            raise RuntimeError("crash after stage")
        return staged

    async def staged(self) -> Staged | None:
        return await self.inner.staged()

    async def unstage(self, rollup_id: str) -> bool:
        return await self.inner.unstage(rollup_id)

    async def snapshot(self, fields: Sequence[str]) -> Snapshot:
        return await self.inner.snapshot(fields)

    async def epoch(self) -> int:
        return await self.inner.epoch()

    async def aclose(self) -> None:
        await self.inner.aclose()


class FaultyRollups:
    """The real counters table, with one armed fault around a write."""

    def __init__(self, inner: SinkRollups) -> None:
        self.inner = inner
        self.fault: str | None = None

    async def write(self, rollup: Staged) -> None:
        fault, self.fault = self.fault, None
        if fault == "refused":
            raise TransientSinkError("connection refused")
        await self.inner.write(rollup)
        if fault == "after_write":
            raise RuntimeError("crash after write")
        if fault == "lost_reply":
            raise TransientSinkError("connection reset", possibly_persisted=True)

    async def totals(self, *args: Any) -> dict[str, int]:
        return await self.inner.totals(*args)


class CountersMachine(RuleBasedStateMachine):
    clickhouse: ClickHouseServer
    redis: RedisServer
    data_dir: Path

    def __init__(self) -> None:
        super().__init__()
        self.database = f"t_{uuid.uuid4().hex}"
        self.clickhouse.query(f"CREATE DATABASE {self.database}")
        self.redis.flushall()
        self.settings = Settings(
            clickhouse_url=self.clickhouse.url_for(self.database),
            redis_url=self.redis.url,
            data_dir=str(self.data_dir),
            counter_tick=3600.0,
            rollup_interval=3600.0,
            flush_interval=3600.0,
            max_restarts=1000,
        )
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal("asyncio")
        self.portal = self._portal_cm.__enter__()
        self.rollup_sink = ClickHouseSink(self.settings)
        self.rollups = FaultyRollups(SinkRollups(self.rollup_sink, "events_counters"))
        self.model: dict[tuple[str, str, int], int] = {}
        """(project, name, hour since T0) -> count."""
        self.buffer: AnalyticsBuffer | None = None
        self.store: FaultyStore | None = None
        self._lifetime: Future[None] | None = None
        self._stop: anyio.Event | None = None
        self.start()

    # -- plumbing --------------------------------------------------------------------

    def start(self) -> None:
        self.store = FaultyStore(RedisCounterStore(self.redis.url))
        buffer = self.buffer = AnalyticsBuffer(
            self.settings, counter_store=self.store, rollups=self.rollups
        )
        self._lifetime, self._stop = self.portal.start_task(hold_open, buffer)

    def stop(self) -> None:
        assert self._stop is not None
        assert self._lifetime is not None
        self.portal.call(self._stop.set)
        self._lifetime.result(timeout=60)

    def the_buffer(self) -> AnalyticsBuffer:
        assert self.buffer is not None
        return self.buffer

    def expected(self, project: str, name: str, day: int) -> list[int]:
        hours = [self.model.get((project, name, day * 24 + h), 0) for h in range(24)]
        return [sum(hours), *hours]

    def wait_for_restart(self, restarts: int) -> None:
        async def wait() -> None:
            with anyio.fail_after(30):
                while self.the_buffer().stats().restarts <= restarts:  # noqa: ASYNC110
                    await anyio.sleep(0.005)  # (a counter has no event to wait on)

        self.portal.call(wait)

    # -- rules -----------------------------------------------------------------------

    @rule(
        events=st.lists(
            st.tuples(st.sampled_from(PROJECTS), st.sampled_from(NAMES), st.integers(0, 47)),
            min_size=1,
            max_size=30,
        )
    )
    def track(self, events: list[tuple[str, str, int]]) -> None:
        def track_all() -> None:
            for project, name, hour in events:
                created = T0 + timedelta(hours=hour, seconds=hour * 7 % 3600)
                event = Event(name=name, project_id=project, profile_id="u1", created_at=created)
                assert self.the_buffer().track(event)

        self.portal.call(track_all)
        for key in events:
            self.model[key] = self.model.get(key, 0) + 1

    @rule()
    def read(self) -> None:
        """Every count and hourly count the model knows, and a few it does not."""

        async def read_all() -> dict[tuple[str, str, int], list[int]]:
            buffer = self.the_buffer()
            found = {}
            for project in (*PROJECTS, "p3"):
                for name in NAMES:
                    for day in (0, 1):
                        on = DAY0 + timedelta(days=day)
                        total = await buffer.count(project, name, on)
                        hours = await buffer.hourly_counts(project, name, on)
                        assert list(hours) == list(range(24))
                        found[project, name, day] = [total, *hours.values()]
            return found

        for (project, name, day), counts in self.portal.call(read_all).items():
            assert counts == self.expected(project, name, day), (project, name, day)

    @rule()
    def rollup(self) -> None:
        self.portal.call(self.the_buffer()._counters_ref.call, COUNTER_ROLLUP)

    @rule(fault=st.sampled_from(FAULTS))
    def fault_in_a_rollup(self, fault: str) -> None:
        # One event first, so that the rollup has something to stage and write.
        self.track([("p1", "signup", 0)])
        buffer = self.the_buffer()
        restarts = buffer.stats().restarts
        if fault == "after_stage":
            assert self.store is not None
            self.store.crash_after_stage = True
        else:
            self.rollups.fault = fault
        if fault in ("after_stage", "after_write"):
            # A timer's rollup: the crash reaches the supervisor, which restarts the actor.
            self.portal.call(buffer._counters_ref.info, _ROLLUP)
            self.wait_for_restart(restarts)
        else:
            self.portal.call(buffer._counters_ref.call, COUNTER_ROLLUP)
        assert self.rollups.fault is None
        assert self.store is None or not self.store.crash_after_stage

    @rule()
    def restart(self) -> None:
        self.stop()
        self.start()

    def teardown(self) -> None:
        try:
            self.stop()
            # After a last restart, every count is still exact.
            self.start()
            self.read()
            self.stop()
            self.portal.call(self.rollup_sink.aclose)
        finally:
            self._portal_cm.__exit__(None, None, None)
            self.clickhouse.query(f"DROP DATABASE IF EXISTS {self.database}")


def test_counts_are_exact_through_rollups_faults_and_restarts(
    clickhouse_server: ClickHouseServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    class Machine(CountersMachine):
        clickhouse = clickhouse_server
        redis = redis_server
        data_dir = tmp_path

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=30,
            stateful_step_count=20,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            report_multiple_bugs=False,
        ),
    )
