"""The SessionStore contract, run against both stores; then what only Redis has.

``MemorySessionStore`` is the reference: every contract test runs on it and on
``RedisSessionStore`` against a real ``redis-server``. The Redis-only tests
cover exclusive claims between instances, lease expiry and fencing, hash
tags (on a ``redis-server`` in cluster mode, which refuses a script that
touches two slots), and a server that is killed, paused and restarted.
"""

from __future__ import annotations

import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import msgspec
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.crc import key_slot

from analytics_buffer import Event
from analytics_buffer._exceptions import StoreUnavailable
from analytics_buffer._redis_sessions import INLINE_WRITTEN, RedisSessionStore, session_key
from analytics_buffer._session_store import (
    Claim,
    MemorySessionStore,
    SessionKey,
    SessionOutcome,
    SessionStore,
    SessionWork,
    shard_of,
)
from analytics_buffer._sessions import MAX_HISTORY, SCREEN_VIEW, SESSION_END, epoch_ms
from analytics_buffer.testing import RedisServer, ServerUnavailable

pytestmark = pytest.mark.anyio

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
NOW = 1_714_564_800.25
TIMEOUT = 1800.0
KEY: SessionKey = ("p1", "s1")


def event(
    name: str = SCREEN_VIEW,
    *,
    at: float = 0.0,
    session: str = "s1",
    project: str = "p1",
    profile: str = "u1",
    path: str = "",
) -> Event:
    """An event of ``session`` created ``at`` seconds after T0."""
    return Event(
        name=name,
        project_id=project,
        session_id=session,
        profile_id=profile,
        created_at=T0 + timedelta(seconds=at),
        path=path,
    )


@pytest.fixture(
    params=[
        pytest.param("memory"),
        pytest.param("redis", marks=pytest.mark.integration),
    ]
)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SessionStore]:
    if request.param == "memory":
        yield MemorySessionStore()
        return
    redis_store = RedisSessionStore(request.getfixturevalue("redis_url"))
    try:
        yield redis_store
    finally:
        await redis_store.aclose()


async def claim_all(
    store: SessionStore, now: float = NOW
) -> tuple[list[Claim], dict[SessionKey, SessionWork]]:
    claims = await store.claim("test", now, timeout=TIMEOUT, lease=30.0, limit=64)
    return claims, {work.key: work for claim in claims for work in claim.sessions}


async def settle_all(
    store: SessionStore, now: float = NOW, *, write: bool = True, end: bool = False
) -> dict[SessionKey, SessionWork]:
    """Claim everything and complete it: pending written (or kept), sessions ended or not."""
    claims, works = await claim_all(store, now)
    for claim in claims:
        outcomes = []
        for work in claim.sessions:
            state = msgspec.structs.replace(work.state, ended=work.state.ended or end)
            written = [item.id for item in work.pending] if write else []
            outcomes.append(SessionOutcome(key=work.key, state=state, written=written))
        assert await store.complete(claim, outcomes)
    return works


def ids(events: Sequence[Event]) -> list[str]:
    return [str(item.id) for item in events]


# -- the contract -------------------------------------------------------------------


async def test_claim_returns_dirty_sessions_with_their_pending_events(store: SessionStore) -> None:
    first, second = event(at=5), event(at=1)
    end = event(SESSION_END, at=9)
    other = event(session="s2", at=3)
    click = event("click", at=2)
    await store.add([first, click, second, first], NOW)
    await store.add([end, other, second], NOW + 1)

    claims, works = await claim_all(store)

    assert set(works) == {KEY, ("p1", "s2")}
    assert {claim.shard for claim in claims} == {shard_of(key, 16) for key in works}
    for claim in claims:
        assert all(shard_of(work.key, 16) == claim.shard for work in claim.sessions)
    # Each id once, in arrival order; regular events are activity only.
    assert ids(works[KEY].pending) == ids([first, second, end])
    assert works[KEY].pending[0] == first
    assert ids(works["p1", "s2"].pending) == ids([other])
    assert not any(work.idle for work in works.values())
    assert len({claim.token for claim in claims}) == len(claims)
    # The dirty marks went with the claim.
    assert await store.claim("test", NOW, timeout=TIMEOUT, lease=30.0, limit=64) == []


async def test_a_resent_pending_event_keeps_its_place_and_takes_the_new_value(
    store: SessionStore,
) -> None:
    first, second = event(at=1, path="/a"), event(at=1, path="/b")
    await store.add([first, second], NOW)
    await settle_all(store, write=False)

    again = msgspec.structs.replace(first, path="/a2")
    await store.add([again], NOW + 1)

    _, works = await claim_all(store, NOW + 1)
    assert works[KEY].pending == [again, second]


async def test_state_keeps_the_bounds_of_all_events(store: SessionStore) -> None:
    await store.add([event("click", at=10, profile="")], NOW)
    await store.add([event(at=5, profile="u1"), event(at=20, profile="u2")], NOW + 7.5)
    await store.add([event(at=12, profile="u3")], NOW + 2)

    _, works = await claim_all(store, NOW + 10)

    state = works[KEY].state
    assert (state.project_id, state.session_id) == KEY
    assert state.first_ms == epoch_ms(T0 + timedelta(seconds=5))
    assert state.last_activity_ms == epoch_ms(T0 + timedelta(seconds=20))
    assert state.last_seen == NOW + 7.5
    assert state.profile_id == "u1"
    assert (state.screen_views, state.ended) == (0, False)


async def test_a_written_event_is_not_pending_again(store: SessionStore) -> None:
    written = event(at=1)
    await store.add([written], NOW)
    await settle_all(store)

    fresh = event(at=2)
    await store.add([written, fresh], NOW + 1)

    _, works = await claim_all(store, NOW + 1)
    assert ids(works[KEY].pending) == ids([fresh])


async def test_complete_removes_written_events_and_stores_the_state(store: SessionStore) -> None:
    kept, gone = event(at=2), event(at=1)
    await store.add([kept, gone], NOW)
    claims, works = await claim_all(store)
    state = msgspec.structs.replace(works[KEY].state, screen_views=3)
    outcome = SessionOutcome(key=KEY, state=state, written=[gone.id])
    (claim,) = claims
    assert await store.complete(claim, [outcome])

    await store.add([event("click", at=3)], NOW + 1)
    await store.add([event(session="s1", at=4)], NOW + 1)
    _, works = await claim_all(store, NOW + 1)

    assert works[KEY].state.screen_views == 3
    assert ids(works[KEY].pending)[0] == str(kept.id)
    assert str(gone.id) not in ids(works[KEY].pending)


async def test_a_long_session_never_takes_a_written_event_again(store: SessionStore) -> None:
    views = [event(at=at) for at in range(700)]
    for start in range(0, 700, 350):
        await store.add(views[start : start + 350], NOW)
        await settle_all(store)

    fresh = event(at=800)
    await store.add([*views, fresh], NOW + 1)

    _, works = await claim_all(store, NOW + 1)
    assert ids(works[KEY].pending) == ids([fresh])
    assert works[KEY].state.first_ms == epoch_ms(T0)


async def test_idle_sessions_are_claimed_as_idle(store: SessionStore) -> None:
    waiting = event(at=1)
    await store.add([waiting], NOW)
    await store.add([event("click", session="quiet", at=1)], NOW)
    await settle_all(store, write=False)

    # Not idle yet, and nothing new: no work.
    assert await store.claim("test", NOW + TIMEOUT - 0.5, timeout=TIMEOUT, lease=30, limit=64) == []

    _, works = await claim_all(store, NOW + TIMEOUT)
    assert set(works) == {KEY, ("p1", "quiet")}
    assert all(work.idle for work in works.values())
    assert ids(works[KEY].pending) == ids([waiting])
    assert works["p1", "quiet"].pending == []


async def test_ended_sessions_are_not_idle_candidates_again(store: SessionStore) -> None:
    await store.add([event(at=1)], NOW)
    works = await settle_all(store, NOW + TIMEOUT, end=True)
    assert works[KEY].idle

    assert await store.claim("test", NOW + 10 * TIMEOUT, timeout=TIMEOUT, lease=30, limit=64) == []

    # A late arrival is claimed (to be written as it is), never as idle.
    late = event(at=2)
    await store.add([late], NOW + 3 * TIMEOUT)
    _, works = await claim_all(store, NOW + 10 * TIMEOUT)
    assert ids(works[KEY].pending) == ids([late])
    assert works[KEY].state.ended
    assert works[KEY].state.last_seen == NOW + 3 * TIMEOUT
    assert not works[KEY].idle


async def test_history_is_sorted_and_trimmed(store: SessionStore) -> None:
    views = [event(at=at, path=f"/{at}") for at in (3, 1, 2)]
    await store.add(views[:1], NOW)
    await store.add(views[1:], NOW)
    await store.add([event("click", session="clicks-only", at=1)], NOW)

    found = await store.history([KEY, ("p1", "clicks-only"), ("p1", "unknown")])

    assert [mark.path for mark in found[KEY]] == ["/1", "/2", "/3"]
    assert found[KEY][0].id == views[1].id
    assert found[KEY][0].created_ms == epoch_ms(views[1].created_at)
    assert found["p1", "clicks-only"] == []
    assert ("p1", "unknown") not in found

    many = [event(session="long", at=at, path=f"/{at}") for at in range(MAX_HISTORY + 5)]
    await store.add(many[::-1], NOW)
    (long,) = (await store.history([("p1", "long")])).values()
    assert len(long) == MAX_HISTORY
    assert [mark.path for mark in long] == [f"/{at}" for at in range(5, MAX_HISTORY + 5)]


async def test_a_settled_long_history_keeps_the_latest(store: SessionStore) -> None:
    count = 2 * MAX_HISTORY
    views = [event(at=at, path=f"/{at}") for at in range(count)]
    for start in range(0, count, 250):
        # Newest first within each add: arrival order is not event order.
        await store.add(views[start : start + 250][::-1], NOW)
        await settle_all(store, write=False)

    (history,) = (await store.history([KEY])).values()
    assert [mark.path for mark in history] == [f"/{at}" for at in range(MAX_HISTORY, count)]


async def test_last_screen_view_is_the_newest_by_created_at(store: SessionStore) -> None:
    middle, newest, oldest = event(at=20), event(at=30), event(at=10)
    assert await store.last_screen_view("p1", "u1") is None

    await store.add([middle], NOW)
    await store.add([oldest, event("click", at=40)], NOW + 1)
    assert await store.last_screen_view("p1", "u1") == middle

    await store.add([event(at=25), newest, event(at=5)], NOW + 2)
    assert await store.last_screen_view("p1", "u1") == newest
    assert await store.last_screen_view("p1", "u2") is None
    assert await store.last_screen_view("p2", "u1") is None


async def test_cleanup_removes_only_ended_stale_sessions_without_pending(
    store: SessionStore,
) -> None:
    retention = 3600.0
    await store.add([event(session=name, at=1) for name in ("gone", "late", "open")], NOW)
    await store.add([event(session="recent", at=1)], NOW + retention)
    claims, _ = await claim_all(store, NOW)
    for claim in claims:
        outcomes = [
            SessionOutcome(
                key=work.key,
                state=msgspec.structs.replace(work.state, ended=work.key[1] != "open"),
                written=[item.id for item in work.pending],
            )
            for work in claim.sessions
        ]
        assert await store.complete(claim, outcomes)
    # Ended, stale, but with an event still to write.
    late = event(session="late", at=2)
    await store.add([late], NOW)

    assert await store.cleanup(NOW + retention + 0.5, retention) == 1
    assert await store.cleanup(NOW + retention + 0.5, retention) == 0

    found = await store.history([("p1", name) for name in ("gone", "late", "open", "recent")])
    assert set(found) == {("p1", "late"), ("p1", "open"), ("p1", "recent")}
    # A forgotten session that comes back starts afresh.
    again = event(session="gone", at=5)
    await store.add([again], NOW + retention + 2)
    _, works = await claim_all(store, NOW + retention + 2)
    assert not works["p1", "gone"].state.ended
    assert ids(works["p1", "gone"].pending) == ids([again])
    assert ids(works["p1", "late"].pending) == ids([late])


# -- Redis only ---------------------------------------------------------------------


@pytest.fixture
async def two_stores(redis_url: str) -> AsyncIterator[tuple[RedisSessionStore, RedisSessionStore]]:
    first, second = RedisSessionStore(redis_url), RedisSessionStore(redis_url)
    try:
        yield first, second
    finally:
        await first.aclose()
        await second.aclose()


def spread_events(sessions: int = 64) -> list[Event]:
    return [event(session=f"s{number}", at=number) for number in range(sessions)]


async def test_two_claimers_never_hold_the_same_shard(
    two_stores: tuple[RedisSessionStore, RedisSessionStore],
) -> None:
    first, second = two_stores
    await first.add(spread_events(), NOW)
    got: dict[str, list[Claim]] = {}

    async def take(name: str, store: RedisSessionStore) -> None:
        got[name] = await store.claim(name, NOW, timeout=TIMEOUT, lease=30, limit=16)

    async with anyio.create_task_group() as group:
        group.start_soon(take, "a", first)
        group.start_soon(take, "b", second)

    shards_a = {claim.shard for claim in got["a"]}
    shards_b = {claim.shard for claim in got["b"]}
    assert not shards_a & shards_b
    assert shards_a | shards_b == {shard_of(("p1", f"s{n}"), 16) for n in range(64)}
    keys = [work.key for claim in got["a"] + got["b"] for work in claim.sessions]
    assert len(keys) == len(set(keys)) == 64
    # While held, nobody else gets them, even with new events.
    await second.add([event(session="s0", at=100)], NOW)
    assert await second.claim("c", NOW, timeout=TIMEOUT, lease=30, limit=16) == []


async def test_a_claim_that_limits_shards_takes_only_that_many(
    two_stores: tuple[RedisSessionStore, RedisSessionStore],
) -> None:
    first, second = two_stores
    await first.add(spread_events(), NOW)
    one = await first.claim("a", NOW, timeout=TIMEOUT, lease=30, limit=1)
    rest = await second.claim("b", NOW, timeout=TIMEOUT, lease=30, limit=16)
    assert len(one) == 1
    assert one[0].shard not in {claim.shard for claim in rest}
    assert len(one) + len(rest) == len({shard_of(("p1", f"s{n}"), 16) for n in range(64)})


async def test_concurrent_adds_to_one_session_lose_nothing(
    two_stores: tuple[RedisSessionStore, RedisSessionStore],
) -> None:
    first, second = two_stores
    views = [event(at=at) for at in range(400)]

    async def feed(store: RedisSessionStore, part: list[Event], now: float) -> None:
        for start in range(0, len(part), 10):
            await store.add(part[start : start + 10], now + start)

    async with anyio.create_task_group() as group:
        group.start_soon(feed, first, views[0::2], NOW)
        group.start_soon(feed, second, views[1::2], NOW + 0.5)

    _, works = await claim_all(first, NOW + 1000)
    work = works[KEY]
    assert sorted(ids(work.pending)) == sorted(ids(views))
    assert work.state.first_ms == epoch_ms(views[0].created_at)
    assert work.state.last_activity_ms == epoch_ms(views[-1].created_at)
    assert work.state.last_seen == NOW + 0.5 + 190


async def test_a_claim_takes_at_most_claim_size_events(redis_url: str) -> None:
    store = RedisSessionStore(redis_url, shards=1, claim_size=5)
    try:
        await store.add(spread_events(12), NOW)
        sizes = []
        while claims := await store.claim("a", NOW, timeout=TIMEOUT, lease=30, limit=4):
            (claim,) = claims
            sizes.append(len(claim.sessions))
            assert await store.complete(claim, [])
        assert sizes == [5, 5, 2]
    finally:
        await store.aclose()


async def test_an_expired_claim_passes_to_another_and_its_complete_changes_nothing(
    two_stores: tuple[RedisSessionStore, RedisSessionStore], redis_url: str
) -> None:
    first, second = two_stores
    view = event(at=1)
    await first.add([view], NOW)
    (stale,) = await first.claim("a", NOW, timeout=TIMEOUT, lease=0.05, limit=16)

    # The crashed holder's dirty sessions come back with the lease's end.
    with anyio.fail_after(5):
        taken: list[Claim] = []
        while not taken:
            await anyio.sleep(0.01)
            taken = await second.claim("b", NOW, timeout=TIMEOUT, lease=30, limit=16)
    (fresh,) = taken
    assert fresh.shard == stale.shard
    assert [work.key for work in fresh.sessions] == [KEY]
    assert ids(fresh.sessions[0].pending) == ids([view])

    work = stale.sessions[0]
    ended = msgspec.structs.replace(work.state, ended=True, screen_views=1)
    outcome = SessionOutcome(key=KEY, state=ended, written=[view.id])
    async with Redis.from_url(redis_url) as client:
        before = await dump(client)
        assert not await first.complete(stale, [outcome])
        assert await dump(client) == before

    assert await second.complete(fresh, [outcome])
    # A retried complete whose first attempt got through still reports success.
    assert await second.complete(fresh, [outcome])
    assert await first.claim("a", NOW + 10 * TIMEOUT, timeout=TIMEOUT, lease=30, limit=16) == []


async def test_entries_another_instance_merged_leave_the_adders_cache(redis_url: str) -> None:
    # A store keeps its own inbox entries decoded until a claim merges them; when
    # another instance's claim did, they must not stay (the cache would only grow).
    first, second = (RedisSessionStore(redis_url, shards=1) for _ in range(2))
    try:
        await first.add(spread_events(5), NOW)
        await settle_all(second)
        late = event(at=9)
        await first.add([late], NOW)
        claims, works = await claim_all(first)
        assert ids(works[KEY].pending) == ids([late])
        assert len(first._sent) == 1  # only the entry this claim merged
        for claim in claims:
            assert await first.complete(claim, [])
        assert first._sent == {}
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_claim_fetches_only_the_entries_its_store_no_longer_holds(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store keeps 5 events of its own entries decoded: the second add pushes
    # the first entry out, so the claim must fetch that one whole and only that one.
    monkeypatch.setattr("analytics_buffer._redis_sessions._SENT_EVENTS", 5)
    store = RedisSessionStore(redis_url, shards=1)
    replies: list[Any] = []
    real_run = store._run

    async def recording_run(calls: Any) -> list[Any]:
        got = await real_run(calls)
        replies.append(got)
        return got

    try:
        older, newer = spread_events(5), [event(session=f"t{n}", at=n) for n in range(5)]
        await store.add(older, NOW)
        await store.add(newer, NOW)
        monkeypatch.setattr(store, "_run", recording_run)
        _, works = await claim_all(store)
        pending = [item for work in works.values() for item in work.pending]
        assert sorted(ids(pending)) == sorted(ids(older + newer))
        (entries, _, waiting), *_ = replies[0]
        assert waiting == 2
        fetched_whole, head_only = entries
        assert len(fetched_whole) > 500  # five encoded events
        assert len(head_only) < 40  # b"<events>:<entry id>:"
        assert head_only.endswith(b":")
    finally:
        await store.aclose()


async def dump(client: Redis) -> dict[bytes, Any]:
    """Every key's type and value (TTL aside)."""
    found: dict[bytes, Any] = {}
    async for key in client.scan_iter():
        kind = await client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "string":
            found[key] = await client.get(key)
        elif kind == "hash":
            found[key] = await client.hgetall(key)
        elif kind == "set":
            found[key] = await client.smembers(key)
        elif kind == "list":
            found[key] = await client.lrange(key, 0, -1)
        else:
            found[key] = await client.zrange(key, 0, -1, withscores=True)
    return found


async def exercise(store: RedisSessionStore) -> None:
    """Every operation, so every script runs and every kind of key exists."""
    # A long session: its written ids move to its written set, which later adds consult.
    long = [event(session="long", at=at) for at in range(INLINE_WRITTEN + 50)]
    await store.add([*spread_events(40), event("click", session="s1"), *long], NOW)
    await store.add([event(SESSION_END, session="s2", at=50)], NOW)
    await settle_all(store, NOW)
    await store.add([*spread_events(40), *long], NOW)
    await settle_all(store, NOW + TIMEOUT, end=True)
    assert await store.history([KEY, ("p1", "s3")])
    assert await store.last_screen_view("p1", "u1") is not None
    assert await store.cleanup(NOW + 10 * TIMEOUT, TIMEOUT) == 41


async def test_every_key_carries_its_shards_hash_tag(redis_url: str) -> None:
    store = RedisSessionStore(redis_url, prefix="tag")
    try:
        # A long session, so that its written ids move to a written set.
        await store.add([event(session="long", at=at) for at in range(600)], NOW)
        await store.add(spread_events(40), NOW)
        await settle_all(store, NOW)
        await store.add(spread_events(40), NOW)
        await store.claim("test", NOW, timeout=TIMEOUT, lease=30, limit=16)
        async with Redis.from_url(redis_url) as client:
            keys = [key.decode() async for key in client.scan_iter()]
            ttls = [await client.pttl(key) for key in keys]
    finally:
        await store.aclose()

    assert keys
    assert all(0 < ttl <= 86_400_000 for ttl in ttls)
    for key in keys:
        assert key.startswith("{tag:")
        tag = key[: key.index("}") + 1]
        assert key_slot(key.encode()) == key_slot(tag.encode())
        if tag == "{tag:lsv}":
            assert key == store.last_screen_view_key("p1", "u1")
            continue
        shard = int(tag[len("{tag:") : -1])
        role, _, session = key[len(tag) + 1 :].partition(":")
        if session:
            key_of = parse_session(session)
            assert shard == shard_of(key_of, 16)
            assert key == store.session_keys(key_of)[role]
        else:
            assert key == store.shard_keys(shard)[role]
    expected = store.shard_keys(shard_of(("p1", "s7"), 16))
    assert {expected[role] for role in ("inbox", "sessions", "index", "done", "claim")} <= set(keys)
    assert store.session_keys(("p1", "long"))["written"] in keys


def parse_session(name: str) -> SessionKey:
    length, _, rest = name.partition(":")
    return rest[: int(length)], rest[int(length) + 1 :]


@pytest.fixture(scope="module")
def cluster_redis() -> Iterator[RedisServer]:
    """A redis-server in cluster mode that serves every slot itself."""
    # Cluster mode needs its port and the bus port (+10000) free, and <= 55535.
    for attempt in range(5):
        server = RedisServer(port=_cluster_port(), extra_args=("--cluster-enabled", "yes"))
        try:
            server.start()
        except ServerUnavailable:
            server.close()
            if attempt == 4:
                raise
        else:
            break
    try:
        assert server.command("CLUSTER", "ADDSLOTSRANGE", "0", "16383") == b"+OK"
        with redis.Redis.from_url(server.url) as client:
            for _ in range(200):
                if client.cluster("INFO")["cluster_state"] == "ok":
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the cluster did not reach state ok")
        yield server
    finally:
        server.close()


def _cluster_port() -> int:
    while True:
        port = random.randrange(20000, 55535)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


async def test_every_script_touches_one_slot_on_a_cluster(cluster_redis: RedisServer) -> None:
    # The scripts' #!lua flags make the server refuse any access outside the
    # slot of their first key: the whole contract runs without a refusal.
    store = RedisSessionStore(cluster_redis.url)
    try:
        await exercise(store)
    finally:
        await store.aclose()
    # The server does refuse a script that strays from its slot.
    async with Redis.from_url(cluster_redis.url) as client:
        script = "#!lua\nreturn redis.call('GET', '{other}:key')"
        with pytest.raises(redis.ResponseError, match="same slot"):
            await client.eval(script, 1, "{ab:0}:index")


async def test_a_killed_redis_raises_store_unavailable_then_recovers(
    private_redis: RedisServer,
) -> None:
    store = RedisSessionStore(private_redis.url, socket_timeout=1.0)
    try:
        await store.add([event(at=1)], NOW)
        (claim,) = await store.claim("a", NOW, timeout=TIMEOUT, lease=30, limit=16)
        private_redis.kill()

        with pytest.raises(StoreUnavailable) as caught:
            await store.add([event(at=2)], NOW)
        assert caught.value.__cause__ is not None
        with pytest.raises(StoreUnavailable):
            await store.claim("a", NOW, timeout=TIMEOUT, lease=30, limit=16)
        with pytest.raises(StoreUnavailable):
            await store.complete(claim, [])
        with pytest.raises(StoreUnavailable):
            await store.history([KEY])
        with pytest.raises(StoreUnavailable):
            await store.last_screen_view("p1", "u1")
        with pytest.raises(StoreUnavailable):
            await store.cleanup(NOW, TIMEOUT)

        # Restarted empty, without the scripts: they are loaded again.
        private_redis.restart()
        view = event(at=3)
        await store.add([view], NOW)
        _, works = await claim_all(store)
        assert ids(works[KEY].pending) == ids([view])
    finally:
        await store.aclose()


async def test_a_stalled_redis_raises_store_unavailable(private_redis: RedisServer) -> None:
    store = RedisSessionStore(private_redis.url, socket_timeout=0.2)
    try:
        await store.add([event(at=1)], NOW)
        private_redis.pause()
        try:
            with anyio.fail_after(5), pytest.raises(StoreUnavailable):
                await store.add([event(at=2)], NOW)
        finally:
            private_redis.resume()
        assert await store.last_screen_view("p1", "u1") is not None
    finally:
        await store.aclose()


async def test_scripts_flushed_from_the_server_are_loaded_again(redis_url: str) -> None:
    store = RedisSessionStore(redis_url)
    try:
        await store.add([event(at=1)], NOW)
        async with Redis.from_url(redis_url) as client:
            await client.script_flush()
        await store.add([event(at=2)], NOW)
        _, works = await claim_all(store)
        assert len(works[KEY].pending) == 2
    finally:
        await store.aclose()


def test_session_keys_are_unambiguous() -> None:
    assert session_key(("a:b", "c")) != session_key(("a", "b:c"))
    assert session_key(("p", "s")) == "1:p:s"


# -- the Redis store against the reference, on random traffic -------------------------

_SESSIONS = ("s1", "s2", "s3")
_PROFILES = {"s1": "u1", "s2": "u1", "s3": "u2"}
_ID_POOL = [uuid.UUID(int=number + 1) for number in range(12)]


@st.composite
def _traffic(draw: st.DrawFn) -> Event:
    """Events of three sessions on a coarse time grid; ids from a small pool, so
    that the same event is sent again (as an identical copy) now and then."""
    number = draw(st.integers(0, len(_ID_POOL) - 1))
    session = _SESSIONS[number % 3]
    name = (SCREEN_VIEW, SCREEN_VIEW, "click", SESSION_END)[number % 4]
    at = (number * 7) % 11
    return Event(
        name=name,
        project_id="p1",
        id=_ID_POOL[number],
        session_id=session,
        profile_id=_PROFILES[session] if number % 5 else "",
        created_at=T0 + timedelta(seconds=at),
        path=f"/{number}" if name == SCREEN_VIEW else "",
    )


_steps = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(_traffic(), min_size=1, max_size=6)),
        st.tuples(st.just("settle"), st.integers(0, 3), st.booleans()),
        st.tuples(st.just("wait"), st.sampled_from([1.0, TIMEOUT])),
        st.tuples(
            st.just("cleanup"),
            st.integers(0, 3),
            st.booleans(),
            st.sampled_from([0.5, 3 * TIMEOUT]),
        ),
    ),
    max_size=14,
)


def _view(works: dict[SessionKey, SessionWork]) -> dict[SessionKey, Any]:
    return {
        key: (ids(work.pending), work.pending, work.idle, work.state) for key, work in works.items()
    }


async def _agree(url: str, steps: list[tuple[Any, ...]]) -> None:
    memory = MemorySessionStore()
    redis_store = RedisSessionStore(url, prefix=uuid.uuid4().hex)
    stores: tuple[SessionStore, SessionStore] = (memory, redis_store)
    now = NOW
    forgotten = False
    try:
        for step in steps:
            if step[0] == "add":
                for store in stores:
                    await store.add(step[1], now)
            elif step[0] == "wait":
                now += step[1]
            else:
                keep, end = step[1:3]
                seen = []
                for store in stores:
                    claims, works = await claim_all(store, now)
                    seen.append(_view(works))
                    # The same decision on both: all but the last ``keep`` pending written.
                    for claim in claims:
                        outcomes = []
                        for work in claim.sessions:
                            done = work.pending[: max(0, len(work.pending) - keep)]
                            ended = work.state.ended or (end and work.idle)
                            state = msgspec.structs.replace(
                                work.state, ended=ended, screen_views=len(work.pending)
                            )
                            written = [item.id for item in done]
                            outcomes.append(
                                SessionOutcome(key=work.key, state=state, written=written)
                            )
                        assert await store.complete(claim, outcomes)
                assert seen[0] == seen[1], step
                if step[0] == "cleanup":
                    # Right after a claim: Redis keeps a session while its inbox may
                    # hold events of it, so a clean-up between add and claim may differ.
                    counts = [await store.cleanup(now, step[3]) for store in stores]
                    assert counts[0] == counts[1], step
                    # Redis lets a forgotten session's last screen view expire with
                    # its key; the memory store drops it at once.
                    forgotten = forgotten or counts[0] > 0
            keys = [("p1", session) for session in _SESSIONS]
            assert await memory.history(keys) == await redis_store.history(keys), step
            for profile in () if forgotten else ("u1", "u2", ""):
                views = [await store.last_screen_view("p1", profile) for store in stores]
                # Of screen_views created at the same instant, which one is "last" may differ.
                assert [view and view.created_at for view in views[:1]] == [
                    view and view.created_at for view in views[1:]
                ], step
    finally:
        await redis_store.aclose()


@pytest.mark.integration
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=_steps)
def test_the_redis_store_agrees_with_the_memory_store(
    redis_server: RedisServer, steps: list[tuple[Any, ...]]
) -> None:
    """Whatever the traffic (copies, disorder, regular events, idle ends, partial writes,
    clean-ups), both stores hand out the same work, history and last screen views."""
    anyio.run(_agree, redis_server.url, steps)
