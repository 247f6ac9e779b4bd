"""Throughput of the whole pipeline against its ceiling and against no buffer.

Measured side by side in one run, against one ClickHouse server (a
throwaway ``clickhouse-server`` unless ``--clickhouse-url`` is given). The
insert runs (raw, raw columnar, pipeline) take turns over ``--rounds``
rounds (3 by default) and the best round of each is reported, as in
``benchmarks/outbox.py``: the machine is shared, and a few seconds in which
it runs slower would otherwise decide the ratio by landing on one side of
it (the rounds are in the JSON). The loop lag is the worst over all rounds.

* ``raw_insert_rows_per_s``: asynch bulk INSERTs of prebuilt rows, 100k rows
  each, into the same table, through asynch's public ``Cursor.execute``: the
  ceiling for the pipeline, and the base of ``pipeline_to_raw_ratio``.
* ``raw_columnar_rows_per_s``: the same prebuilt data as columns, 100k rows
  per INSERT, through asynch's protocol connection (``columnar=True``, not
  on its cursor). The pipeline sends columns too, so this is the fairer
  ceiling to read it against.
* ``pipeline_events_per_s``: prebuilt events through ``put`` -> EventBuffer
  -> Writer -> ClickHouse at default settings, timed from the first event
  to the end of ``flush()``, and counted back from ClickHouse. The events
  carry no session_id: the session path has its own benchmark
  (``benchmarks/sessions.py``).
* ``per_event_insert_rows_per_s``: one INSERT per event, what a service
  without a buffer does.
* ``track_median_us`` / ``track_p99_us``: the cost of one ``track`` call, each
  timed alone, with the writer flushing in between, in ``--latency-rounds``
  rounds (5 by default); the figures are those of the round with the lowest
  median, as the insert runs report their best round. This machine's speed
  swings by itself: a plain Python loop, with nothing else running, took
  7.8 ms in some half-seconds and 13.2 ms in others, and one round's
  median follows the phase it lands in. ``track_median_all_us`` is the
  median over every round's calls, and ``track_rounds_median_us`` each
  round's, so the slow phases stay in view. Measured first, while the
  process holds only its own events: with the other runs' 800k prebuilt
  inputs alive as well (frozen or not), the same calls measured about
  0.3 us slower, a cost of this script's inputs, not of ``track``. A
  warm-up run of a quarter as many calls comes before it, untimed: the
  first run in a process measured up to 0.9 us slower than the eleven runs
  after it (the cause was not isolated), and a long-running service is past
  its first 50k calls.
* ``max_loop_lag_ms``: the longest stall of the event loop while the
  pipeline runs and flushes (the producer yields after every 100 ``put``
  calls, see ``_measure.put_all``): a ticker task asks to wake every millisecond
  and records how late each wake-up is against the time it asked for.
  ``max_loop_stall_cpu_ms`` is the most CPU time the loop's thread spent
  between two wake-ups: the same stall, blind to other processes taking
  the CPU (read it when the machine is busy).

Inputs (events, rows) are built before the run that uses them and frozen
out of the garbage collector (``gc.freeze()``): a service creates its events
one request at a time, while a benchmark holding 400k prebuilt events would
otherwise measure the collector walking its own inputs. Everything the
pipeline allocates is collected as usual. Each insert run starts on a merged
table (``OPTIMIZE TABLE ... FINAL``), so the background merges of one run's
parts do not take the CPU from the next.

Usage: ``python benchmarks/throughput.py [--events N] [--rounds N] [--latency-rounds N] [--json]
[--clickhouse-url URL]``
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from _measure import (
    benchmark_parser,
    clickhouse,
    count_rows,
    merge_parts,
    progress,
    put_all,
    run,
    track_samples,
)
from asynch import Connection

from analytics_buffer import AnalyticsBuffer, Event, Settings

COLUMNS = (
    "id, name, project_id, profile_id, session_id, created_at, created_at_ms, "
    "path, origin, referrer, duration, properties.key, properties.value"
)


def make_events(count: int, project: str) -> list[Event]:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    return [
        Event(
            name=("screen_view", "click", "signup")[i % 3],
            project_id=project,
            profile_id=f"u{i % 5000}",
            created_at=start + timedelta(milliseconds=i),
            path="/docs/start",
            origin="https://example.com",
            referrer="https://www.google.com/",
            properties={"plan": "pro", "step": i % 7},
        )
        for i in range(count)
    ]


def as_row(event: Event) -> tuple[Any, ...]:
    """The row the raw benchmark inserts: what the table needs, built beforehand."""
    created = event.created_at
    return (
        event.id,
        event.name,
        event.project_id,
        event.profile_id,
        event.session_id,
        created.replace(microsecond=0),
        created.microsecond // 1000,
        event.path,
        event.origin,
        event.referrer,
        event.duration,
        list(event.properties),
        [str(value) for value in event.properties.values()],
    )


async def raw_insert(url: str, table: str, rows: list[tuple[Any, ...]]) -> float:
    async with Connection(dsn=url) as conn, conn.cursor() as cursor:
        started = time.perf_counter()
        for start in range(0, len(rows), 100_000):
            await cursor.execute(
                f"INSERT INTO {table} ({COLUMNS}) VALUES", rows[start : start + 100_000]
            )
        return len(rows) / (time.perf_counter() - started)


async def raw_columnar_insert(url: str, table: str, rows: list[tuple[Any, ...]]) -> float:
    async with Connection(dsn=url) as conn:
        blocks = [
            [list(column) for column in zip(*rows[start : start + 100_000], strict=True)]
            for start in range(0, len(rows), 100_000)
        ]
        started = time.perf_counter()
        for columns in blocks:
            await conn._connection.execute(
                f"INSERT INTO {table} ({COLUMNS}) VALUES", args=columns, columnar=True
            )
        return len(rows) / (time.perf_counter() - started)


async def per_event_insert(url: str, table: str, rows: list[tuple[Any, ...]]) -> float:
    async with Connection(dsn=url) as conn, conn.cursor() as cursor:
        started = time.perf_counter()
        for row in rows:
            await cursor.execute(f"INSERT INTO {table} ({COLUMNS}) VALUES", [row])
        return len(rows) / (time.perf_counter() - started)


class LoopLag:
    """Asks to wake every millisecond; keeps the latest wake-up, measured against the
    time asked for (so a stall counts in full, however the sleep rounds), and the
    most CPU time the loop's thread spent between two wake-ups (which other
    processes on the machine cannot inflate)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.worst_cpu = 0.0

    async def watch(self) -> None:
        clock, cpu = time.perf_counter, time.thread_time
        while True:
            due = clock() + 0.001
            used = cpu()
            await anyio.sleep(0.001)
            self.worst = max(self.worst, clock() - due)
            self.worst_cpu = max(self.worst_cpu, cpu() - used)


async def pipeline(settings: Settings, events: list[Event]) -> tuple[float, LoopLag, int]:
    lag = LoopLag()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lag.watch)
        async with AnalyticsBuffer(settings) as buffer:
            started = time.perf_counter()
            await put_all(buffer, events)
            await buffer.flush()
            seconds = time.perf_counter() - started
        written = buffer.stats().written
        tg.cancel_scope.cancel()
    return len(events) / seconds, lag, written


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with clickhouse(args.clickhouse_url) as url:
        settings = Settings(clickhouse_url=url, data_dir=args.data_dir, table="bench_events")
        # Let the buffer create the table, so every measurement uses the same one.
        async with AnalyticsBuffer(settings):
            pass
        # Latency first, after a warm-up, holding only its own events (module docstring).
        latency_events = make_events(args.latency_events, "bench-latency")
        gc.collect()
        gc.freeze()
        progress(f"track latency (a warm-up run, then {args.latency_rounds} measured rounds)")
        await track_samples(settings, latency_events[: args.latency_events // 4])
        per_round = -(-args.latency_events // args.latency_rounds)
        latency_rounds = [
            await track_samples(settings, latency_events[start : start + per_round])
            for start in range(0, args.latency_events, per_round)
        ]

        progress(f"building {args.events} rows")
        raw_rows = [as_row(event) for event in make_events(args.events, "bench-raw")]
        single_rows = [as_row(event) for event in make_events(args.single, "bench-single")]
        gc.collect()
        gc.freeze()

        raws: list[float] = []
        columnars: list[float] = []
        pipelines: list[float] = []
        lags: list[LoopLag] = []
        written = 0
        for number in range(1, args.rounds + 1):
            await merge_parts(url, settings.table)
            progress(f"round {number}: raw asynch bulk insert")
            raws.append(await raw_insert(url, settings.table, raw_rows))
            await merge_parts(url, settings.table)
            progress(f"round {number}: raw asynch bulk insert, columnar")
            columnars.append(await raw_columnar_insert(url, settings.table, raw_rows))
            await merge_parts(url, settings.table)
            # Fresh events each round, under their own project: the table is a
            # ReplacingMergeTree, and the merges between rounds would fold a
            # round's copies of the same events into the last one's.
            events = make_events(args.events, f"bench-pipeline-{number}")
            gc.collect()
            gc.freeze()
            progress(f"round {number}: pipeline")
            rate, lag, round_written = await pipeline(settings, events)
            del events
            pipelines.append(rate)
            lags.append(lag)
            written += round_written
        counted = await count_rows(
            url, f"SELECT count() FROM {settings.table} WHERE project_id LIKE 'bench-pipeline-%'"
        )
        await merge_parts(url, settings.table)
        progress("one INSERT per event")
        single = await per_event_insert(url, settings.table, single_rows)

    round_medians = [statistics.median(samples) for samples in latency_rounds]
    best_latency = latency_rounds[round_medians.index(min(round_medians))]
    raw, pipeline_rate = max(raws), max(pipelines)
    return {
        "events": args.events,
        "rounds": args.rounds,
        "raw_insert_rows_per_s": round(raw),
        "raw_columnar_rows_per_s": round(max(columnars)),
        "pipeline_events_per_s": round(pipeline_rate),
        "pipeline_written_counted_back": counted,
        "pipeline_written_reported": written,
        "per_event_insert_rows_per_s": round(single, 1),
        "pipeline_to_raw_ratio": round(pipeline_rate / raw, 3),
        "track_median_us": round(statistics.median(best_latency), 3),
        "track_p99_us": round(statistics.quantiles(best_latency, n=100)[98], 3),
        "track_median_all_us": round(
            statistics.median(sample for samples in latency_rounds for sample in samples), 3
        ),
        "track_rounds_median_us": [round(median, 3) for median in round_medians],
        "max_loop_lag_ms": round(max(lag.worst for lag in lags) * 1000, 2),
        "max_loop_stall_cpu_ms": round(max(lag.worst_cpu for lag in lags) * 1000, 2),
        "raw_rounds_rows_per_s": [round(rate) for rate in raws],
        "pipeline_rounds_events_per_s": [round(rate) for rate in pipelines],
    }


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the insert runs")
    parser.add_argument("--single", type=int, default=300, help="events for one-INSERT-per-event")
    parser.add_argument("--latency-events", type=int, default=200_000)
    parser.add_argument("--latency-rounds", type=int, default=5, help="rounds of track timing")
    parser.add_argument("--clickhouse-url", default=None)
    parser.add_argument("--data-dir", default="analytics-buffer-data/bench")

    def failure(args: argparse.Namespace, result: dict[str, Any]) -> str | None:
        if result["pipeline_written_counted_back"] != args.events * args.rounds:
            return "the pipeline did not write every event"
        return None

    return run(parser, main_async, failure)


if __name__ == "__main__":
    sys.exit(main())
