"""A real process gets SIGTERM under load: every accepted event survives shutdown.

The child (``CHILD`` below, run with ``sys.executable -c``) tracks events in a
tight loop into an ``AnalyticsBuffer`` on a real ClickHouse server, with a
long flush interval so a good part of what it accepted is still buffered when
the signal comes. Its SIGTERM handler (``anyio.open_signal_receiver``) stops
the load and leaves the ``async with``, which flushes within
``shutdown_timeout``. The child then writes the ids it accepted and its stats
to a JSON file; the test checks each id is in ClickHouse, in the disk outbox
or in the dead-letter file.
"""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process

from analytics_buffer._deadletter import DeadLetters
from analytics_buffer._segments import decode_payload, scan
from analytics_buffer.testing import ClickHouseServer
from child_process import child_output, start_until_loaded
from clickhouse_queries import query

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

SHUTDOWN_TIMEOUT = 3.0

CHILD = """
import json, signal, sys
import anyio
from analytics_buffer import AnalyticsBuffer, Event, Settings

async def main(url, data_dir, out, shutdown_timeout, loaded_at):
    settings = Settings(
        clickhouse_url=url,
        data_dir=data_dir,
        flush_interval=30.0,
        max_batch_events=1_024,  # never a multiple of the 100 a tick
        shutdown_timeout=float(shutdown_timeout),
        insert_timeout=0.5,
        connect_timeout=0.5,
        retry_initial_backoff=0.05,
        retry_max_backoff=0.2,
    )
    accepted = []
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with AnalyticsBuffer(settings) as buffer:

            async def produce():
                told = False
                while True:
                    for _ in range(100):
                        event = Event(name="load", project_id="p1", properties={"n": len(accepted)})
                        if buffer.track(event):
                            accepted.append(str(event.id))
                    if not told and len(accepted) >= int(loaded_at):
                        print("loaded", flush=True)
                        told = True
                    await anyio.sleep(0.002)

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(produce)
                async for _ in signals:
                    break
                tasks.cancel_scope.cancel()
            at_signal = buffer.stats()._asdict()
        final = buffer.stats()._asdict()
    with open(out, "w") as file:
        json.dump({"ids": accepted, "at_signal": at_signal, "final": final}, file)

anyio.run(main, *sys.argv[1:])
"""


async def run_child_until_loaded(
    url: str, tmp_path: Path, *, loaded_at: int = 5_000
) -> tuple[Process, Path]:
    """Start the child and return once it has accepted ``loaded_at`` events."""
    out = tmp_path / "accepted.json"
    args = [url, str(tmp_path / "data"), str(out), str(SHUTDOWN_TIMEOUT), str(loaded_at)]
    process = await start_until_loaded(CHILD, args, tmp_path, timeout=30)
    return process, out


async def terminate_and_wait(process: Process, tmp_path: Path) -> float:
    """SIGTERM the child, wait for it to exit and return how long that took."""
    started = anyio.current_time()
    process.send_signal(signal.SIGTERM)
    try:
        # Interpreter teardown comes on top of the shutdown itself.
        with anyio.fail_after(SHUTDOWN_TIMEOUT * 3 + 5):
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"the child outlived its shutdown\n{child_output(tmp_path)}")
    finally:
        await process.aclose()
    assert process.returncode == 0, child_output(tmp_path)
    assert "Traceback" not in child_output(tmp_path)
    return anyio.current_time() - started


def dead_lettered_ids(tmp_path: Path) -> list[uuid.UUID]:
    letters = DeadLetters(tmp_path / "data" / "dead-letter", "events").read()
    return [letter.event.id for letter in letters]


async def test_sigterm_under_load_flushes_every_accepted_event(
    clickhouse_url: str, tmp_path: Path
) -> None:
    process, out = await run_child_until_loaded(clickhouse_url, tmp_path)
    took = await terminate_and_wait(process, tmp_path)

    report = json.loads(out.read_text())
    accepted = {uuid.UUID(text) for text in report["ids"]}
    at_signal, final = report["at_signal"], report["final"]
    assert len(accepted) == len(report["ids"]) == final["accepted"] >= 5_000
    # The shutdown had real work to do: events were still held when the signal came.
    assert at_signal["buffered"] > 0
    assert at_signal["written"] > 0
    assert final["written"] == final["accepted"]
    assert final["buffered"] == final["dead_lettered"] == final["dropped"] == 0
    assert took < SHUTDOWN_TIMEOUT + 2.0, "shutdown took longer than shutdown_timeout"

    rows = await query(clickhouse_url, "SELECT id FROM events")
    stored = [uuid.UUID(str(row[0])) for row in rows]
    assert len(stored) == len(set(stored)), "an event was stored twice"
    assert set(stored) == accepted
    assert dead_lettered_ids(tmp_path) == []


async def test_sigterm_with_clickhouse_stalled_moves_what_it_cannot_write_to_the_outbox(
    private_clickhouse: ClickHouseServer, tmp_path: Path
) -> None:
    """The server freezes (SIGSTOP) just before the signal: the shutdown still ends
    within its bound, and what could not be written is in the disk outbox."""
    server = private_clickhouse
    process, out = await run_child_until_loaded(server.url, tmp_path)
    server.pause()
    try:
        took = await terminate_and_wait(process, tmp_path)
    finally:
        server.resume()

    report = json.loads(out.read_text())
    accepted = {uuid.UUID(text) for text in report["ids"]}
    final = report["final"]
    assert len(accepted) == final["accepted"] >= 5_000
    assert report["at_signal"]["buffered"] > 0
    assert final["outbox_spilled"] > 0
    assert final["dead_lettered"] == 0
    assert final["written"] + final["outbox_spilled"] == final["accepted"]
    assert final["buffered"] == 0

    stored = {uuid.UUID(str(row[0])) for row in await query(server.url, "SELECT id FROM events")}
    waiting = outbox_ids(tmp_path)
    assert len(waiting) == final["outbox_spilled"]
    missing = accepted - stored - set(waiting)
    assert not missing, f"{len(missing)} accepted events are nowhere"
    assert dead_lettered_ids(tmp_path) == []
    # The event buffer hands its last batch over at once; the writer, stuck on the
    # frozen server, is cut short at its shutdown_timeout and moves what it holds
    # to the outbox synchronously. The 2 s are for the interpreter's own exit.
    assert took < SHUTDOWN_TIMEOUT + 2.0


def outbox_ids(tmp_path: Path) -> list[uuid.UUID]:
    """The ids in the outbox's sealed segments."""
    found = []
    for path in (tmp_path / "data" / "outbox").glob("*.seg"):
        found += [decode_payload(payload).id for _, payload in scan(path.read_bytes()).frames]
    return found
