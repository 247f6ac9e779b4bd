"""What ``durability="wal"`` costs: the pipeline in ``wal`` mode against ``memory`` mode.

Measured side by side in one run, against one ClickHouse server (a
throwaway ``clickhouse-server`` unless ``--clickhouse-url`` is given), each
mode with a fresh ``data_dir``, the modes alternating for ``--rounds``
rounds (the best round of each mode is reported, as the machine is shared).
Each run starts on a merged table (``OPTIMIZE TABLE ... FINAL``), as in
``benchmarks/throughput.py``: otherwise ClickHouse's background merges of
one run's parts take the CPU from the next run, which is always the other
mode (the ``wal`` run of each round follows a ``memory`` run):

* ``memory_events_per_s`` / ``wal_events_per_s``: prebuilt events through
  ``put`` -> EventBuffer -> Writer -> ClickHouse at default settings, timed
  from the first event to the end of ``flush()``; in ``wal`` mode every
  event is also appended to the outbox's log before ``put`` returns;
* ``wal_to_memory_ratio``: their ratio (target: at least 0.6);
* ``fsyncs_per_s``: fsyncs of the log per second while events arrive in the
  ``wal`` run (``fsync_interval`` is 0.1 s, so 10/s or more means one at
  least every 100 ms); ``slowest_fsync_ms``: the longest of them;
* ``track_median_us_memory`` / ``track_median_us_wal``: one ``track`` call,
  each timed alone, in each mode.

Inputs are built before anything is timed and frozen out of the garbage
collector, as in ``benchmarks/throughput.py``.

Usage: ``python benchmarks/outbox.py [--events N] [--rounds N] [--json] [--clickhouse-url URL]``
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _measure import (
    benchmark_parser,
    clickhouse,
    merge_parts,
    progress,
    put_all,
    run,
    track_samples,
)
from throughput import make_events

from analytics_buffer import AnalyticsBuffer, Durability, Event, Settings


async def pipeline(settings: Settings, events: list[Event]) -> tuple[float, float, float, int]:
    """Return events/s, fsyncs/s while events arrive, the slowest fsync (ms), events written."""
    async with AnalyticsBuffer(settings) as buffer:
        started = time.perf_counter()
        await put_all(buffer, events)
        arriving = time.perf_counter() - started
        fsyncs = buffer.stats().outbox_fsyncs
        await buffer.flush()
        seconds = time.perf_counter() - started
        stats = buffer.stats()
        outbox = buffer._outbox
        slowest = outbox.slowest_fsync * 1000 if outbox is not None else 0.0
    return len(events) / seconds, fsyncs / arriving, slowest, stats.written


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with clickhouse(args.clickhouse_url) as url, tempfile.TemporaryDirectory() as scratch:
        base = Settings(clickhouse_url=url, table="bench_outbox")
        async with AnalyticsBuffer(base.replace(data_dir=f"{scratch}/setup")):
            pass
        rounds: dict[Durability, list[tuple[float, float, float]]] = {"memory": [], "wal": []}
        written_ok = True
        latency: dict[Durability, float] = {}
        for round_number in range(args.rounds):
            modes: tuple[Durability, ...] = ("memory", "wal")
            for mode in modes:
                events = make_events(args.events, f"bench-{mode}-{round_number}")
                gc.collect()
                gc.freeze()
                await merge_parts(url, base.table)
                progress(f"round {round_number + 1}: {mode}")
                data_dir = Path(scratch) / f"{mode}-{round_number}"
                settings = base.replace(durability=mode, data_dir=str(data_dir))
                rate, fsyncs, slowest, written = await pipeline(settings, events)
                written_ok &= written == len(events)
                rounds[mode].append((rate, fsyncs, slowest))
                gc.unfreeze()
        for mode in modes:
            events = make_events(args.latency_events, f"bench-latency-{mode}")
            settings = base.replace(durability=mode, data_dir=f"{scratch}/latency-{mode}")
            latency[mode] = statistics.median(await track_samples(settings, events))

    memory = max(rate for rate, _, _ in rounds["memory"])
    wal, fsyncs, slowest = max(rounds["wal"])
    return {
        "events": args.events,
        "rounds": args.rounds,
        "memory_events_per_s": round(memory),
        "wal_events_per_s": round(wal),
        "wal_to_memory_ratio": round(wal / memory, 3),
        "fsyncs_per_s": round(fsyncs, 1),
        "slowest_fsync_ms": round(slowest, 1),
        "memory_rounds_events_per_s": [round(rate) for rate, _, _ in rounds["memory"]],
        "wal_rounds_events_per_s": [round(rate) for rate, _, _ in rounds["wal"]],
        "track_median_us_memory": round(latency["memory"], 3),
        "track_median_us_wal": round(latency["wal"], 3),
        "every_event_written": written_ok,
    }


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-events", type=int, default=100_000)
    parser.add_argument("--clickhouse-url", default=None)

    def failure(args: argparse.Namespace, result: dict[str, Any]) -> str | None:
        return None if result["every_event_written"] else "a run did not write every event"

    return run(parser, main_async, failure)


if __name__ == "__main__":
    sys.exit(main())
