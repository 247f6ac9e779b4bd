"""Counters and live visitors into Redis, against one pipeline per event.

Measured side by side in one run, against one Redis server (a throwaway
``redis-server`` unless ``--redis-url`` is given):

* ``counted_events_per_s``: prebuilt events through the counter path alone:
  handed to the CounterActor the way ``track`` hands them (appended to the
  list it takes in bulk), counted in memory (daily and hourly counters per
  project and name, live visitors per project) and applied to Redis once
  per ``counter_tick`` (1 s, the default), timed from the first event until
  a last apply has stored everything. The counts are then read back from
  Redis and checked: every event counted once.
* ``per_event_pipeline_events_per_s``: the reference's way
  (analytics-pipeline-skill.md, plus OpenPanel's live visitor): one
  MULTI/EXEC pipeline per event with INCR and EXPIRE of the daily counter,
  INCR and EXPIRE of the hourly counter, SADD to the pending-flush set, ZADD
  of the visitor and SET EX of its expiry key, on the same Redis.
* ``speedup``: the first over the second.

Inputs are built before anything is timed and frozen out of the garbage
collector (``gc.freeze()``), as in ``throughput.py``.

Usage: ``python benchmarks/counters.py [--events N] [--json] [--redis-url URL]``
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.lowlevel
import redis.asyncio as redis
from _measure import benchmark_parser, progress, run

from analytics_buffer import ChildSpec, Event, Settings, Supervisor
from analytics_buffer._clock import WallClock
from analytics_buffer._counter_actor import COUNTER_FLUSH, CounterActor, CounterState
from analytics_buffer._counters import day_fields
from analytics_buffer._redis_counters import RedisCounterStore
from analytics_buffer._stats import Counters
from analytics_buffer.testing import RedisServer

NAMES = ("screen_view", "click", "scroll", "signup", "add_to_cart", "purchase")


def make_events(count: int, projects: int, profiles: int) -> list[Event]:
    """Events of the last ``count`` ms (so the live window holds the latest ones)."""
    end = datetime.now(UTC).replace(microsecond=0)
    start = end - timedelta(milliseconds=count)
    return [
        Event(
            name=NAMES[i % len(NAMES)],
            project_id=f"bench-p{i % projects}",
            profile_id=f"u{i % profiles}",
            created_at=start + timedelta(milliseconds=i),
        )
        for i in range(count)
    ]


async def counted(url: str, events: list[Event]) -> tuple[float, int]:
    """Events per second through the CounterActor into Redis; and the live visitors read."""
    settings = Settings(redis_url=url)
    store = RedisCounterStore(url, prefix="bench")
    state = CounterState()
    counters = Counters()

    def make() -> CounterActor:
        return CounterActor(
            settings=settings,
            store=store,
            rollups=None,
            state=state,
            counters=counters,
            wall_clock=wall_clock,
            owner="bench",
        )

    wall_clock = WallClock()
    arrived = state.arrived
    try:
        async with Supervisor([ChildSpec("counters", make)]) as supervisor:
            ref = supervisor.ref("counters")
            started = time.perf_counter()
            for first in range(0, len(events), 1000):
                for event in events[first : first + 1000]:
                    arrived.append(event)  # what track() does for the counters
                await anyio.lowlevel.checkpoint()
            await ref.call(COUNTER_FLUSH, timeout=None)
            seconds = time.perf_counter() - started
        since = wall_clock() - settings.live_window
        live = await store.active_visitors("bench-p0", since, wall_clock())
        total = 0
        for day in {event.created_at.date() for event in events}:
            for project in {event.project_id for event in events}:
                for name in NAMES:
                    fields = day_fields(project, name, day)
                    total += (await store.snapshot(fields[:1])).counts.get(fields[0], 0)
        if total != len(events) or counters.counted != len(events):
            raise SystemExit(f"ERROR: {total} of {len(events)} events counted in Redis")
    finally:
        await store.aclose()
    return len(events) / seconds, live


async def per_event_pipeline(url: str, events: list[Event]) -> float:
    """The reference's track_event(): one MULTI/EXEC pipeline per event."""
    client = redis.Redis.from_url(url)
    try:
        started = time.perf_counter()
        for event in events:
            at = event.created_at
            daily = f"analytics:counter:{event.project_id}:{event.name}:{at:%Y-%m-%d}"
            hourly = f"analytics:counter:{event.project_id}:{event.name}:{at:%Y-%m-%d:%H}"
            pipe = client.pipeline()  # transaction=True: MULTI/EXEC, as in the reference
            pipe.incr(daily)
            pipe.expire(daily, 7 * 86400)
            pipe.incr(hourly)
            pipe.expire(hourly, 7 * 86400)
            pipe.sadd("analytics:pending_flush", f"{event.name}:{at:%Y-%m-%d}")
            pipe.zadd(f"live:visitors:{event.project_id}", {event.profile_id: at.timestamp()})
            pipe.set(f"live:visitor:{event.project_id}:{event.profile_id}", "1", ex=300)
            await pipe.execute()
        return len(events) / (time.perf_counter() - started)
    finally:
        await client.aclose()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with ExitStack() as stack:
        url = args.redis_url or stack.enter_context(RedisServer()).url
        events = make_events(args.events, args.projects, args.profiles)
        reference = make_events(args.reference_events, args.projects, args.profiles)
        gc.freeze()
        progress("counter path")
        rate, live = await counted(url, events)
        progress("one pipeline per event")
        baseline = await per_event_pipeline(url, reference)
    return {
        "events": args.events,
        "projects": args.projects,
        "profiles": args.profiles,
        "live_visitors_of_one_project": live,
        "counted_events_per_s": round(rate),
        "per_event_pipeline_events_per_s": round(baseline),
        "speedup": round(rate / baseline, 1),
    }


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--projects", type=int, default=50)
    parser.add_argument("--profiles", type=int, default=20_000)
    parser.add_argument("--reference-events", type=int, default=5_000)
    parser.add_argument("--redis-url", default=None)
    return run(parser, main_async)


if __name__ == "__main__":
    sys.exit(main())
