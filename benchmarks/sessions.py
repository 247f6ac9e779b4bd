"""Session events through Redis pairing into ClickHouse, against one MULTI per event.

Measured side by side in one run, against throwaway ``clickhouse-server``
and ``redis-server`` processes unless ``--clickhouse-url`` / ``--redis-url``
are given:

* ``session_events_per_s``: prebuilt screen views (and a session_end for
  each session) through ``put`` -> SessionActor -> Redis session store ->
  pairing -> Writer -> ClickHouse at default settings (a session cycle every
  ``session_interval`` = 1 s, and at ``flush()``), timed from the first
  event until ``flush()`` returns; every one of them is then counted back
  in ClickHouse.
* ``per_event_multi_events_per_s``: the reference's way of adding an event to
  its Redis session buffer: one MULTI/EXEC per event (RPUSH to the session
  list, ZADD NX to the session index, SET of the last screen view with EX,
  or for a session_end its DEL after an LLEN round trip, ZADD and SET EX for
  the live visitor), on the same Redis, with the same mix of events. The
  reference's PUBLISH of every event is left out (this library has no such
  feed): with it, this rate was about 0.7 of what it is without (measured
  side by side).
* ``speedup``: the first over the second.
* ``plain_pipeline_events_per_s``: the same events without their
  ``session_id`` (so nothing is paired: ``put`` -> EventBuffer -> Writer ->
  ClickHouse, the CounterActor on the same Redis as before), timed the same
  way and counted back: the ceiling of the session pipeline, which does all
  of this and the pairing besides.
* ``plain_speedup``: that ceiling over the one-MULTI-per-event rate: the
  largest ``speedup`` any session pipeline in this process could show in
  this run.

Inputs (events) are built before anything is timed and then frozen out of
the garbage collector (``gc.freeze()``), as in ``benchmarks/throughput.py``:
a service creates its events one request at a time, while a benchmark
holding 200k prebuilt events would otherwise measure the collector walking
its own inputs. Everything the pipeline allocates is collected as usual.

Usage: ``python benchmarks/sessions.py [--events N] [--json]
[--clickhouse-url URL] [--redis-url URL]``
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import redis.asyncio as redis
from _measure import benchmark_parser, count_rows, merge_parts, progress, put_all, run

from analytics_buffer import AnalyticsBuffer, Event, Settings
from analytics_buffer.testing import ClickHouseServer, RedisServer


def session_events(count: int, project: str, sessions: int) -> list[Event]:
    """Screen views spread over ``sessions`` sessions, each closed by a session_end."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    views = count - sessions
    events = [
        Event(
            name="screen_view",
            project_id=project,
            profile_id=f"u{i % sessions}",
            session_id=f"s{i % sessions}",
            created_at=start + timedelta(milliseconds=i),
            path=f"/page/{i % 17}",
            origin="https://example.com",
        )
        for i in range(views)
    ]
    events += [
        Event(
            name="session_end",
            project_id=project,
            profile_id=f"u{s}",
            session_id=f"s{s}",
            created_at=start + timedelta(milliseconds=views + s),
        )
        for s in range(sessions)
    ]
    return events


async def pipeline(settings: Settings, events: list[Event], table: str) -> float:
    project = events[0].project_id
    started = time.perf_counter()
    async with AnalyticsBuffer(settings) as buffer:
        await put_all(buffer, events)
        await buffer.flush()
    seconds = time.perf_counter() - started
    assert settings.clickhouse_url is not None
    counted = await count_rows(
        settings.clickhouse_url, f"SELECT count() FROM {table} WHERE project_id = '{project}'"
    )
    if counted != len(events):
        raise SystemExit(f"ERROR: {counted} of {len(events)} events reached ClickHouse")
    return len(events) / seconds


async def per_event_multi(url: str, events: list[Event]) -> float:
    """The reference's add() of a session event: one MULTI/EXEC round trip per event.

    A session_end first asks for the length of its session's list (a round
    trip of its own, as the reference does) and deletes the profile's last
    screen view instead of setting it. The reference then also PUBLISHes each
    event on a channel; this library has no such feed, so that round trip is
    left out (with it, this rate was about 0.7 of what it is without).
    """
    encoder = msgspec.json.Encoder()
    client = redis.Redis.from_url(url)
    try:
        started = time.perf_counter()
        for event in events:
            raw = encoder.encode(event)
            score = event.created_at.timestamp() * 1000
            session_key = f"event_buffer:session:{event.session_id}"
            last_view = f"session:last_screen_view:{event.project_id}:{event.profile_id}"
            multi = client.pipeline(transaction=True)
            if event.name == "screen_view":
                multi.set(last_view, raw, ex=1860)
                in_session = True
            else:
                multi.delete(last_view)
                in_session = await client.llen(session_key) > 0
            if in_session:
                multi.rpush(session_key, raw)
                multi.zadd("event_buffer:sessions_sorted", {event.session_id: score}, nx=True)
            else:
                multi.rpush("event_buffer:regular", raw)
            multi.zadd(f"live:visitors:{event.project_id}", {event.profile_id: score})
            multi.set(f"live:visitor:{event.project_id}:{event.profile_id}", "1", ex=300)
            await multi.execute()
        return len(events) / (time.perf_counter() - started)
    finally:
        await client.aclose()


def servers(args: argparse.Namespace, stack: ExitStack) -> Iterator[str]:
    yield args.clickhouse_url or stack.enter_context(ClickHouseServer()).url
    yield args.redis_url or stack.enter_context(RedisServer()).url


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with ExitStack() as stack:
        clickhouse_url, redis_url = servers(args, stack)
        table = "bench_sessions"
        settings = Settings(
            clickhouse_url=clickhouse_url,
            redis_url=redis_url,
            data_dir=args.data_dir,
            table=table,
        )
        events = session_events(args.events, "bench-sessions", args.sessions)
        # The same mix of screen views and session ends as the pipeline gets.
        reference_sessions = max(1, args.reference_events * args.sessions // args.events)
        reference = session_events(args.reference_events, "bench-reference", reference_sessions)
        plain = [
            msgspec.structs.replace(event, project_id="bench-plain", session_id="")
            for event in events
        ]
        gc.freeze()
        progress("pipeline")
        rate = await pipeline(settings, events, table)
        progress("the same events without sessions")
        # On a merged table, so the session run's background merges do not slow it.
        await merge_parts(clickhouse_url, table)
        plain_rate = await pipeline(settings, plain, table)
        progress("one MULTI per event")
        baseline = await per_event_multi(redis_url, reference)
    return {
        "events": args.events,
        "sessions": args.sessions,
        "session_events_per_s": round(rate),
        "per_event_multi_events_per_s": round(baseline),
        "speedup": round(rate / baseline, 1),
        "plain_pipeline_events_per_s": round(plain_rate),
        "plain_speedup": round(plain_rate / baseline, 1),
    }


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--reference-events", type=int, default=5_000)
    parser.add_argument("--clickhouse-url", default=None)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--data-dir", default="analytics-buffer-data/bench")
    return run(parser, main_async)


if __name__ == "__main__":
    sys.exit(main())
