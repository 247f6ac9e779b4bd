"""``analytics-buffer outbox status|replay|inspect``: look into the disk outbox, or drain it.

* ``status``: segments, bytes, the oldest segment's age, records waiting,
  records quarantined, and whether a running buffer holds the directory;
* ``replay``: write every waiting segment to ClickHouse now (the same
  chunks and tokens as the buffer's own replay), deleting each once
  written; refused while a running buffer holds the directory (it replays
  by itself), and stopped at the first transient failure (exit status 1);
* ``inspect``: print every record as one JSON line (read-only: nothing is
  cut, sealed or quarantined).

The directory is ``<data_dir>/outbox``; ``--data-dir`` overrides
``ANALYTICS_BUFFER_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import msgspec

from ._deadletter import DeadLetters
from ._exceptions import OutboxError, PermanentSinkError, TransientSinkError
from ._outbox import Outbox, directory_figures
from ._replay import REPLAY_CHUNK_BYTES
from ._segments import decode_payload, read_quarantine, scan
from ._settings import Settings

__all__ = ("configure", "run")

_encoder = msgspec.json.Encoder()


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``outbox`` subcommand's arguments."""
    parser.add_argument("action", choices=("status", "replay", "inspect"))
    parser.add_argument("--data-dir", metavar="DIR", help="the buffer's data_dir")
    parser.add_argument("--clickhouse-url", metavar="URL", help="where replay writes")
    parser.add_argument("--table", metavar="NAME", help="the events table (default: events)")
    parser.add_argument("--json", action="store_true", help="status as one JSON object")


async def run(args: argparse.Namespace) -> int:
    """Run ``outbox <action>``; return the exit status."""
    overrides = {
        name: getattr(args, name)
        for name in ("data_dir", "clickhouse_url", "table")
        if getattr(args, name) is not None
    }
    settings = Settings.from_env(**overrides)
    directory = Path(settings.data_dir) / "outbox"
    if args.action == "status":
        return _status(directory, as_json=args.json)
    if args.action == "inspect":
        return _inspect(directory)
    return await _replay(settings, directory)


def _held(directory: Path) -> bool:
    """Whether a running buffer holds the directory's lock."""
    try:
        fd = os.open(directory / "outbox.lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _records(path: Path) -> tuple[int, int]:
    found = scan(path.read_bytes())
    return len(found.frames), len(found.bad) + (found.tail is not None)


def _status(directory: Path, *, as_json: bool) -> int:
    segments, size, oldest = directory_figures(directory)
    paths = sorted([*directory.glob("*.seg"), *directory.glob("*.open")])
    counted = [_records(path) for path in paths]
    status: dict[str, Any] = {
        "directory": str(directory),
        "segments": segments,
        "bytes": size,
        "oldest_age_s": round(oldest, 3),
        "records": sum(good for good, _ in counted),
        "bad_records": sum(bad for _, bad in counted),
        "quarantined": len(read_quarantine(directory)),
        "held_by_a_running_buffer": _held(directory),
    }
    if as_json:
        print(_encoder.encode(status).decode())
    else:
        for key, value in status.items():
            print(f"{key:<26}{value}")
    return 0


def _inspect(directory: Path) -> int:
    for path in sorted([*directory.glob("*.seg"), *directory.glob("*.open")]):
        found = scan(path.read_bytes())
        lines: list[tuple[int, dict[str, Any]]] = []
        for offset, payload in found.frames:
            try:
                record: dict[str, Any] = {"event": msgspec.to_builtins(decode_payload(payload))}
            except (msgspec.DecodeError, ValueError) as exc:
                record = {"bad": f"not an event: {exc}"}
            lines.append((offset, record))
        for region in [*found.bad, *([found.tail] if found.tail else [])]:
            lines.append(
                (region.start, {"bad": region.reason, "length": region.stop - region.start})
            )
        for offset, record in sorted(lines, key=lambda line: line[0]):
            line = {"segment": path.name, "offset": offset, **record}
            print(_encoder.encode(line).decode())
    return 0


async def _replay(settings: Settings, directory: Path) -> int:
    from ._engines import create_sink

    outbox = Outbox.for_settings(settings, wal=False)
    segments = await anyio.to_thread.run_sync(outbox.open)
    if not outbox.owner:
        raise OutboxError(f"{directory} is held by a running buffer, which replays it itself")
    dead_letters = DeadLetters(Path(settings.data_dir) / "dead-letter", settings.table)
    sink = create_sink(settings)
    written = dead = done = 0
    try:
        await sink.open()
        for segment in segments:
            chunks = await anyio.to_thread.run_sync(outbox.chunks, segment, REPLAY_CHUNK_BYTES)
            for span in chunks:
                chunk = await anyio.to_thread.run_sync(outbox.read_chunk, segment, span)
                if not chunk:
                    continue
                token = f"{segment.token}:{span.number}"
                try:
                    await sink.insert(chunk, token)
                except PermanentSinkError as exc:
                    await dead_letters.write(chunk, reason=str(exc), code=exc.code, token=token)
                    dead += len(chunk)
                else:
                    written += len(chunk)
            await anyio.to_thread.run_sync(outbox.remove, segment)
            done += 1
    except TransientSinkError as exc:
        print(
            f"replay stopped after {done} of {len(segments)} segments: {exc}",
            file=sys.stderr,
        )
        return 1
    finally:
        await sink.aclose()
        await anyio.to_thread.run_sync(outbox.close)
    print(f"replayed {written} events from {done} segments ({dead} dead-lettered)")
    return 0
