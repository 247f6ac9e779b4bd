"""Sessions through a real redis-server into a real clickhouse-server 18.16: no mock anywhere.

Every test runs whole ``AnalyticsBuffer`` instances with ``redis_url`` set, so
session state lives in Redis (``RedisSessionStore``) and what settles goes to
ClickHouse. Rows are read back on a separate asynch connection; the 18.16
table collapses duplicates by id only on merge, so exactly-once checks read
``count()``, ``uniqExact(id)`` and ``count() ... FINAL``.

Events carry ``created_at`` times of their own (event time, from ``T0``);
arrival order is chosen by each test and is usually not event order. The
expected durations come from :func:`model`, which pairs each session's
events sorted by ``created_at`` the way the README says.

Waits on the real servers are bounded (``anyio.fail_after``) and either
event-driven (``flush()`` returns once its writes are stored) or a poll of
ClickHouse or of ``stats()`` every 20 ms; nothing sleeps blindly and no
assertion depends on how long something took.

Several instances share the sessions only through public behaviour. Two
calls matter for ordering: ``flush()`` runs a session cycle (hand the
arrived events to the store, claim, settle, write, complete) and
``last_screen_view()`` reads through the store, so it first hands this
instance's arrived events to Redis, without settling anything.
"""

from __future__ import annotations

import random
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, NamedTuple

import anyio
import msgspec
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from redis.asyncio import Redis

from analytics_buffer import AnalyticsBuffer, Event, Settings
from analytics_buffer._deadletter import DeadLetters
from analytics_buffer._redis_sessions import RedisSessionStore
from analytics_buffer._session_store import shard_of
from analytics_buffer.testing import ClickHouseServer, RedisServer
from clickhouse_queries import query, table_counts
from polling import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

T0: Final = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
INTERVAL: Final = 0.05
POLL: Final = 0.02
ORIGIN: Final = "https://example.com"
MS: Final = timedelta(milliseconds=1)


# -- events and the model ------------------------------------------------------------------


def screen_view(
    at: float, session: str = "s1", *, profile: str = "u1", path: str = "/", project: str = "p1"
) -> Event:
    """A screen_view of ``session`` created ``at`` seconds after ``T0``."""
    return Event(
        name="screen_view",
        project_id=project,
        profile_id=profile,
        session_id=session,
        created_at=T0 + timedelta(milliseconds=round(at * 1000)),
        path=path,
        origin=ORIGIN,
    )


def regular(
    name: str, at: float, session: str = "s1", *, profile: str = "u1", path: str = ""
) -> Event:
    """A regular event (or a session_end) of ``session`` created ``at`` seconds after ``T0``."""
    return Event(
        name=name,
        project_id="p1",
        profile_id=profile,
        session_id=session,
        created_at=T0 + timedelta(milliseconds=round(at * 1000)),
        path=path,
        origin=ORIGIN if path else "",
    )


def session_end(at: float, session: str = "s1", *, profile: str = "u1") -> Event:
    return regular("session_end", at, session, profile=profile)


def created_ms(event: Event) -> int:
    return (event.created_at - T0) // MS


def model(events: Sequence[Event]) -> dict[uuid.UUID, int | None]:
    """What every event's ``duration`` in ClickHouse must be, from the full sorted sessions.

    A screen_view's is the time to the next screen_view or session_end of its
    session in event time; ``None`` marks one that has no successor yet, so it
    must not be in ClickHouse. Every other event keeps the duration it was sent with.
    """
    sessions: dict[tuple[str, str], list[Event]] = {}
    for event in events:
        sessions.setdefault((event.project_id, event.session_id), []).append(event)
    expected: dict[uuid.UUID, int | None] = {}
    for session in sessions.values():
        ordered = sorted(session, key=lambda event: event.created_at)
        for position, event in enumerate(ordered):
            if event.name != "screen_view":
                expected[event.id] = event.duration
                continue
            successor = next(
                (
                    later
                    for later in ordered[position + 1 :]
                    if later.name in ("screen_view", "session_end")
                ),
                None,
            )
            expected[event.id] = (
                None if successor is None else (successor.created_at - event.created_at) // MS
            )
    return expected


def written_part(expected: dict[uuid.UUID, int | None]) -> dict[uuid.UUID, int]:
    """The events of ``expected`` that must be in ClickHouse, with their durations."""
    return {event_id: duration for event_id, duration in expected.items() if duration is not None}


# -- servers, settings, ClickHouse read-back ------------------------------------------------


def make_settings(clickhouse_url: str, redis_url: str, data_dir: Path, **changes: Any) -> Settings:
    """Settings whose EventBuffer timer never fires in a test; sessions settle every 50 ms."""
    values: dict[str, Any] = {
        "clickhouse_url": clickhouse_url,
        "redis_url": redis_url,
        "data_dir": str(data_dir),
        "flush_interval": 60.0,
        "session_interval": INTERVAL,
        "session_timeout": 600.0,
        "session_lease": 1.0,
        "shutdown_timeout": 5.0,
    }
    values.update(changes)
    return Settings(**values)


class Row(NamedTuple):
    name: str
    session_id: str
    created_ms: int
    """Milliseconds after ``T0``."""
    duration: int
    path: str
    origin: str
    properties: dict[str, str]


async def stored(url: str) -> dict[uuid.UUID, Row]:
    """Every event in the table after deduplication (``FINAL``), by id."""
    rows = await query(
        url,
        "SELECT toString(id), name, session_id, "
        "toInt64(toUnixTimestamp(created_at)) * 1000 + created_at_ms, duration, path, origin, "
        "properties.key, properties.value FROM events FINAL",
    )
    t0 = int(T0.timestamp() * 1000)
    return {
        uuid.UUID(row[0]): Row(
            row[1],
            row[2],
            int(row[3]) - t0,
            int(row[4]),
            row[5],
            row[6],
            dict(zip(row[7], row[8], strict=True)),
        )
        for row in rows
    }


async def wait_for_rows(
    url: str, predicate: Callable[[dict[uuid.UUID, Row]], bool], what: str, timeout: float = 10.0
) -> dict[uuid.UUID, Row]:
    """Poll ClickHouse every 20 ms until its rows satisfy ``predicate``; return them."""
    rows: dict[uuid.UUID, Row] = {}
    try:
        with anyio.fail_after(timeout):
            while True:
                rows = await stored(url)
                if predicate(rows):
                    return rows
                await anyio.sleep(POLL)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout} s waiting for {what}; ClickHouse has {rows}")


def assert_durations(rows: dict[uuid.UUID, Row], expected: dict[uuid.UUID, int]) -> None:
    """ClickHouse holds exactly the ``expected`` events, each with its expected duration."""
    assert set(rows) == set(expected), (
        f"missing {set(expected) - set(rows)}, unexpected {set(rows) - set(expected)}"
    )
    wrong = {
        event_id: (rows[event_id].duration, duration)
        for event_id, duration in expected.items()
        if rows[event_id].duration != duration
    }
    assert not wrong, f"(stored, expected) durations differ: {wrong}"


async def assert_stored_once(url: str, expected: dict[uuid.UUID, int]) -> None:
    """ClickHouse holds each ``expected`` event exactly once, with its expected duration."""
    assert_durations(await stored(url), expected)
    count, unique, final = await table_counts(url)
    assert count == unique == final == len(expected), "an event was written twice"


# -- pairing end to end -------------------------------------------------------------------


async def test_pairing_inheritance_and_last_screen_view_through_redis(
    clickhouse_url: str, redis_url: str, tmp_path: Path
) -> None:
    home = screen_view(0, path="/home")
    click = regular("click", 2)
    pricing = screen_view(5, path="/pricing")
    scroll = regular("scroll", 6)
    docs = screen_view(9, path="/docs")
    s2 = [
        screen_view(0, "s2", profile="u2", path="/a"),
        screen_view(4, "s2", profile="u2", path="/b"),
        session_end(7, "s2", profile="u2"),
    ]
    # Arrival order is not event order.
    arrival = [pricing, click, docs, s2[2], home, s2[0], scroll, s2[1]]

    settings = make_settings(clickhouse_url, redis_url, tmp_path)
    async with AnalyticsBuffer(settings) as buffer:
        assert all(buffer.track(event) for event in arrival)
        await buffer.flush()
        rows = await stored(clickhouse_url)
        # docs is the last screen view of an open session: it waits for its successor.
        assert_durations(
            rows,
            {
                home.id: 5_000,
                click.id: 0,
                pricing.id: 4_000,
                scroll.id: 0,
                s2[0].id: 4_000,
                s2[1].id: 3_000,
                s2[2].id: 0,
            },
        )
        # Inheritance: path and origin of the last screen view created before the event.
        assert (rows[click.id].path, rows[click.id].origin) == ("/home", ORIGIN)
        assert rows[click.id].properties == {"__inherit_from": str(home.id)}
        assert (rows[scroll.id].path, rows[scroll.id].origin) == ("/pricing", ORIGIN)
        assert rows[scroll.id].properties == {"__inherit_from": str(pricing.id)}
        assert rows[home.id].properties == {}
        latest = await buffer.last_screen_view("p1", "u1")
        assert latest == docs
        assert await buffer.last_screen_view("p1", "u2") == s2[1]
        assert await buffer.last_screen_view("p1", "nobody") is None

        # Its successor arrives: docs is written with the duration up to it.
        after = screen_view(12, path="/after")
        assert buffer.track(after)
        await buffer.flush()
        rows = await stored(clickhouse_url)
        assert rows[docs.id].duration == 3_000
        assert after.id not in rows
        assert await buffer.last_screen_view("p1", "u1") == after

        # The session ends explicitly; a late screen view of the ended s2 is written as it
        # is (duration 0) and ends nothing again.
        end = session_end(20)
        late = screen_view(5, "s2", profile="u2", path="/late")
        assert buffer.track(end)
        assert buffer.track(late)
        await buffer.flush()
        stats = buffer.stats()

    rows = await stored(clickhouse_url)
    assert rows[after.id].duration == 8_000
    assert rows[end.id].name == "session_end"
    assert rows[late.id].duration == 0
    assert len(rows) == 11
    assert await table_counts(clickhouse_url) == (11, 11, 11)
    assert stats.sessions_ended == 2
    # home, pricing, docs, after, s2's two and the late one.
    assert stats.session_screen_views == 7
    assert stats.accepted == stats.written == 11
    assert (stats.dead_lettered, stats.buffered, stats.sessions_waiting) == (0, 0, 0)
    assert not stats.sessions_degraded


async def test_an_idle_session_is_ended_through_redis(
    clickhouse_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Idle for ``session_timeout``: the waiting screen view gets the duration up to the
    session's last activity (a click), and one session_end is written there."""
    page = screen_view(0, path="/home")
    click = regular("click", 4, path="/home")
    settings = make_settings(clickhouse_url, redis_url, tmp_path, session_timeout=0.3)
    async with AnalyticsBuffer(settings) as buffer:
        assert buffer.track(click)
        assert buffer.track(page)
        rows = await wait_for_rows(
            clickhouse_url,
            lambda rows: any(row.name == "session_end" for row in rows.values()),
            "the idle session's end",
        )
        await buffer.flush()  # the click, which waits in the EventBuffer
        stats = buffer.stats()
    rows = await stored(clickhouse_url)
    assert rows[page.id].duration == 4_000
    [end] = [row for row in rows.values() if row.name == "session_end"]
    assert (end.session_id, end.created_ms, end.duration) == ("s1", 4_000, 4_000)
    assert end.properties == {"duration": "4000", "screen_views": "1"}
    assert len(rows) == 3
    assert await table_counts(clickhouse_url) == (3, 3, 3)
    assert stats.sessions_ended == 1
    assert stats.written == 3  # the session_end made here counts as written too


# -- shutdown and restart ---------------------------------------------------------------


async def test_pending_screen_views_wait_in_redis_across_a_restart(
    clickhouse_url: str, redis_url: str, tmp_path: Path
) -> None:
    """With Redis, shutdown does not write the screen view that waits for its successor
    (there is no duration to give it yet): the next instance on the same Redis gets the
    successor and writes it with the right duration.

    ``second`` is paired by whichever cycle first sees ``third``: the first instance's
    timer, if it fires before the shutdown, or the next instance. Either way it is
    written once, with the duration up to ``third``.
    """
    first = screen_view(0, path="/one")
    click = regular("click", 1)
    second = screen_view(3, path="/two")
    third = screen_view(6, path="/three")
    settings = make_settings(clickhouse_url, redis_url, tmp_path)

    async with AnalyticsBuffer(settings) as before:
        assert before.track(second)
        assert before.track(click)
        assert before.track(first)
        await before.flush()
        assert set(await stored(clickhouse_url)) == {first.id, click.id}
        # Tracked just before the shutdown, which hands it to Redis.
        assert before.track(third)
    stats = before.stats()
    rows = await stored(clickhouse_url)
    assert third.id not in rows
    assert set(rows) - {second.id} == {first.id, click.id}
    if second.id in rows:
        assert rows[second.id].duration == 3_000
    assert stats.written == len(rows)
    assert (stats.dead_lettered, stats.buffered, stats.sessions_waiting) == (0, 0, 0)

    end = session_end(10)
    async with AnalyticsBuffer(settings) as after:
        # The restarted instance reads what the first one left in Redis.
        assert await after.last_screen_view("p1", "u1") == third
        assert after.track(end)
        await after.flush()
        after_stats = after.stats()
    rows = await stored(clickhouse_url)
    assert_durations(
        rows,
        {first.id: 3_000, click.id: 0, second.id: 3_000, third.id: 4_000, end.id: 0},
    )
    assert rows[click.id].properties == {"__inherit_from": str(first.id)}
    assert await table_counts(clickhouse_url) == (5, 5, 5)
    assert stats.written + after_stats.written == 5
    assert stats.session_screen_views + after_stats.session_screen_views == 3
    assert after_stats.sessions_ended == 1


async def test_an_error_in_the_body_leaves_as_itself_and_what_waits_stays_in_redis(
    clickhouse_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The service's own error inside ``async with`` still stops the buffer in order (the
    arrived session events go to Redis) and reaches the caller as that error, so an
    ``except`` for it works; the next instance carries on with the sessions."""
    first, second = screen_view(0, path="/one"), screen_view(3, path="/two")
    settings = make_settings(clickhouse_url, redis_url, tmp_path)
    buffer = AnalyticsBuffer(settings)

    async def service() -> None:
        async with buffer:
            assert buffer.track(first)
            assert buffer.track(second)
            raise LookupError("the service failed")

    with pytest.raises(LookupError, match="the service failed"):
        await service()
    assert buffer.stats().sessions_waiting == 0

    end = session_end(5)
    async with AnalyticsBuffer(settings) as after:
        assert await after.last_screen_view("p1", "u1") == second
        assert after.track(end)
        await after.flush()
    assert_durations(await stored(clickhouse_url), {first.id: 3_000, second.id: 2_000, end.id: 0})


# -- two instances sharing one Redis -------------------------------------------------------


def split_traffic(sessions: int, seed: int) -> list[Event]:
    """Sessions of 6 screen views and 3 clicks (with a path of their own) each; even ones end.

    Event times are distinct within a session; the list is in event order per session.
    """
    rng = random.Random(seed)
    events: list[Event] = []
    for number in range(sessions):
        session, profile = f"s{number}", f"u{number % 7}"
        moments = sorted(rng.sample(range(1, 600_000), 10))
        for slot, moment in enumerate(moments[:9]):
            at = moment / 1000
            if slot % 3 == 2:
                events.append(regular("click", at, session, profile=profile, path=f"/c{slot}"))
            else:
                events.append(screen_view(at, session, profile=profile, path=f"/p{slot}"))
        if number % 2 == 0:
            events.append(session_end(moments[9] / 1000, session, profile=profile))
    return events


def latest_screen_views(events: Sequence[Event]) -> dict[str, Event]:
    latest: dict[str, Event] = {}
    for event in events:
        if event.name == "screen_view":
            known = latest.get(event.profile_id)
            if known is None or known.created_at <= event.created_at:
                latest[event.profile_id] = event
    return latest


async def test_two_instances_split_the_sessions_events_and_write_each_once(
    clickhouse_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Every event of 40 sessions goes to A or B alternately, in a random order; both hand
    them to Redis, then settle at the same time, racing for the shards. Each screen view is
    in ClickHouse once, with the duration of the full sorted session.

    The cycle timer is long here, so nothing settles before both instances handed every
    event over: a screen view settled early could only be paired with what had arrived.
    """
    events = split_traffic(40, seed=11)
    expected = written_part(model(events))
    arrival = list(events)
    random.Random(5).shuffle(arrival)
    changes = {"session_interval": 30.0}
    settings_a = make_settings(clickhouse_url, redis_url, tmp_path / "a", **changes)
    settings_b = make_settings(clickhouse_url, redis_url, tmp_path / "b", **changes)
    async with AnalyticsBuffer(settings_a) as a, AnalyticsBuffer(settings_b) as b:
        for position, event in enumerate(arrival):
            assert (a if position % 2 == 0 else b).track(event)
        # Both read through Redis, so each sees what the other tracked.
        for profile, latest in latest_screen_views(events).items():
            assert await a.last_screen_view("p1", profile) == latest
            assert await b.last_screen_view("p1", profile) == latest
        async with anyio.create_task_group() as both:
            both.start_soon(a.flush)
            both.start_soon(b.flush)
        # A final cycle each: whatever a claim race left is settled now.
        await a.flush()
        await b.flush()
        stats_a, stats_b = a.stats(), b.stats()

    await assert_stored_once(clickhouse_url, expected)
    # Neither instance settled what the other did.
    assert stats_a.written + stats_b.written == len(expected)
    screen_views = sum(
        1 for event in events if event.id in expected and event.name == "screen_view"
    )
    assert stats_a.session_screen_views + stats_b.session_screen_views == screen_views
    assert stats_a.sessions_ended + stats_b.sessions_ended == 20


async def test_two_instances_with_short_cycles_settle_rounds_of_traffic_once(
    clickhouse_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Cycles every 50 ms on both instances, racing while traffic flows in rounds.

    In each round every session gets two screen views and a click, out of order, all on
    one instance (A and B take turns per session and round). A round is handed to Redis
    (``last_screen_view`` on both) before the next begins, so the store always holds a
    prefix of each session in event time, whatever the cycles do meanwhile.
    """
    sessions, rounds = 30, 4
    rng = random.Random(3)
    per_round: list[list[tuple[int, Event]]] = []
    for turn in range(rounds + 1):
        batch: list[tuple[int, Event]] = []
        for number in range(sessions):
            session, profile = f"s{number}", f"u{number}"
            owner = (number + turn) % 2
            base = turn * 10.0
            if turn == rounds:
                batch.append((owner, session_end(base, session, profile=profile)))
                continue
            moments = sorted(rng.sample(range(10_000), 3))
            group = [
                screen_view(base + moments[0] / 1000, session, profile=profile, path=f"/{turn}a"),
                regular("click", base + moments[1] / 1000, session, profile=profile, path="/x"),
                screen_view(base + moments[2] / 1000, session, profile=profile, path=f"/{turn}b"),
            ]
            rng.shuffle(group)
            batch += [(owner, event) for event in group]
        rng.shuffle(batch)
        per_round.append(batch)
    events = [event for batch in per_round for _, event in batch]
    expected = written_part(model(events))
    assert len(expected) == len(events)

    settings_a = make_settings(clickhouse_url, redis_url, tmp_path / "a")
    settings_b = make_settings(clickhouse_url, redis_url, tmp_path / "b")
    async with AnalyticsBuffer(settings_a) as a, AnalyticsBuffer(settings_b) as b:
        instances = (a, b)
        for batch in per_round:
            for owner, event in batch:
                assert instances[owner].track(event)
            # Read-your-writes: each call hands that instance's arrivals to Redis first.
            for instance in instances:
                await instance.last_screen_view("p1", "u0")
        screen_views = sum(1 for event in events if event.name == "screen_view")
        # The timers settle everything; no flush needed for the session events.
        await wait_until(
            lambda: a.stats().session_screen_views + b.stats().session_screen_views >= screen_views,
            "every screen view settled by one of the instances",
        )
        await a.flush()
        await b.flush()
        stats_a, stats_b = a.stats(), b.stats()

    await assert_stored_once(clickhouse_url, expected)
    assert stats_a.written + stats_b.written == len(events)
    assert stats_a.session_screen_views + stats_b.session_screen_views == screen_views
    assert stats_a.sessions_ended + stats_b.sessions_ended == sessions


# -- an instance killed while it holds a claim ----------------------------------------------

CHILD: Final = r"""
import sys

import anyio
import msgspec

from analytics_buffer import AnalyticsBuffer, Event, Settings
from analytics_buffer._engines import create_sink


class Announced:
    # The real ClickHouse sink; it says when an insert starts, so the parent can kill
    # this process while the insert (and so the claim) is in flight.

    def __init__(self, inner):
        self._inner = inner

    async def open(self):
        await self._inner.open()

    async def aclose(self):
        await self._inner.aclose()

    async def query(self, sql):
        return await self._inner.query(sql)

    async def insert(self, events, token):
        print("inserting", len(events), flush=True)
        await self._inner.insert(events, token)


async def main(clickhouse_url, redis_url, data_dir, events_path, lease):
    with open(events_path, "rb") as file:
        events = msgspec.json.decode(file.read(), type=list[Event])
    settings = Settings(
        clickhouse_url=clickhouse_url,
        redis_url=redis_url,
        data_dir=data_dir,
        flush_interval=60.0,
        session_interval=0.05,
        session_lease=float(lease),
        insert_timeout=60.0,
    )
    async with AnalyticsBuffer(settings, sink=Announced(create_sink(settings))) as buffer:
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        for event in events:
            assert buffer.track(event)
        await anyio.sleep_forever()


anyio.run(main, *sys.argv[1:], backend="asyncio")
"""

CHILD_LEASE: Final = 2.0
SHARDS: Final = Settings().session_shards


async def read_line(stream: BufferedByteReceiveStream, what: str, stderr: Path) -> bytes:
    """The child's next line of output; fails with its stderr if it does not come."""
    try:
        with anyio.fail_after(20):
            return await stream.receive_until(b"\n", 1_000)
    except (TimeoutError, anyio.EndOfStream, anyio.IncompleteRead):
        pytest.fail(f"the child did not say {what!r}:\n{child_output(stderr)}")


def child_output(stderr: Path) -> str:
    return stderr.read_text(errors="replace")[-3_000:]


async def test_a_killed_instances_claim_expires_and_another_finishes_its_work(
    private_clickhouse: ClickHouseServer, redis_url: str, tmp_path: Path
) -> None:
    """Instance A (a real process) claims the shards, starts its insert into a frozen
    ClickHouse and is SIGKILLed there. Instance B cannot take the shards while A's claims
    live; after they expire, B settles the same sessions: every event once, durations right.
    """
    clickhouse = private_clickhouse
    events: list[Event] = []
    for number in range(30):
        session, profile = f"s{number}", f"u{number}"
        events += [
            screen_view(0, session, profile=profile, path="/a"),
            screen_view(3, session, profile=profile, path="/b"),
        ]
        if number % 3:  # two in three sessions end; the others keep /b waiting
            events += [
                screen_view(7, session, profile=profile, path="/c"),
                session_end(9, session, profile=profile),
            ]
    expected = written_part(model(events))
    events_path = tmp_path / "events.json"
    events_path.write_bytes(msgspec.json.encode(events))

    child_stderr = tmp_path / "child.stderr"
    stderr = child_stderr.open("wb")
    child: Process = await anyio.open_process(
        [
            sys.executable,
            "-c",
            CHILD,
            clickhouse.url,
            redis_url,
            str(tmp_path / "a"),
            str(events_path),
            str(CHILD_LEASE),
        ],
        stdin=subprocess.PIPE,
        stderr=stderr,
    )
    stderr.close()
    assert child.stdin is not None
    assert child.stdout is not None
    lines = BufferedByteReceiveStream(child.stdout)
    claims: dict[int, tuple[str, bytes | str]] = {}
    try:
        assert await read_line(lines, "ready", child_stderr) == b"ready"
        clickhouse.pause()
        try:
            await child.stdin.send(b"go\n")
            assert await read_line(lines, "inserting", child_stderr) == b"inserting %d" % len(
                expected
            )
            child.kill()
            await child.wait()
            # A's claims outlive it: read them (the claim key holds the claimer's token).
            probe = RedisSessionStore(redis_url)
            await probe.aclose()
            async with Redis.from_url(redis_url) as redis:
                for shard in {shard_of(("p1", event.session_id), SHARDS) for event in events}:
                    key = probe.shard_keys(shard)["claim"]
                    token = await redis.get(key)
                    assert token is not None, f"shard {shard} is not claimed"
                    claims[shard] = (key, token)
        finally:
            clickhouse.resume()
    finally:
        if child.returncode is None:
            child.kill()
        await child.aclose()
    assert child.returncode == -9

    settings = make_settings(clickhouse.url, redis_url, tmp_path / "b", session_lease=1.0)
    async with AnalyticsBuffer(settings) as b, Redis.from_url(redis_url) as redis:
        # B writes nothing of a shard while A's claim on it lives. Read what is stored
        # first, then the claims: a claim alive now was alive when the rows were read.
        with anyio.fail_after(15):
            while True:
                rows = await stored(clickhouse.url)
                alive = {
                    shard for shard, (key, token) in claims.items() if await redis.get(key) == token
                }
                early = {
                    row.session_id
                    for row in rows.values()
                    if shard_of(("p1", row.session_id), SHARDS) in alive
                }
                assert not early, f"B wrote sessions {early} while A's claim on them lived"
                if not alive and len(rows) >= len(expected):
                    break
                await anyio.sleep(POLL)
        await b.flush()
        stats = b.stats()

    rows = await stored(clickhouse.url)
    assert_durations(rows, expected)
    count, unique, final = await table_counts(clickhouse.url)
    print(f"after takeover: count()={count} uniqExact(id)={unique} count() FINAL={final}")
    assert unique == final == len(expected)
    # A's insert never got past the frozen server, so nothing is doubled even before a merge.
    assert count == len(expected)
    assert stats.written == len(expected)
    assert stats.sessions_ended == 20
    # A died of the kill, not of an error of its own.
    assert "Traceback" not in child_output(child_stderr)


# -- Redis dies while tracking goes on ---------------------------------------------------


@pytest.fixture(params=[False, True], ids=["no-persistence", "appendonly"])
def appendonly(request: pytest.FixtureRequest) -> bool:
    """Whether the test's own redis-server keeps an append-only file."""
    persistent: bool = request.param
    return persistent


@pytest.fixture
def own_redis(appendonly: bool) -> Iterator[RedisServer]:
    """A redis-server of the test's own, free to kill and restart."""
    with RedisServer(appendonly=appendonly) as server:
        yield server


async def test_redis_killed_mid_run_tracking_goes_on_and_catches_up(
    own_redis: RedisServer, appendonly: bool, clickhouse_url: str, tmp_path: Path
) -> None:
    """While Redis is dead, ``track`` accepts, session events wait in memory and
    ``sessions_degraded`` is true; once it is back, everything waiting arrives.

    What lived only in Redis is as durable as Redis: with the append-only file, the
    screen views that waited there for a successor survive the kill and are written;
    without persistence the server comes back empty and those (and only those) are lost.
    """
    redis = own_redis
    old = [f"old{n}" for n in range(10)]
    new = [f"new{n}" for n in range(5)]
    before = [screen_view(at, s, path=f"/{at}") for s in old for at in (0, 2)]
    during = [screen_view(4, s, path="/4") for s in old] + [
        event
        for s in new
        for event in (screen_view(1, s, path="/n1"), regular("click", 2, s), screen_view(3, s))
    ]
    later = [screen_view(6, s, path="/6") for s in old]
    no_session = Event(name="heartbeat", project_id="p1")
    ends = [session_end(10, s) for s in (*old, *new)]
    events = [*before, *during, *later, *ends]
    waiting_in_redis = {event.id for event in before if event.path == "/2"}

    settings = make_settings(clickhouse_url, redis.url, tmp_path)
    async with AnalyticsBuffer(settings) as buffer:
        assert all(buffer.track(event) for event in before)
        await buffer.flush()
        assert set(await stored(clickhouse_url)) == {e.id for e in before if e.path == "/0"}

        redis.kill()
        try:
            assert all(buffer.track(event) for event in during)
            await wait_until(lambda: buffer.stats().sessions_degraded, "sessions_degraded")
            # Still accepting; session events wait in memory, other events flow.
            assert all(buffer.track(event) for event in later)
            assert buffer.track(no_session)
            await buffer.flush()
            stats = buffer.stats()
            assert stats.sessions_degraded
            assert stats.sessions_waiting == len(during) + len(later)
            assert stats.buffered >= stats.sessions_waiting
            assert set(await stored(clickhouse_url)) == {
                *(e.id for e in before if e.path == "/0"),
                no_session.id,
            }
        finally:
            redis.start()
        await wait_until(
            lambda: not buffer.stats().sessions_degraded and buffer.stats().sessions_waiting == 0,
            "the session store back and every waiting event handed to it",
        )
        assert all(buffer.track(event) for event in ends)
        await buffer.flush()
        stats = buffer.stats()

    expected = written_part(model(events))
    expected[no_session.id] = 0
    if not appendonly:
        # Pending in Redis only, gone with it; their sessions carry on without them.
        for event_id in waiting_in_redis:
            del expected[event_id]
    await assert_stored_once(clickhouse_url, expected)
    assert not stats.sessions_degraded
    assert stats.accepted == len(events) + 1
    assert stats.written == len(expected)
    assert (stats.dead_lettered, stats.buffered, stats.sessions_waiting) == (0, 0, 0)


async def test_with_redis_dead_the_bound_holds_and_shutdown_dead_letters_what_waits(
    private_redis: RedisServer, clickhouse_url: str, tmp_path: Path
) -> None:
    """Session events waiting for a dead Redis count against the buffer's bound (beyond it
    ``track`` refuses, and says so); a shutdown that still cannot hand them over puts them
    in the dead-letter file with the reason, so none is nowhere."""
    settings = make_settings(
        clickhouse_url, private_redis.url, tmp_path, max_buffered_events=20, max_batch_events=20
    )
    events = [screen_view(at, f"s{at % 3}") for at in range(25)]
    async with AnalyticsBuffer(settings) as buffer:
        private_redis.kill()
        accepted = [event for event in events if buffer.track(event)]
        await wait_until(lambda: buffer.stats().sessions_degraded, "sessions_degraded")
        stats = buffer.stats()
        assert len(accepted) == 20
        assert (stats.accepted, stats.dropped, stats.buffered) == (20, 5, 20)
        assert stats.sessions_waiting == 20
    stats = buffer.stats()
    assert (stats.dead_lettered, stats.written, stats.buffered, stats.sessions_waiting) == (
        20,
        0,
        0,
        0,
    )
    letters = DeadLetters(tmp_path / "dead-letter", "events").read()
    assert [letter.event for letter in letters] == accepted
    assert {letter.reason for letter in letters} == {
        "the session store could not take them at shutdown"
    }
    assert await stored(clickhouse_url) == {}


# -- stale sessions are cleaned up -------------------------------------------------------


async def test_stale_ended_sessions_are_cleaned_up_and_counted(
    clickhouse_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Ended sessions last seen more than ``session_retention`` ago are forgotten and
    counted in ``stale_sessions_removed``; a session still in use is kept.

    Forgotten means that a late screen view no longer finds its session ended: it starts
    a new one and waits for a successor, where before it was written at once.
    """
    ended = [f"gone{n}" for n in range(3)]
    settings = make_settings(
        clickhouse_url,
        redis_url,
        tmp_path,
        session_interval=0.01,  # a clean-up every 60 cycles
        session_retention=1.0,
        session_shards=1,
    )
    async with AnalyticsBuffer(settings) as buffer:
        for session in ended:
            assert buffer.track(screen_view(0, session))
            assert buffer.track(session_end(1, session))
        await buffer.flush()
        assert buffer.stats().sessions_ended == 3

        alive = screen_view(0, "alive", profile="u2", path="/alive")
        assert buffer.track(alive)

        async def keep_alive() -> None:
            # A session in use, so that the shard stays busy as in production.
            at = 0.0
            while True:
                at += 0.05
                buffer.track(regular("click", at, "alive", profile="u2", path="/alive"))
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(keep_alive)
            # Stale after 1 s, with a clean-up about every 0.6 s: counted within ~2 s.
            with anyio.move_on_after(6):
                while buffer.stats().stale_sessions_removed < len(ended):  # noqa: ASYNC110
                    await anyio.sleep(POLL)
            tasks.cancel_scope.cancel()
        assert buffer.stats().stale_sessions_removed == len(ended), (
            "the stale sessions were not counted as removed within 6 s"
        )

        late = screen_view(2, ended[0], path="/late")
        # The session in use was kept: a click of it still inherits from its screen view.
        click = regular("click", 3_600, "alive", profile="u2")
        assert buffer.track(late)
        assert buffer.track(click)
        await buffer.flush()
        rows = await stored(clickhouse_url)
        assert late.id not in rows
        assert await buffer.last_screen_view("p1", "u1") == late
        assert rows[click.id].path == "/alive"
        assert rows[click.id].properties == {"__inherit_from": str(alive.id)}
