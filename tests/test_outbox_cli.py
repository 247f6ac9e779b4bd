"""``analytics-buffer outbox status|replay|inspect`` on a real outbox and a real server."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from analytics_buffer import Event
from analytics_buffer._cli import main
from analytics_buffer._outbox import Outbox
from clickhouse_queries import query


def spill(data_dir: Path, events: list[Event]) -> Path:
    outbox = Outbox(
        data_dir / "outbox",
        wal=False,
        max_bytes=1 << 30,
        segment_bytes=1 << 20,
        segment_age=10.0,
        fsync_interval=0.1,
        fsync_batch=100,
    )
    outbox.open()
    path = outbox.spill(events).path
    outbox.close()
    return path


def test_status_inspect_and_replay(
    clickhouse_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = [Event(name="cli", project_id="p1", properties={"n": i}) for i in range(25)]
    path = spill(tmp_path, batch[:20])
    spill(tmp_path, batch[20:])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # the last record of the first segment goes bad
    path.write_bytes(bytes(data))

    assert main(["outbox", "status", "--data-dir", str(tmp_path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["segments"] == 2
    assert status["records"] == 24
    assert status["bad_records"] == 1
    assert status["quarantined"] == 0
    assert status["held_by_a_running_buffer"] is False
    assert status["bytes"] > 0

    assert main(["outbox", "inspect", "--data-dir", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["event"]["id"] for line in lines if "event" in line] == [
        str(event.id) for event in batch[:19] + batch[20:]
    ]
    (bad,) = [line for line in lines if "bad" in line]
    assert bad["bad"] == "checksum mismatch"

    args = ["--data-dir", str(tmp_path), "--clickhouse-url", clickhouse_url]
    assert main(["outbox", "replay", *args]) == 0
    assert capsys.readouterr().out.strip() == (
        "replayed 24 events from 2 segments (0 dead-lettered)"
    )
    assert main(["outbox", "status", "--data-dir", str(tmp_path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["segments"], status["records"], status["quarantined"]) == (0, 0, 1)


def test_replay_stores_every_record_once(clickhouse_url: str, tmp_path: Path) -> None:
    batch = [Event(name="cli", project_id="p1", properties={"n": i}) for i in range(30)]
    spill(tmp_path, batch)
    args = ["--data-dir", str(tmp_path), "--clickhouse-url", clickhouse_url]
    # Twice: the second run finds nothing, so nothing is stored twice.
    assert main(["outbox", "replay", *args]) == 0
    assert main(["outbox", "replay", *args]) == 0
    sql = "SELECT toString(id), count() FROM events GROUP BY id"
    rows = anyio.run(query, clickhouse_url, sql)
    assert sorted(rows) == sorted((str(event.id), 1) for event in batch)


def test_replay_against_an_unreachable_server_exits_1_and_keeps_the_segment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spill(tmp_path, [Event(name="cli", project_id="p1")])
    url = "clickhouse://default:@127.0.0.1:1/default?connect_timeout=0.2"
    assert main(["outbox", "replay", "--data-dir", str(tmp_path), "--clickhouse-url", url]) == 1
    assert "unreachable" in capsys.readouterr().err
    assert len(list((tmp_path / "outbox").glob("*.seg"))) == 1
