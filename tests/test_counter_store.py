"""The CounterStore contract, run against both stores; then what only Redis has.

``MemoryCounterStore`` is the reference: every contract test runs on it and
on ``RedisCounterStore`` against a real ``redis-server``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from analytics_buffer._counter_store import CounterStore, MemoryCounterStore
from analytics_buffer._exceptions import StoreUnavailable
from analytics_buffer._redis_counters import RedisCounterStore
from analytics_buffer.testing import RedisServer
from test_session_store import cluster_redis as cluster_redis  # a module-scoped fixture

pytestmark = pytest.mark.anyio

NOW = 1_714_564_800.0
WINDOW = 300.0
A, B, C = "h1|2:p1|signup", "d1|2:p1|signup", "h2|2:p1|click"


@pytest.fixture(
    params=[pytest.param("memory"), pytest.param("redis", marks=pytest.mark.integration)]
)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CounterStore]:
    if request.param == "memory":
        yield MemoryCounterStore()
        return
    redis_store = RedisCounterStore(request.getfixturevalue("redis_url"))
    try:
        yield redis_store
    finally:
        await redis_store.aclose()


async def apply(
    store: CounterStore,
    increments: dict[str, int],
    seen: dict[str, dict[str, float]] | None = None,
    *,
    seq: int,
    writer: str = "w1",
    now: float = NOW,
) -> None:
    await store.apply(increments, seen or {}, writer=writer, seq=seq, now=now, window=WINDOW)


async def test_applies_add_up_and_a_repeated_seq_counts_once(store: CounterStore) -> None:
    await apply(store, {A: 2, B: 2}, seq=1)
    await apply(store, {A: 2, B: 2}, seq=1)  # the retry of an apply that got through
    await apply(store, {A: 1, C: 5}, seq=2)
    await apply(store, {A: 100}, seq=1)  # older than the last one applied
    await apply(store, {A: 3}, seq=1, writer="w2")  # another writer has its own sequence
    snapshot = await store.snapshot([A, B, C, "h9|2:p1|nothing"])
    assert snapshot.counts == {A: 6, B: 2, C: 5}
    assert (snapshot.staged_id, snapshot.epoch) == (None, 0)


async def test_a_visitor_counts_until_exactly_the_window_edge(store: CounterStore) -> None:
    await apply(store, {}, {"p1": {"u1": NOW - 10, "u2": NOW - 1}, "p2": {"u1": NOW}}, seq=1)
    assert await store.active_visitors("p1", NOW - WINDOW, NOW) == 2
    assert await store.active_visitors("p2", NOW - WINDOW, NOW) == 1
    assert await store.active_visitors("p3", NOW - WINDOW, NOW) == 0
    # At since == last seen the profile no longer counts (the edge is exclusive)...
    assert await store.active_visitors("p1", NOW - 10, NOW) == 1
    assert await store.active_visitors("p1", NOW - 1, NOW) == 0
    # ... and one dated after until does not count yet.
    assert await store.active_visitors("p1", NOW - WINDOW, NOW - 2) == 1
    assert await store.active_visitors("p1", NOW - WINDOW, NOW - 1) == 2


async def test_a_visitor_time_only_moves_forward_and_old_ones_are_forgotten(
    store: CounterStore,
) -> None:
    await apply(store, {}, {"p1": {"u1": NOW}}, seq=1)
    await apply(store, {}, {"p1": {"u1": NOW - 100}}, seq=2)  # a late, older event
    assert await store.active_visitors("p1", NOW - 1, NOW) == 1
    later = NOW + WINDOW + 5
    await apply(store, {}, {"p1": {"u2": later}}, seq=3, now=later)
    assert await store.active_visitors("p1", float("-inf"), later) == 1  # u1 was pruned


async def test_stage_moves_the_live_counters_and_increments_go_on_for_the_next(
    store: CounterStore,
) -> None:
    assert await store.stage("r1") is None  # nothing to stage
    await apply(store, {A: 2, B: 2}, seq=1)
    staged = await store.stage("r1")
    assert staged is not None
    assert (staged.id, staged.counts) == ("r1", {A: 2, B: 2})
    await apply(store, {A: 1}, seq=2)  # arrives during the rollup
    snapshot = await store.snapshot([A, B])
    assert snapshot.counts == {A: 3, B: 2}
    assert (snapshot.staged_id, snapshot.epoch) == ("r1", 1)
    assert await store.epoch() == 1
    # A stage while one is staged hands out the staged one: a restart finishes it.
    again = await store.stage("r2")
    assert again is not None
    assert (again.id, again.counts) == ("r1", {A: 2, B: 2})
    assert await store.staged() == again
    assert not await store.unstage("r2")  # fenced: not the staged identity
    assert await store.unstage("r1")
    assert not await store.unstage("r1")
    assert await store.staged() is None
    assert (await store.snapshot([A, B])).counts == {A: 1}
    fresh = await store.stage("r3")
    assert fresh is not None
    assert (fresh.id, fresh.counts, await store.epoch()) == ("r3", {A: 1}, 2)


# -- Redis only ---------------------------------------------------------------------------


@pytest.mark.integration
async def test_every_key_shares_one_slot_and_has_a_ttl(redis_url: str) -> None:
    store = RedisCounterStore(redis_url, prefix="ab", retention=3600.0)
    client = Redis.from_url(redis_url)
    try:
        await apply(store, {A: 1}, {"p1": {"u1": NOW}, "p2": {"u2": NOW}}, seq=1)
        assert await store.stage("r1") is not None
        await apply(store, {A: 1}, seq=2)
        keys = [key if isinstance(key, str) else key.decode() for key in await client.keys("*")]
        assert len(keys) == 7  # live, staged, staged_id, epoch, applied, two visitor sets
        assert {key_slot(key.encode()) for key in keys} == {key_slot(b"{ab:counters}")}
        for key in keys:
            ttl = await client.pttl(key)
            limit = WINDOW * 1000 if ":visitors:" in key else 3_600_000
            assert 0 < ttl <= limit, key
    finally:
        await client.aclose()
        await store.aclose()


@pytest.mark.integration
async def test_a_lost_script_cache_is_reloaded(redis_url: str) -> None:
    store = RedisCounterStore(redis_url)
    client = Redis.from_url(redis_url)
    try:
        await apply(store, {A: 1}, seq=1)
        await client.script_flush()
        await apply(store, {A: 1}, seq=2)
        await client.script_flush()
        staged = await store.stage("r1")
        assert staged is not None
        assert staged.counts == {A: 2}
        await client.script_flush()
        assert await store.unstage("r1")
    finally:
        await client.aclose()
        await store.aclose()


@pytest.mark.integration
async def test_an_unreachable_redis_is_store_unavailable(private_redis: RedisServer) -> None:
    store = RedisCounterStore(private_redis.url, socket_timeout=1.0)
    try:
        await apply(store, {A: 1}, seq=1)
        private_redis.kill()
        with pytest.raises(StoreUnavailable):
            await apply(store, {A: 1}, seq=2)
        with pytest.raises(StoreUnavailable):
            await store.snapshot([A])
        with pytest.raises(StoreUnavailable):
            await store.stage("r1")
    finally:
        await store.aclose()


@pytest.mark.integration
async def test_every_script_and_command_stays_in_one_slot_on_a_cluster(
    cluster_redis: RedisServer,
) -> None:
    # The scripts' #!lua flags make a cluster node refuse any key outside the slot
    # of their first key: the whole life of a rollup runs without a refusal.
    store = RedisCounterStore(cluster_redis.url)
    try:
        await apply(store, {A: 2}, {"p1": {"u1": NOW}}, seq=1)
        staged = await store.stage("r1")
        assert staged is not None
        assert staged.counts == {A: 2}
        await apply(store, {A: 1}, seq=2)
        assert (await store.snapshot([A])).counts == {A: 3}
        assert await store.staged() == staged
        assert await store.unstage("r1")
        assert await store.active_visitors("p1", NOW - WINDOW, NOW) == 1
        assert await store.epoch() == 1
    finally:
        await store.aclose()
