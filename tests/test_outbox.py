"""The outbox alone: framing, the write-ahead log, recovery, quarantine, the cap, ENOSPC."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from analytics_buffer import (
    ActorDeadError,
    AnalyticsBuffer,
    BufferFull,
    Event,
    OutboxError,
    OutboxFull,
    Settings,
)
from analytics_buffer._outbox import Outbox, Segment, directory_figures
from analytics_buffer._replay import REPLAY_CHUNK_BYTES
from analytics_buffer._segments import (
    HEADER,
    decode_payload,
    encode_frame,
    encode_frames,
    read_quarantine,
    scan,
)
from analytics_buffer.testing import free_port
from memory_sink import MemorySink


def make_outbox(directory: Path, **changes: Any) -> Outbox:
    values: dict[str, Any] = {
        "wal": True,
        "max_bytes": 64 * 1024 * 1024,
        "segment_bytes": 64 * 1024,
        "segment_age": 3600.0,
        "fsync_interval": 0.05,
        "fsync_batch": 1000,
        **changes,
    }
    return Outbox(directory, **values)


def events(count: int, name: str = "e") -> list[Event]:
    return [
        Event(name=f"{name}{i}", project_id="p1", properties={"i": i, "zero": 0})
        for i in range(count)
    ]


def events_in(outbox: Outbox, segment: Segment) -> list[Event]:
    return [
        event
        for chunk in outbox.chunks(segment, 4096)
        for event in outbox.read_chunk(segment, chunk)
    ]


def stored(directory: Path) -> list[Event]:
    """Every event in the directory's sealed segments, in file order (no quarantine)."""
    outbox = make_outbox(directory, wal=False)
    return [event for segment in outbox.replayable() for event in events_in(outbox, segment)]


def kill(outbox: Outbox) -> None:
    """Abandon ``outbox`` as a SIGKILL would: no seal, no fsync; only the page cache stays."""
    outbox._sync_once = lambda: None  # type: ignore[method-assign]
    outbox._stopping = True
    outbox._wake.set()
    assert outbox._thread is not None
    outbox._thread.join()
    assert outbox._lock_fd is not None
    os.close(outbox._lock_fd)
    outbox._lock_fd = None


def test_frames_round_trip_and_a_zero_tail_ends_the_data() -> None:
    batch = events(3)
    data = b"".join(encode_frame(event) for event in batch) + bytes(1000)
    found = scan(data)
    assert [decode_payload(payload) for _, payload in found.frames] == batch
    assert found.bad == []
    assert found.tail is None


def test_a_killed_process_loses_nothing_it_appended(tmp_path: Path) -> None:
    """The log is in the page cache as soon as append returns: no close, no fsync needed."""
    batch = events(500)
    outbox = make_outbox(tmp_path, segment_bytes=16 * 1024)
    assert outbox.open() == []
    for event in batch:
        outbox.append(event)
    kill(outbox)

    reopened = make_outbox(tmp_path)
    segments = reopened.open()
    try:
        assert len(segments) > 1, "16 KiB segments: the 500 events span several"
        assert [event for segment in segments for event in events_in(reopened, segment)] == batch
        assert not list(tmp_path.glob("*.open"))
    finally:
        reopened.close()


def test_settled_segments_are_deleted_and_a_clean_close_leaves_only_the_unsettled(
    tmp_path: Path,
) -> None:
    batch = events(400)
    outbox = make_outbox(tmp_path, segment_bytes=8 * 1024)
    outbox.open()
    for event in batch:
        outbox.append(event)
    outbox.settle(batch[:300])
    outbox.close()
    left = stored(tmp_path)
    # Whole segments are deleted once every event in them is settled, never a part of one.
    first = batch.index(left[0])
    assert left == batch[first:]
    per_segment = 8 * 1024 // len(encode_frame(batch[0])) + 1
    assert 100 <= len(left) < 100 + per_segment


def test_an_event_appended_twice_settles_at_once(tmp_path: Path) -> None:
    """One id, two records (a caller tracked the same event twice): one settle is enough."""
    batch = events(3)
    outbox = make_outbox(tmp_path)
    outbox.open()
    for event in [*batch, batch[1]]:
        outbox.append(event)
    outbox.settle(batch)
    outbox.close()
    assert stored(tmp_path) == []


def test_a_failed_write_stops_the_log_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = make_outbox(tmp_path)
    outbox.open()
    kept = events(5)
    for event in kept:
        outbox.append(event)

    def fail(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(os, "pwrite", fail)
        with pytest.raises(OutboxError, match=r"cannot write to the outbox log.*Input/output"):
            outbox.append(events(1, "failed")[0])
    # Part of a record may be on disk: nothing is written after it.
    with pytest.raises(OutboxError, match="takes no events"):
        outbox.append(events(1, "late")[0])
    assert outbox.refused == 2
    outbox.close()
    assert stored(tmp_path) == kept


def test_the_fsync_thread_syncs_within_the_interval(tmp_path: Path) -> None:
    outbox = make_outbox(tmp_path, fsync_interval=0.02)
    outbox.open()
    try:
        outbox.append(events(1)[0])
        deadline = time.monotonic() + 5
        while outbox.fsyncs == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert outbox.fsyncs >= 1
    finally:
        outbox.close()


def test_an_idle_segment_is_sealed_once_it_reaches_its_age(tmp_path: Path) -> None:
    # The thread only syncs when told: the test runs its ticks itself.
    outbox = make_outbox(tmp_path, segment_age=0.0, fsync_interval=3600.0, fsync_batch=10**6)
    outbox.open()
    try:
        batch = events(3)
        for event in batch:
            outbox.append(event)
        outbox._sync_once()
        assert stored(tmp_path) == batch
        late = events(1, "late")
        outbox.append(late[0])
    finally:
        outbox.close()
    assert stored(tmp_path) == [*batch, *late]


def test_an_age_seal_never_cuts_a_segment_under_a_write(tmp_path: Path) -> None:
    """The fsync thread leaves a segment being written to alone; the next append seals it."""
    outbox = make_outbox(tmp_path, segment_age=0.0, fsync_interval=3600.0, fsync_batch=10**6)
    outbox.open()
    batch = events(3)
    for event in batch:
        outbox.append(event)
    active = outbox._active
    assert active is not None
    active.writing = True  # as during append's pwrite, which runs without the GIL
    outbox._sync_once()
    assert outbox._active is active
    assert stored(tmp_path) == []
    active.writing = False
    late = events(1, "late")
    outbox.append(late[0])
    assert outbox._active is not active
    outbox.close()
    first, second = make_outbox(tmp_path, wal=False).replayable()
    assert events_in(outbox, first) == batch
    assert events_in(outbox, second) == late


def test_records_written_as_json_by_earlier_versions_still_decode() -> None:
    event = events(1)[0]
    payload = msgspec.json.encode(event)
    frame = HEADER.pack(len(payload), zlib.crc32(payload)) + payload
    ((_, found),) = scan(frame).frames
    assert decode_payload(found) == event
    assert decode_payload(encode_frame(event)[HEADER.size :]) == event


def test_a_torn_tail_is_cut_at_the_last_whole_record(tmp_path: Path) -> None:
    batch = events(20)
    outbox = make_outbox(tmp_path)
    outbox.open()
    for event in batch:
        outbox.append(event)
    active = outbox._active
    assert active is not None
    # Half a record, as a process killed in the middle of append leaves it.
    torn = encode_frame(events(1, "torn")[0])
    os.pwrite(active.fd, torn[: len(torn) // 2], active.position)
    kill(outbox)

    reopened = make_outbox(tmp_path)
    (segment,) = reopened.open()
    try:
        assert events_in(reopened, segment) == batch
        assert read_quarantine(tmp_path) == []
    finally:
        reopened.close()


def fill(outbox: Outbox, batch: list[Event]) -> tuple[list[Event], OutboxError | None]:
    """Append until the outbox refuses; return what it took and the refusal."""
    accepted: list[Event] = []
    for event in batch:
        try:
            outbox.append(event)
        except OutboxError as exc:
            return accepted, exc
        accepted.append(event)
    return accepted, None


def write_sealed(directory: Path, batch: list[Event]) -> Path:
    outbox = make_outbox(directory, wal=False)
    outbox.open()
    segment = outbox.spill(batch)
    outbox.close()
    return segment.path


@pytest.mark.parametrize("where", ["payload", "length"])
def test_flipped_bytes_quarantine_the_record_and_the_others_flow(
    tmp_path: Path, where: str
) -> None:
    batch = events(30)
    path = write_sealed(tmp_path, batch)
    data = bytearray(path.read_bytes())
    offsets = [offset for offset, _ in scan(bytes(data)).frames]
    hit = 12
    spot = offsets[hit] + (HEADER.size + 5 if where == "payload" else 1)
    data[spot] ^= 0xFF
    path.write_bytes(bytes(data))

    outbox = make_outbox(tmp_path, wal=False)
    outbox.open()
    try:
        (segment,) = outbox.replayable()
        assert events_in(outbox, segment) == batch[:hit] + batch[hit + 1 :]
        assert outbox.quarantined == 1
        # Quarantined once, however often the segment is read.
        assert events_in(outbox, segment) == batch[:hit] + batch[hit + 1 :]
        assert outbox.quarantined == 1
    finally:
        outbox.close()
    (entry,) = read_quarantine(tmp_path)
    assert entry.segment == path.name
    assert entry.offset == offsets[hit]
    assert entry.length == offsets[hit + 1] - offsets[hit]
    reason = "checksum mismatch" if where == "payload" else "truncated record"
    assert entry.reason.startswith(reason) or entry.reason.startswith("impossible length")
    assert where == "length" or entry.reason == "checksum mismatch"


def test_the_search_through_garbage_checks_few_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    """Garbage whose every fourth byte reads as a plausible length would cost a CRC over
    that many bytes per candidate (quadratic in the region); the payload's first byte
    rules such candidates out before any checksum."""
    before, after = events(10, "before"), events(2000, "after")
    garbage = b"\x00\x00\x01\x00" * 4096  # 64 KiB lengths everywhere, zero payload bytes
    head, tail = encode_frames(before), encode_frames(after)
    data = head + garbage + tail
    checksums = 0
    real_crc32 = zlib.crc32

    def counting_crc32(payload: bytes) -> int:
        nonlocal checksums
        checksums += 1
        return real_crc32(payload)

    monkeypatch.setattr("analytics_buffer._segments._crc32", counting_crc32)
    found = scan(data)
    assert [decode_payload(payload) for _, payload in found.frames] == before + after
    (region,) = found.bad
    assert (region.start, region.stop) == (len(head), len(data) - len(tail))
    # One checksum per valid frame (the one found after the garbage is checked again, and
    # a candidate or two at the border may reach their CRC), none for the 16k in the garbage.
    assert len(before) + len(after) <= checksums <= len(before) + len(after) + 4


def test_a_sealed_segment_truncated_mid_record_quarantines_the_torn_record(
    tmp_path: Path,
) -> None:
    batch = events(10)
    path = write_sealed(tmp_path, batch)
    data = path.read_bytes()
    last = scan(data).frames[-1][0]
    path.write_bytes(data[: last + 10])
    outbox = make_outbox(tmp_path, wal=False)
    outbox.open()
    try:
        (segment,) = outbox.replayable()
        assert events_in(outbox, segment) == batch[:-1]
    finally:
        outbox.close()
    (entry,) = read_quarantine(tmp_path)
    assert entry.offset == last
    assert entry.reason.startswith("truncated")


@pytest.mark.anyio
async def test_a_replay_decodes_one_chunk_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segment's events are in memory one chunk at a time, not whole (its size is a setting)."""
    spilled = events(60_000)
    outbox = make_outbox(tmp_path / "outbox", wal=False)
    outbox.open()
    segment = outbox.spill(spilled)
    outbox.close()
    assert segment.path.stat().st_size > 2 * REPLAY_CHUNK_BYTES
    decoded = 0

    def counting_decode(payload: bytes | memoryview) -> Event:
        nonlocal decoded
        decoded += 1
        return decode_payload(payload)

    monkeypatch.setattr("analytics_buffer._outbox.decode_payload", counting_decode)
    held_at_insert: list[tuple[int, int]] = []

    class RecordingSink(MemorySink):
        async def insert(self, events: Sequence[Event], token: str) -> None:
            held_at_insert.append((decoded - len(self.rows), len(events)))
            await super().insert(events, token)

    sink = RecordingSink()
    settings = Settings(data_dir=str(tmp_path), flush_interval=60.0)
    async with AnalyticsBuffer(settings, sink=sink) as buffer:
        await buffer.replay_outbox()
        stats = buffer.stats()
    assert [event.id for event in sink.rows] == [event.id for event in spilled]
    assert stats.outbox_replayed == len(spilled)
    # At each insert, what was decoded and not yet written is that chunk alone.
    assert len(held_at_insert) >= 3
    assert all(held == size for held, size in held_at_insert)


def test_the_cap_refuses_a_new_segment_and_keeps_the_existing_ones(tmp_path: Path) -> None:
    outbox = make_outbox(tmp_path, max_bytes=3 * 8192, segment_bytes=8192)
    outbox.open()
    try:
        accepted, error = fill(outbox, events(10_000))
        assert isinstance(error, OutboxFull)
        assert "outbox_max_bytes=24576" in str(error)
        # Stems: the fsync thread may be renaming a full segment from .open to .seg.
        before = sorted(path.stem for path in tmp_path.iterdir())
        with pytest.raises(OutboxFull):
            outbox.append(events(1)[0])
        assert sorted(path.stem for path in tmp_path.iterdir()) == before
        assert outbox.refused == 2
    finally:
        outbox.close()
    assert stored(tmp_path) == accepted
    segments, size, _ = directory_figures(tmp_path)
    assert segments >= 2
    assert size <= 3 * 8192


def test_whether_the_cap_has_room_does_not_depend_on_the_fsync_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log's own segments count from memory: a directory scan can miss a file
    the fsync thread is renaming from .open to .seg, and must not open room then."""
    outbox = make_outbox(tmp_path, max_bytes=3 * 8192, segment_bytes=8192)
    outbox.open()
    try:
        _, error = fill(outbox, events(10_000))
        assert isinstance(error, OutboxFull)
        deadline = time.monotonic() + 10
        while list(tmp_path.glob("*.open")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not list(tmp_path.glob("*.open")), "the fsync thread sealed the full segments"
        scandir = os.scandir

        def scan_missing_one_segment(path: Any) -> list[os.DirEntry[str]]:
            entries = [entry for entry in scandir(path) if entry.name.endswith(".seg")]
            return entries[1:]

        monkeypatch.setattr(os, "scandir", scan_missing_one_segment)
        with pytest.raises(OutboxFull, match="outbox full"):
            outbox.append(events(1, "late")[0])
    finally:
        monkeypatch.undo()
        outbox.close()


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs (the suite runs as root, as scripts/install-test-deps needs)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_refuses_with_enospc_and_keeps_what_was_sealed(
    tiny_filesystem: Path,
) -> None:
    outbox = make_outbox(tiny_filesystem, segment_bytes=64 * 1024)
    outbox.open()
    try:
        accepted, error = fill(outbox, events(100_000))
        assert isinstance(error, OutboxFull)
        assert "ENOSPC" in str(error)
        # A spill meets the same full disk, says so, and leaves no partial file.
        with pytest.raises(OutboxFull, match=r"ENOSPC|outbox_max_bytes"):
            outbox.spill(events(5000, "spill"))
        assert not list(tiny_filesystem.glob("*.tmp"))
    finally:
        with contextlib.suppress(OutboxError):
            outbox.close()
    assert stored(tiny_filesystem) == accepted
    assert len(accepted) > 500


def test_wal_needs_the_directory_to_itself(tmp_path: Path) -> None:
    first = make_outbox(tmp_path)
    first.open()
    try:
        with pytest.raises(OutboxError, match="in use by another buffer"):
            make_outbox(tmp_path).open()
        spiller = make_outbox(tmp_path, wal=False)
        assert spiller.open() == []
        assert not spiller.owner
        spiller.close()
    finally:
        first.close()


def wal_settings(directory: Path, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": str(directory),
        "durability": "wal",
        "outbox_max_bytes": 3 * 8192,
        "outbox_segment_bytes": 8192,
        "flush_interval": 60.0,
        **changes,
    }
    return Settings(**values)


@pytest.mark.anyio
async def test_track_at_the_outbox_cap_drops_newest_and_says_so(tmp_path: Path) -> None:
    async with AnalyticsBuffer(wal_settings(tmp_path), sink=MemorySink()) as buffer:
        results = [buffer.track(event) for event in events(500)]
        stats = buffer.stats()
    taken = results.count(True)
    # Nothing settles while tracking, so no room comes back: refusals are last.
    assert 0 < taken < 500
    assert results == [True] * taken + [False] * (500 - taken)
    assert stats.accepted == taken
    assert stats.dropped == stats.outbox_refused == 500 - taken


@pytest.mark.anyio
async def test_put_at_the_outbox_cap_raises_and_counts_one_refusal(tmp_path: Path) -> None:
    """``put`` does not apply ``drop_newest``: a refusal of the log raises, counted once."""
    async with AnalyticsBuffer(wal_settings(tmp_path), sink=MemorySink()) as buffer:
        results = [buffer.track(event) for event in events(500)]
        refused_by_track = buffer.stats().outbox_refused
        assert refused_by_track == results.count(False) > 0
        with pytest.raises(OutboxFull, match="outbox_max_bytes"):
            await buffer.put(events(1, "put")[0])
        stats = buffer.stats()
    assert stats.outbox_refused == refused_by_track + 1
    assert stats.dropped == refused_by_track


def track_until_refused(buffer: AnalyticsBuffer, batch: list[Event]) -> Exception | None:
    for event in batch:
        try:
            buffer.track(event)
        except BufferFull as exc:
            return exc
    return None


@pytest.mark.anyio
@pytest.mark.parametrize("overflow", ["raise", "block"])
async def test_track_and_put_at_the_outbox_cap_raise_outbox_full(
    tmp_path: Path, overflow: str
) -> None:
    settings = wal_settings(tmp_path, overflow=overflow)
    async with AnalyticsBuffer(settings, sink=MemorySink()) as buffer:
        refusal = track_until_refused(buffer, events(500))
        assert isinstance(refusal, OutboxFull)
        assert "outbox_max_bytes=24576" in str(refusal)
        with pytest.raises(BufferFull, match="outbox full"):
            await buffer.put(events(1)[0])
        accepted = buffer.stats().accepted
        await buffer.flush()
        assert buffer.stats().written == accepted


def test_a_failed_fsync_stops_the_log_and_keeps_what_was_sealed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed fsync the page cache may have dropped the data: the log refuses
    every later event with the error instead of retrying as if nothing happened."""
    # The syncing thread must not sync first: then the failing fsync below has nothing to do.
    outbox = make_outbox(tmp_path, segment_bytes=8192, fsync_interval=3600.0, fsync_batch=10**6)
    outbox.open()
    sealed = events(100)
    for event in sealed:
        outbox.append(event)
    outbox.seal()
    # The full first segment is sealed by the syncing thread: wait for it, so
    # that only the explicit fsync below meets the failing os.fsync.
    deadline = time.monotonic() + 10
    while len(stored(tmp_path)) < len(sealed) and time.monotonic() < deadline:
        time.sleep(0.01)
    outbox.append(events(1, "unsynced")[0])

    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fdatasync", fail)
        outbox._sync_once()
    with pytest.raises(OutboxError, match="Input/output error"):
        outbox.append(events(1, "late")[0])
    assert outbox.refused == 1
    kill(outbox)
    assert stored(tmp_path)[: len(sealed)] == sealed


def test_an_unusable_directory_fails_wal_but_not_memory(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(OutboxError, match="cannot use the outbox directory"):
        make_outbox(blocked / "outbox").open()
    memory = make_outbox(blocked / "outbox", wal=False)
    assert memory.open() == []
    assert not memory.owner
    with pytest.raises(OutboxError):
        memory.spill(events(1))
    memory.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_wal_events_dead_lettered_outside_the_writer_leave_the_log(tmp_path: Path) -> None:
    """Session events the session store could not take at shutdown are dead-lettered:
    they leave the log too, so the next start does not replay them as well."""
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(data_dir=str(tmp_path), durability="wal", redis_url=unreachable)
    async with AnalyticsBuffer(settings, sink=MemorySink()) as buffer:
        assert buffer.track(Event(name="screen_view", project_id="p1", session_id="s1"))
    assert buffer.stats().dead_lettered == 1
    next_run = make_outbox(tmp_path / "outbox")
    assert next_run.open() == []
    next_run.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_wal_session_events_held_by_redis_leave_the_log(
    tmp_path: Path, redis_url: str
) -> None:
    """A screen view waiting in Redis for its successor is Redis's to keep: the next
    start must not replay it from the log (raw, without its duration)."""
    settings = Settings(
        data_dir=str(tmp_path), durability="wal", redis_url=redis_url, redis_prefix="wal-held"
    )
    async with AnalyticsBuffer(settings, sink=MemorySink()) as buffer:
        assert buffer.track(Event(name="screen_view", project_id="p1", session_id="s1"))
        await buffer.flush()
        assert buffer.stats().sessions_waiting == 0
    next_run = make_outbox(tmp_path / "outbox")
    assert next_run.open() == []
    next_run.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_wal_events_a_mailbox_refuses_leave_the_log(tmp_path: Path) -> None:
    """An event appended to the log and then refused by the actor's mailbox (full, or
    closed) was never accepted: it is retracted, so the next start does not replay it."""

    def full(message: object) -> bool:
        return False

    def closed(message: object) -> bool:
        raise ActorDeadError("the actor's mailbox is closed")

    sink = MemorySink()
    settings = Settings(data_dir=str(tmp_path), durability="wal", overflow="drop_newest")
    async with AnalyticsBuffer(settings, sink=sink) as buffer:
        offer = buffer._offer_to_buffer
        buffer._offer_to_buffer = full
        assert buffer.track(Event(name="refused", project_id="p1")) is False
        buffer._offer_to_buffer = closed
        with pytest.raises(ActorDeadError):
            buffer.track(Event(name="closed", project_id="p1"))
        buffer._offer_to_buffer = offer
        assert buffer.track(Event(name="kept", project_id="p1"))
    assert [event.name for event in sink.rows] == ["kept"]
    next_run = make_outbox(tmp_path / "outbox")
    assert next_run.open() == []
    next_run.close()
