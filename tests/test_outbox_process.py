"""Fault tests of the durable outbox with real processes and a real ClickHouse server.

A child process (``CHILD``) tracks events in a loop and, after each round of
100, appends the ids ``track`` accepted to a file (written to the page
cache, so they survive the child's SIGKILL; a round cut short by the kill
is simply not reported, and an id never reported is never checked). Then
the child is killed or terminated, a buffer on the same ``data_dir``
recovers and replays, and every reported id must be in ClickHouse exactly
once, read with ``FINAL`` (the table collapses by id; ClickHouse 18.16 has
no insert tokens), or in the quarantine or dead-letter files.
"""

from __future__ import annotations

import itertools
import signal
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process

from analytics_buffer import AnalyticsBuffer, Durability, Event, Settings
from analytics_buffer._deadletter import DeadLetters
from analytics_buffer._outbox import directory_figures
from analytics_buffer._segments import read_quarantine, scan
from analytics_buffer.testing import ClickHouseServer
from child_process import child_output, start_until_loaded
from clickhouse_queries import query
from test_outbox_cli import spill
from test_shutdown_process import outbox_ids

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

CHILD = """
import json, signal, sys
import anyio
from analytics_buffer import AnalyticsBuffer, Durability, Event, Settings

async def main(url, data_dir, ids_path, durability, flush_interval, batch, loaded_at):
    settings = Settings(
        clickhouse_url=url,
        data_dir=data_dir,
        durability=durability,
        flush_interval=float(flush_interval),
        max_batch_events=int(batch),
        shutdown_timeout=3.0,
        insert_timeout=1.0,
        connect_timeout=0.5,
        retry_attempts=2,
        retry_initial_backoff=0.05,
        retry_max_backoff=0.2,
        outbox_segment_bytes=256 * 1024,
    )
    accepted = 0
    with open(ids_path, "a") as ids, anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with AnalyticsBuffer(settings) as buffer:

            async def produce():
                nonlocal accepted
                told = False
                while True:
                    taken = []
                    for _ in range(100):
                        event = Event(name="load", project_id="p1", session_id="",
                                      properties={"n": accepted})
                        if buffer.track(event):
                            taken.append(str(event.id))
                    ids.write("".join(f"{i}\\n" for i in taken))
                    ids.flush()
                    accepted += len(taken)
                    if not told and accepted >= int(loaded_at):
                        print("loaded", flush=True)
                        told = True
                    await anyio.sleep(0.002)

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(produce)
                async for _ in signals:
                    break
                tasks.cancel_scope.cancel()
    print("exited", flush=True)

anyio.run(main, *sys.argv[1:])
"""


async def start_child(
    url: str,
    tmp_path: Path,
    durability: str,
    *,
    flush_interval: float,
    loaded_at: int,
    batch: int = 2_000,
) -> Process:
    args = [
        url,
        str(tmp_path / "data"),
        str(tmp_path / "ids"),
        durability,
        str(flush_interval),
        str(batch),
        str(loaded_at),
    ]
    return await start_until_loaded(CHILD, args, tmp_path, timeout=60)


async def kill(process: Process) -> None:
    process.send_signal(signal.SIGKILL)
    await process.wait()
    await process.aclose()


def reported_ids(tmp_path: Path) -> set[uuid.UUID]:
    """The ids the child reported accepted (whole lines only: a kill may cut the last)."""
    text = (tmp_path / "ids").read_text()
    return {uuid.UUID(line) for line in text.split("\n")[:-1]}


async def recover(url: str, tmp_path: Path, durability: Durability = "wal") -> dict[str, Any]:
    """Start a buffer on the child's data_dir: it recovers and replays what was left."""
    settings = Settings(clickhouse_url=url, data_dir=str(tmp_path / "data"), durability=durability)
    async with AnalyticsBuffer(settings) as buffer:
        with anyio.fail_after(60):
            await buffer.replay_outbox()
        stats = buffer.stats()._asdict()
    assert directory_figures(tmp_path / "data" / "outbox")[0] == 0, "the outbox is not empty"
    return stats


async def stored_counts(url: str) -> dict[uuid.UUID, int]:
    rows = await query(url, "SELECT id, count() FROM events FINAL GROUP BY id")
    return {uuid.UUID(str(row[0])): int(row[1]) for row in rows}


def assert_each_once(reported: set[uuid.UUID], counts: dict[uuid.UUID, int]) -> None:
    missing = reported - set(counts)
    assert not missing, f"{len(missing)} of {len(reported)} accepted events are nowhere"
    twice = [event_id for event_id, count in counts.items() if count > 1]
    assert not twice, f"{len(twice)} events stored more than once under FINAL"


async def test_wal_sigkill_during_appends_loses_nothing_accepted(
    clickhouse_url: str, tmp_path: Path
) -> None:
    """Nothing is flushed yet (30 s interval): the accepted events exist only in the log."""
    process = await start_child(
        clickhouse_url, tmp_path, "wal", flush_interval=30.0, batch=100_000, loaded_at=20_000
    )
    await kill(process)
    reported = reported_ids(tmp_path)
    assert len(reported) >= 20_000
    assert await stored_counts(clickhouse_url) == {}, "nothing was written before the kill"

    stats = await recover(clickhouse_url, tmp_path)
    assert stats["outbox_replayed"] >= len(reported)
    assert_each_once(reported, await stored_counts(clickhouse_url))


async def test_wal_sigkill_during_a_flush_recovers_everything_accepted(
    private_clickhouse: ClickHouseServer, tmp_path: Path
) -> None:
    """The server is frozen, so the child is killed with INSERTs in flight."""
    server = private_clickhouse
    process = await start_child(server.url, tmp_path, "wal", flush_interval=0.2, loaded_at=5_000)
    server.pause()
    try:
        # Load goes on against the frozen server for a moment: inserts hang mid-flush.
        await anyio.sleep(1.0)
        await kill(process)
    finally:
        server.resume()
    reported = reported_ids(tmp_path)
    before = await stored_counts(server.url)
    assert before, "some batches were written before the freeze"
    assert len(before) < len(reported), "some accepted events were not written yet"

    await recover(server.url, tmp_path)
    assert_each_once(reported, await stored_counts(server.url))


async def test_sigterm_under_load_leaves_everything_in_clickhouse_or_the_outbox(
    private_clickhouse: ClickHouseServer, tmp_path: Path
) -> None:
    """wal durability, server frozen at the signal: the child still exits within its
    shutdown_timeout, and whatever it could not write is in the outbox."""
    server = private_clickhouse
    process = await start_child(server.url, tmp_path, "wal", flush_interval=0.5, loaded_at=10_000)
    server.pause()
    started = anyio.current_time()
    try:
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(20):
            await process.wait()
        took = anyio.current_time() - started
    finally:
        server.resume()
        await process.aclose()
    assert process.returncode == 0, child_output(tmp_path)
    assert took < 3.0 * 2 + 3.0, "shutdown overran shutdown_timeout (3 s per actor)"
    reported = reported_ids(tmp_path)
    stored = set(await stored_counts(server.url))
    waiting = set(outbox_ids(tmp_path))
    assert waiting, "the frozen server left events for the outbox"
    assert not reported - stored - waiting, "accepted events neither stored nor in the outbox"
    assert DeadLetters(tmp_path / "data" / "dead-letter", "events").read() == []

    await recover(server.url, tmp_path)
    assert_each_once(reported, await stored_counts(server.url))


@pytest.mark.parametrize("durability", ["memory", "wal"])
async def test_clickhouse_down_under_load_spills_stays_bounded_and_drains(
    private_clickhouse: ClickHouseServer, tmp_path: Path, durability: Durability
) -> None:
    server = private_clickhouse
    settings = Settings(
        clickhouse_url=server.url,
        data_dir=str(tmp_path / "data"),
        durability=durability,
        flush_interval=0.1,
        max_batch_events=500,
        max_buffered_events=5_000,
        insert_timeout=1.0,
        connect_timeout=0.3,
        retry_attempts=2,
        retry_initial_backoff=0.05,
        retry_max_backoff=0.2,
    )
    accepted: list[Event] = []
    screens: dict[str, list[Event]] = {}
    most_buffered = 0
    clock = datetime.now(UTC).replace(microsecond=0)
    async with AnalyticsBuffer(settings) as buffer:

        async def load(seconds: float) -> None:
            nonlocal most_buffered, clock
            with anyio.move_on_after(seconds):
                while True:
                    for _ in range(50):
                        event = Event(name="steady", project_id="p1", properties={"n": 1})
                        if buffer.track(event):
                            accepted.append(event)
                    # A screen view for one of 20 sessions, 250 ms of event time apart.
                    clock += timedelta(milliseconds=250)
                    session = f"s{len(accepted) % 20}"
                    view = Event(
                        name="screen_view",
                        project_id="p1",
                        session_id=session,
                        created_at=clock,
                        path=f"/{len(screens.get(session, []))}",
                    )
                    if buffer.track(view):
                        accepted.append(view)
                        screens.setdefault(session, []).append(view)
                    most_buffered = max(most_buffered, buffer.stats().buffered)
                    await anyio.sleep(0.01)

        await load(0.5)
        server.stop()
        await load(4.0)
        during = buffer.stats()
        server.start()
        await load(0.5)
        await buffer.flush()
        with anyio.fail_after(60):
            await buffer.replay_outbox()
    # Leaving the block wrote the waiting screen views; the outbox is empty again.
    final = buffer.stats()

    assert most_buffered <= settings.max_buffered_events
    assert during.outbox_spilled > 0, "the outage sent batches to the outbox"
    assert final.dropped == 0
    assert final.dead_lettered == 0
    assert final.outbox_segments == 0
    reported = {event.id for event in accepted}
    counts = await stored_counts(server.url)
    assert_each_once(reported, {i: c for i, c in counts.items() if i in reported})
    # Durations pair each screen view with the next of its session, outage or not.
    rows = await query(
        server.url,
        "SELECT toString(id), duration FROM events FINAL WHERE name = 'screen_view'",
    )
    durations = {uuid.UUID(row[0]): int(row[1]) for row in rows}
    for views in screens.values():
        for view, following in itertools.pairwise(views):
            expected = (following.created_at - view.created_at) // timedelta(milliseconds=1)
            assert durations[view.id] == expected


async def test_a_corrupt_spilled_segment_replays_the_good_records_and_quarantines_the_bad(
    clickhouse_url: str, tmp_path: Path
) -> None:
    batch = [Event(name="c", project_id="p1", properties={"n": i}) for i in range(50)]
    directory = tmp_path / "data" / "outbox"
    flipped = spill(tmp_path / "data", batch)
    others = [Event(name="t", project_id="p1", properties={"n": i}) for i in range(5)]
    truncated = spill(tmp_path / "data", others)
    data = bytearray(flipped.read_bytes())
    offsets = [offset for offset, _ in scan(bytes(data)).frames]
    data[offsets[7] + 20] ^= 0xFF
    flipped.write_bytes(bytes(data))
    tail = scan(truncated.read_bytes()).frames[-1][0]
    truncated.write_bytes(truncated.read_bytes()[: tail + 5])

    stats = await recover(clickhouse_url, tmp_path, durability="memory")
    counts = await stored_counts(clickhouse_url)
    # The flipped record and the torn last one are quarantined; the rest is stored once.
    expected = {event.id for event in batch + others} - {batch[7].id, others[-1].id}
    assert set(counts) == expected
    assert all(count == 1 for count in counts.values())
    assert stats["outbox_quarantined"] == 2
    reasons = sorted(entry.reason.split(" ")[0] for entry in read_quarantine(directory))
    assert reasons == ["checksum", "truncated"]
