"""What the benchmark scripts share: how they feed and time a buffer, and how they run."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.lowlevel
from _report import print_result
from asynch import Connection

from analytics_buffer import AnalyticsBuffer, Event, Settings
from analytics_buffer.testing import ClickHouseServer


def progress(step: str) -> None:
    """Say on stderr what is being measured now (stdout is for the figures)."""
    print(f"... {step}", file=sys.stderr, flush=True)


@contextmanager
def clickhouse(url: str | None) -> Iterator[str]:
    """``url``, or that of a throwaway ``clickhouse-server`` while the block runs."""
    if url is not None:
        yield url
        return
    with ClickHouseServer() as server:
        yield server.url


async def count_rows(url: str, sql: str) -> int:
    """The single number ``sql`` selects."""
    async with Connection(dsn=url) as conn, conn.cursor() as cursor:
        await cursor.execute(sql)
        rows = await cursor.fetchall()
        return int(rows[0][0])


async def merge_parts(url: str, table: str) -> None:
    """Merge ``table``'s parts now, so one measurement's background merges
    do not take the CPU from the next (each starts on a merged table)."""
    async with Connection(dsn=url) as conn, conn.cursor() as cursor:
        await cursor.execute(f"OPTIMIZE TABLE {table} FINAL")


async def put_all(buffer: AnalyticsBuffer, events: list[Event]) -> None:
    """``put`` every event, yielding after each 100 as a service yields between requests.

    A service's turn is one request, one event; 100 keeps the producer's own
    turn near 0.3 ms. With 1,000 a turn took 3-4 ms, a part of every loop-lag
    figure that was the producer's and not the pipeline's (measured side by
    side: worst lag 10.7-14.8 ms against 7.2-11.4 ms, throughput unchanged).
    """
    for start in range(0, len(events), 100):
        for event in events[start : start + 100]:
            await buffer.put(event)
        await anyio.lowlevel.checkpoint()


async def track_samples(settings: Settings, events: list[Event]) -> list[float]:
    """Microseconds of each ``track`` call, timed alone; yield every 1,000 so the writer drains."""
    samples: list[float] = []
    clock = time.perf_counter_ns
    async with AnalyticsBuffer(settings) as buffer:
        track = buffer.track
        for start in range(0, len(events), 1000):
            for event in events[start : start + 1000]:
                before = clock()
                track(event)
                samples.append((clock() - before) / 1000)
            await anyio.lowlevel.checkpoint()
            if buffer.stats().buffered > settings.max_buffered_events // 2:
                await buffer.flush()
        assert buffer.stats().dropped == 0, "the latency run must not hit the bound"
    return samples


def benchmark_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the script's docstring."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])


def run(
    parser: argparse.ArgumentParser,
    measure: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]],
    failure: Callable[[argparse.Namespace, dict[str, Any]], str | None] = lambda _a, _r: None,
) -> int:
    """Add ``--json``, measure, and print the figures; exit status 1 if ``failure`` says why."""
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    error = failure(args, result)
    if error is not None:
        print(f"ERROR: {error}", file=sys.stderr)
        return 1
    print_result(result, as_json=args.json)
    return 0
