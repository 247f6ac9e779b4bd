"""``analytics-buffer demo`` run as a real subprocess, its JSON checked against storage.

The demo tracks synthetic traffic (sessions that all end with a session_end)
through the whole pipeline and counts it back from the storage it wrote to.
Here it runs as ``python -m analytics_buffer demo ... --json``, once on the
embedded engine (chdb, in a data directory of the test's own) and once on
the shared clickhouse-server 18.16 (a fresh database) with session state in
the shared redis-server. In the second run the test counts the rows back
itself, on its own connection, rather than trusting the demo's own count,
and checks that no session event was left pending in Redis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from analytics_buffer._redis_sessions import RedisSessionStore
from analytics_buffer.testing import ClickHouseServer

EVENTS = 20_000
_SUMMARY_FIELDS = (
    "accepted",
    "written",
    "dropped",
    "dead_lettered",
    "flushes",
    "seconds",
    "events_per_s",
    "sessions_ended",
    "screen_views_with_duration",
)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m analytics_buffer <args>`` with no ``ANALYTICS_BUFFER_*`` settings."""
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("ANALYTICS_BUFFER_")
    }
    return subprocess.run(
        [sys.executable, "-m", "analytics_buffer", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environ,
        timeout=60,
        check=False,
    )


def demo_summary(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one JSON object the demo prints with ``--json``, checked for what any run owes."""
    assert result.returncode == 0, result.stderr[-3_000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"--json prints one line, got {result.stdout!r}"
    summary: dict[str, Any] = json.loads(lines[0])
    missing = [name for name in _SUMMARY_FIELDS if name not in summary]
    assert not missing, f"the summary lacks {missing}: {summary}"
    assert summary["accepted"] == EVENTS
    assert summary["written"] == summary["accepted"], summary
    assert summary["distinct_written"] == summary["written"], "an event was stored twice"
    assert summary["dropped"] == summary["dead_lettered"] == summary["rejected"] == 0
    assert summary["flushes"] >= 1
    assert summary["seconds"] > 0
    assert summary["events_per_s"] == pytest.approx(EVENTS / summary["seconds"], rel=0.01)
    assert summary["sessions_ended"] > 0
    assert summary["screen_views_with_duration"] > 0
    assert summary["counted_events"] == summary["accepted"]
    assert 0 < summary["active_visitors"] <= summary["accepted"]
    return summary


@pytest.mark.embedded
def test_demo_on_the_embedded_engine(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = run_cli(
        "demo", "--events", str(EVENTS), "--json", "--data-dir", str(data_dir), cwd=tmp_path
    )
    summary = demo_summary(result)
    assert summary["engine"] == "embedded (chdb)"
    # The data went where it was told, and nowhere else.
    assert (data_dir / "chdb").is_dir()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]
    assert not (data_dir / "dead-letter").exists() or not any((data_dir / "dead-letter").iterdir())


def test_demo_on_clickhouse_with_sessions_in_redis(
    clickhouse_server: ClickHouseServer, clickhouse_url: str, redis_url: str, tmp_path: Path
) -> None:
    result = run_cli(
        "demo",
        "--events",
        str(EVENTS),
        "--json",
        "--clickhouse-url",
        clickhouse_url,
        "--redis-url",
        redis_url,
        "--data-dir",
        str(tmp_path / "data"),
        cwd=tmp_path,
    )
    summary = demo_summary(result)
    assert summary["engine"] == "clickhouse"

    # Counted back on the test's own connection.
    database = clickhouse_url.rsplit("/", 1)[1]
    [(count, unique, ended, with_duration)] = clickhouse_server.query(
        "SELECT count(), uniqExact(id), countIf(name = 'session_end'), "
        "countIf(name = 'screen_view' AND duration > 0) FROM events",
        database=database,
    )
    [(final,)] = clickhouse_server.query("SELECT count() FROM events FINAL", database=database)
    assert count == unique == final == summary["accepted"]
    assert (ended, with_duration) == (
        summary["sessions_ended"],
        summary["screen_views_with_duration"],
    )
    # The session state went through Redis, and every session of the demo ended, so no
    # shard has work left: nothing waits there (a claim is taken only where work is).
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() > 0, "no session state reached Redis"
    assert anyio.run(shards_with_work, redis_url) == []


async def shards_with_work(redis_url: str) -> list[int]:
    """The shards a claim finds work in: dirty sessions, or open ones idle for 0 s."""
    store = RedisSessionStore(redis_url)
    try:
        now = time.time()
        claims = await store.claim("test", now, timeout=0.0, lease=1.0, limit=16)
        return [claim.shard for claim in claims]
    finally:
        await store.aclose()


def test_demo_refuses_zero_events(tmp_path: Path) -> None:
    result = run_cli("demo", "--events", "0", "--json", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "analytics-buffer demo: --events must be at least 1, got 0" in result.stderr
    assert "Traceback" not in result.stderr
    # Refused before anything started: no engine data, no dead letters.
    assert list(tmp_path.iterdir()) == []
