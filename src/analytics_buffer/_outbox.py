"""The disk outbox: a write-ahead log of accepted events, and batches waiting for ClickHouse.

It lives in ``<data_dir>/outbox`` (file layout: :mod:`._segments`) and plays
two parts:

* **Spill** (both durability modes): a chunk whose retries ran out for a
  transient reason is written as one sealed segment (``.tmp``, fsync,
  rename, fsync of the directory) instead of being dead-lettered. The
  replay worker (:mod:`._replay`) writes sealed segments to ClickHouse and
  deletes each only once ClickHouse has every record in it.
* **Write-ahead log** (``durability="wal"``): :meth:`Outbox.append` writes
  each accepted event's framed record into the active segment, a
  preallocated file, with one ``pwrite``. The record is then in the OS page
  cache, so a killed process loses nothing it accepted; a background thread fsyncs
  every ``fsync_interval`` or every ``fsync_batch`` records (group commit),
  so a power loss takes at most that window. The live pipeline settles
  events (:meth:`Outbox.settle`) once they are written, dead-lettered or
  spilled; a sealed log segment is deleted when all of its events are
  settled (each segment keeps the set of its unsettled event ids, so an id
  appended twice settles at once). What a crash leaves behind is replayed at
  the next start.

The active segment is sealed when full (``segment_bytes``) or older than
``segment_age``. Preallocation (``posix_fallocate``) means a full disk is
met when a segment is created, as a clear ``ENOSPC`` error, not in the
middle of a record. A write that fails anyway (``EIO``) stops the log, as a
failed fsync does.

Start-up recovery (:meth:`Outbox.open`): an ``.open`` segment of a dead
process is cut at its last whole record and sealed; ``.tmp`` files (spills
never reported done) are removed; every sealed segment is queued for
replay, oldest first. Records that fail their checks in a sealed segment
go to ``quarantine.ndjson`` with the reason when the segment is read for
replay; the good ones keep flowing.

The cap ``max_bytes`` counts every segment file's size on disk (an active
segment counts in full, a sealed one at the size it is cut to). A segment
that would pass it is not created: :class:`OutboxFull` is raised and the
caller applies its overflow policy.
Segments already on disk are never touched by that.

Thread safety: ``append`` and ``settle`` run on the event loop's thread;
the fsync thread and worker threads (spill, replay reads) share the state
under one lock. An append that fits in the active segment takes no lock
(it is most of the log's cost per event): only the event loop's thread
writes into the active segment or takes it out of service while it has
room. To seal a segment by age, the fsync thread sets its ``limit`` to 0
and seals it itself only when no append is writing into it; otherwise the
next append does. A second lock keeps the active segment's file open while
the fsync thread syncs it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import operator
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, NamedTuple, final

import msgspec

from ._event import Event
from ._exceptions import OutboxError, OutboxFull
from ._segments import (
    HEADER,
    QUARANTINE_NAME,
    BadRegion,
    decode_payload,
    encode_frame,
    encode_frames,
    new_segment_stem,
    quarantine_lines,
    read_quarantine,
    scan,
    segment_created_at,
    sync_directory,
)
from ._settings import Settings

__all__ = ("Chunk", "Outbox", "OutboxFigures", "Segment")

log = logging.getLogger("analytics_buffer.outbox")

_id_int: Final = operator.attrgetter("id.int")
_LOCK_NAME: Final = "outbox.lock"


class Segment(NamedTuple):
    """A sealed segment waiting for replay."""

    name: str
    """Its file name (``<ns>-<rand>.seg``)."""
    path: Path

    @property
    def token(self) -> str:
        """The stable prefix of its chunks' deduplication tokens."""
        return "outbox-" + self.name.removesuffix(".seg")


class Chunk(NamedTuple):
    """The records of a sealed segment that start in one ``chunk_bytes`` range of it."""

    number: int
    """``i`` for the range ``[i * chunk_bytes, (i + 1) * chunk_bytes)``."""
    start: int
    """Where its first record starts in the file."""
    stop: int
    """Where its last record ends."""


class OutboxFigures(NamedTuple):
    """What ``stats()`` and ``analytics-buffer outbox status`` show."""

    outbox_bytes: int
    outbox_segments: int
    outbox_oldest_age: float
    outbox_spilled: int
    outbox_replayed: int
    outbox_quarantined: int
    outbox_refused: int
    outbox_fsyncs: int


@final
class _Active:
    """The preallocated segment that :meth:`Outbox.append` writes into."""

    __slots__ = (
        "_unsettled",
        "appended",
        "closed",
        "created",
        "fd",
        "limit",
        "name",
        "path",
        "position",
        "sealed",
        "synced",
        "writing",
    )

    def __init__(self, directory: Path, size: int) -> None:
        self.name = new_segment_stem()
        self.path = directory / f"{self.name}.open"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.posix_fallocate(self.fd, 0, size)
        except BaseException:
            os.close(self.fd)
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise
        self.created = time.monotonic()
        self.position = 0
        self.limit = size
        """Where appends stop; the fsync thread sets it to 0 to have the segment sealed."""
        self.writing = False
        """Set by ``append`` while it writes without the lock (see :meth:`Outbox.append`)."""
        self.synced = 0
        """Bytes known to be on disk (the fsync thread's)."""
        self.closed = False
        self.appended: list[int] = []
        """Ids (as ints) of the events appended since the last settle: a list append is
        what ``append`` can afford; :meth:`unsettled` moves them into a set."""
        self._unsettled: set[int] = set()
        self.sealed = False
        """Renamed to ``.seg``: from then on, its last settled event deletes it."""

    def unsettled(self) -> set[int]:
        """The ids of its events not settled yet (the caller holds the outbox's lock)."""
        self._unsettled.update(self.appended)
        self.appended.clear()
        return self._unsettled


@final
class Outbox:
    """The ``<data_dir>/outbox`` directory (see the module docstring).

    :param directory: where the segments live (created if missing)
    :param wal: keep the write-ahead log (``durability="wal"``)
    :param max_bytes: cap on the segments' total size on disk
    :param segment_bytes: size at which the active segment is sealed
    :param segment_age: age (seconds) at which a non-empty active segment is sealed
    :param fsync_interval: the longest time between fsyncs of appended records
    :param fsync_batch: fsync as soon as this many records are unsynced
    """

    def __init__(
        self,
        directory: Path,
        *,
        wal: bool,
        max_bytes: int,
        segment_bytes: int,
        segment_age: float,
        fsync_interval: float,
        fsync_batch: int,
    ) -> None:
        self.directory = directory
        self.wal = wal
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.segment_age = segment_age
        self.fsync_interval = fsync_interval
        self.fsync_batch = fsync_batch
        self.owner = False
        """Whether this buffer holds the directory's lock (and so replays it)."""
        self.spilled = 0
        self.replayed = 0
        self.quarantined = 0
        self.refused = 0
        self.fsyncs = 0
        self.slowest_fsync = 0.0
        """The longest fsync of the log so far, in seconds (for benchmarks)."""
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        """Held while the active segment is synced or closed: no fd is closed under a sync."""
        self._lock_fd: int | None = None
        self._active: _Active | None = None
        self._spare: _Active | None = None
        self._sealing: list[_Active] = []
        self._live: dict[str, _Active] = {}
        """Log segments of this run by name, sealed or not, until all their events settle."""
        self._spilling: dict[str, int] = {}
        """Spills being written: their names and sizes."""
        self._unsynced = 0
        self._failure: OSError | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.replay_ready: threading.Event = threading.Event()
        """Set when a segment was spilled (the replay worker may be idle)."""

    @classmethod
    def for_settings(cls, settings: Settings, *, wal: bool) -> Outbox:
        """The outbox under ``settings.data_dir``, sized and synced as ``settings`` say."""
        return cls(
            Path(settings.data_dir) / "outbox",
            wal=wal,
            max_bytes=settings.outbox_max_bytes,
            segment_bytes=settings.outbox_segment_bytes,
            segment_age=settings.outbox_segment_age,
            fsync_interval=settings.fsync_interval,
            fsync_batch=settings.fsync_batch,
        )

    # -- life cycle --------------------------------------------------------------

    def open(self) -> list[Segment]:
        """Take the directory, recover what a previous run left, start the fsync thread.

        :returns: the sealed segments to replay, oldest first (empty when not the owner)
        :raises OutboxError: ``wal`` and another buffer holds the directory, or the
            directory cannot be used
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            message = f"cannot use the outbox directory {self.directory}: {exc}"
            if self.wal:
                raise OutboxError(message) from exc
            # memory durability works without it: a failed chunk is then dead-lettered.
            log.warning("%s; failed chunks will be dead-lettered", message)
            return []
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if self.wal:
                raise OutboxError(
                    f"the outbox {self.directory} is in use by another buffer "
                    "(durability='wal' needs a data_dir of its own)"
                ) from None
            log.info("outbox %s is owned by another buffer; spilling only", self.directory)
            return []
        self._lock_fd = fd
        self.owner = True
        self._recover()
        if self.wal:
            self._thread = threading.Thread(
                target=self._sync_loop, name="analytics-buffer-fsync", daemon=True
            )
            self._thread.start()
        return self.replayable()

    def seal(self) -> None:
        """Seal the active log segment now (it is fsynced, cut to size and renamed)."""
        with self._lock:
            if self._active is not None and self._active.position:
                self._sealing.append(self._active)
                self._active = None
        self._seal_pending()

    def close(self) -> None:
        """Fsync and seal the log, stop the fsync thread, release the directory."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None
        with self._lock:
            active, self._active = self._active, None
            spare, self._spare = self._spare, None
            if active is not None:
                self._sealing.append(active)
        self._seal_pending()
        if spare is not None:
            os.close(spare.fd)
            with contextlib.suppress(OSError):
                spare.path.unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.owner = False

    # -- the write-ahead log (event loop thread) ----------------------------------

    def append(self, event: Event) -> None:
        """Put ``event``'s record in the active segment (the page cache: survives a crash).

        Only the event loop's thread appends, and only it takes a segment out
        of service while it has room, so the common case takes no lock: the
        fsync thread reads ``position`` (which moves only after a whole record
        is written) and asks for an age seal through ``limit``, checking
        ``writing`` first so that it never cuts a segment under a write.

        :raises OutboxFull: the cap or the disk leaves no room for a new segment
        :raises OutboxError: an earlier fsync failed, so the log cannot be trusted
        """
        frame = encode_frame(event)
        needed = len(frame)
        active = self._active
        if active is not None:
            # Flag before checking the limit: the fsync thread sets the limit, then reads the flag.
            active.writing = True
        if active is None or active.position + needed > active.limit or self._failure is not None:
            if active is not None:
                active.writing = False
            active = self._next_active(needed)
        position = active.position
        try:
            # A write(2), not a memory map: syncing a mapped file write-protects each of
            # its pages on the event loop's thread (page faults, TLB shootdowns), which
            # cost more than this system call.
            written = os.pwrite(active.fd, frame, position)
            if written != needed:
                raise OSError(errno.EIO, f"short write: {written} of {needed} bytes")
        except OSError as exc:
            # Part of a record may be there: the log takes nothing after it.
            active.writing = False
            self._failure = exc
            self.refused += 1
            raise OutboxError(f"cannot write to the outbox log: {exc}") from exc
        # The position moves before the flag drops: a seal never cuts off this record.
        active.position = position + needed
        active.writing = False
        active.appended.append(event.id.int)
        self._unsynced += 1
        if self._unsynced == self.fsync_batch:
            self._wake.set()

    def _next_active(self, needed: int) -> _Active:
        """The segment the next ``needed`` bytes go to, flagged ``writing``; rotates if full."""
        with self._lock:
            if self._failure is not None:
                self.refused += 1
                raise OutboxError(f"the outbox log failed and takes no events: {self._failure}")
            active = self._active
            if active is None or active.position + needed > active.limit:
                active = self._rotate(needed)
            active.writing = True
            return active

    def retract(self, event: Event) -> None:
        """Forget ``event``: appended, then refused (its record is replayed only after a crash)."""
        self.settle((event,))

    def settle(self, events: Sequence[Event]) -> None:
        """Mark ``events`` written, dead-lettered or spilled; delete log segments now settled."""
        if not self._live:
            return
        # Set operations in C, a few per batch: cheaper than a dict entry per event.
        ids = set(map(_id_int, events))
        with self._lock:
            for segment in list(self._live.values()):
                unsettled = segment.unsettled()
                unsettled.difference_update(ids)
                if not unsettled and segment.sealed:
                    self._retire(segment)

    def _rotate(self, needed: int) -> _Active:
        """Seal the active segment and make the spare (or a new one) active; under the lock."""
        if needed > self.segment_bytes:
            self.refused += 1
            raise OutboxFull(
                f"a record of {needed} bytes does not fit in outbox_segment_bytes="
                f"{self.segment_bytes}"
            )
        if self._active is not None:
            self._sealing.append(self._active)
            self._active = None
            self._wake.set()
        if self._spare is not None:
            active, self._spare = self._spare, None
        else:
            active = self._new_segment()
        self._active = active
        self._live[active.name] = active
        return active

    def _new_segment(self, *, refusing: bool = True) -> _Active:
        """Create and preallocate a log segment within the cap; under the lock.

        :param refusing: count a failure as a refused event
        """
        used = self._disk_bytes()
        if used + self.segment_bytes > self.max_bytes:
            self.refused += refusing
            raise OutboxFull(
                f"outbox full: {used} bytes on disk, a new segment of {self.segment_bytes} "
                f"would pass outbox_max_bytes={self.max_bytes}"
            )
        try:
            return _Active(self.directory, self.segment_bytes)
        except OSError as exc:
            self.refused += refusing
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutboxFull(f"outbox disk full (ENOSPC) in {self.directory}: {exc}") from exc
            raise OutboxError(f"cannot create an outbox segment: {exc}") from exc

    # -- the fsync thread -----------------------------------------------------------

    def _sync_loop(self) -> None:
        # Ticks keep to the interval from one fsync's start to the next: a slow
        # fsync shortens the wait after it instead of stretching the window.
        last = time.monotonic()
        while not self._stopping:
            self._wake.wait(max(0.0, last + self.fsync_interval - time.monotonic()))
            self._wake.clear()
            last = time.monotonic()
            self._sync_once()
        self._sync_once()

    def _sync_once(self) -> None:
        with self._lock:
            active = self._active
            self._unsynced = 0
            position = 0 if active is None else active.position
            if (
                active is not None
                and active.position
                and time.monotonic() - active.created >= self.segment_age
            ):
                # The next append seals it; if none is writing now, seal it here.
                active.limit = 0
                if not active.writing:
                    self._sealing.append(active)
                    self._active = None
                    active = None  # sealing syncs it whole
        try:
            if active is not None and position > active.synced:
                self._sync_active(active, position)
            self._seal_pending()
            self._prepare_spare()
        except OSError as exc:
            # After a failed fsync the page cache may have dropped the data: never
            # retry as if nothing happened (fsyncgate). Sealed segments stay as they are.
            log.error("outbox fsync failed; the log takes no more events: %s", exc)
            with self._lock:
                self._failure = exc

    def _sync_active(self, active: _Active, position: int) -> None:
        """Make the active segment durable up to ``position`` at least."""
        with self._io_lock:
            if active.closed:
                return
            started = time.monotonic()
            os.fdatasync(active.fd)
            active.synced = position
            self.fsyncs += 1
            self.slowest_fsync = max(self.slowest_fsync, time.monotonic() - started)

    def _prepare_spare(self) -> None:
        with self._lock:
            if self._spare is not None or self._stopping or self._failure is not None:
                return
            # No room for a spare is no error yet: append meets it when it needs one.
            with contextlib.suppress(OutboxError):
                self._spare = self._new_segment(refusing=False)

    def _seal_pending(self) -> None:
        """Cut, fsync and rename the segments taken out of service."""
        while True:
            with self._lock:
                if not self._sealing:
                    return
                segment = self._sealing.pop(0)
            with self._io_lock:
                os.ftruncate(segment.fd, segment.position)
                os.fsync(segment.fd)
                self.fsyncs += 1
                segment.closed = True
                os.close(segment.fd)
            sealed = segment.path.with_suffix(".seg")
            os.rename(segment.path, sealed)
            sync_directory(self.directory)
            with self._lock:
                segment.sealed = True
                if not segment.unsettled():
                    self._retire(segment)

    # -- spill and replay (worker threads) -------------------------------------------

    def spill(self, events: Sequence[Event]) -> Segment:
        """Write ``events`` as one sealed segment, durably, and queue it for replay.

        :raises OutboxFull: the cap or the disk has no room (nothing is left behind)
        :raises OutboxError: the write failed otherwise
        """
        data = encode_frames(events)
        stem = new_segment_stem()
        tmp = self.directory / f"{stem}.tmp"
        with self._lock:
            used = self._disk_bytes()
            if used + len(data) > self.max_bytes:
                self.refused += len(events)
                raise OutboxFull(
                    f"outbox full: {used} bytes on disk, {len(data)} more would pass "
                    f"outbox_max_bytes={self.max_bytes}"
                )
            # Reserved until renamed: concurrent spills never pass the cap together.
            self._spilling[stem] = len(data)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tmp.open("xb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            sealed = tmp.with_suffix(".seg")
            os.rename(tmp, sealed)
            sync_directory(self.directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self.refused += len(events)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutboxFull(f"outbox disk full (ENOSPC) in {self.directory}: {exc}") from exc
            raise OutboxError(f"cannot write an outbox segment: {exc}") from exc
        finally:
            with self._lock:
                del self._spilling[stem]
        self.spilled += len(events)
        self.replay_ready.set()
        return Segment(sealed.name, sealed)

    def replayable(self) -> list[Segment]:
        """The sealed segments waiting for replay, oldest first (not this run's log)."""
        with self._lock:
            live = {f"{name}.seg" for name in self._live}
        try:
            names = sorted(
                entry.name
                for entry in os.scandir(self.directory)
                if entry.name.endswith(".seg") and entry.name not in live
            )
        except OSError:
            return []
        return [Segment(name, self.directory / name) for name in names]

    def chunks(self, segment: Segment, chunk_bytes: int) -> list[Chunk]:
        """Cut a sealed segment into chunks, decoding nothing; quarantine bad regions.

        Chunk ``i`` holds the records that start in bytes ``[i * chunk_bytes,
        (i + 1) * chunk_bytes)`` of the file. A sealed segment is never
        rewritten, so its chunks keep their index (and a replay its tokens)
        even when corruption shows up between two attempts: a bad record
        only leaves its chunk smaller. Chunks without a record are omitted.
        The segment is read whole once here; :meth:`read_chunk` then reads
        one chunk at a time, so a replay holds one chunk's events in memory,
        whatever ``outbox_segment_bytes`` is.
        """
        data = segment.path.read_bytes()
        found = scan(data)
        bad = list(found.bad)
        if found.tail is not None:
            # A sealed segment was cut at its last record: a bad tail is corruption.
            bad.append(found.tail)
        spans: dict[int, list[int]] = {}
        for offset, payload in found.frames:
            end = offset + HEADER.size + len(payload)
            span = spans.get(offset // chunk_bytes)
            if span is None:
                spans[offset // chunk_bytes] = [offset, end]
            else:
                span[1] = end
        self._quarantine_new(segment.name, data, bad, len(found.frames))
        return [Chunk(number, start, stop) for number, (start, stop) in sorted(spans.items())]

    def read_chunk(self, segment: Segment, chunk: Chunk) -> list[Event]:
        """Read and decode one chunk's records; quarantine those that are no events.

        Bad regions go to the quarantine file once per segment, offset and
        length, however often the segment is read (a region that grew as a
        neighbour went bad is written again, whole).
        """
        with segment.path.open("rb") as file:
            file.seek(chunk.start)
            data = file.read(chunk.stop - chunk.start)
        found = scan(data)
        base = chunk.start
        bad = [BadRegion(base + r.start, base + r.stop, r.reason) for r in found.bad]
        if found.tail is not None:
            tail = found.tail
            bad.append(BadRegion(base + tail.start, base + tail.stop, tail.reason))
        events: list[Event] = []
        for offset, payload in found.frames:
            try:
                events.append(decode_payload(payload))
            except (msgspec.DecodeError, ValueError) as exc:
                start = base + offset
                stop = start + HEADER.size + len(payload)
                bad.append(BadRegion(start, stop, f"valid frame, but not an event: {exc}"))
        self._quarantine_new(segment.name, data, bad, len(events), base)
        return events

    def _quarantine_new(
        self, name: str, data: bytes, bad: Sequence[BadRegion], good: int, base: int = 0
    ) -> None:
        """Quarantine the regions of ``bad`` not quarantined yet (``data`` starts at ``base``)."""
        if not bad:
            return
        known = {(e.offset, e.length) for e in read_quarantine(self.directory) if e.segment == name}
        new = [region for region in bad if (region.start, region.stop - region.start) not in known]
        if new:
            log.error(
                "outbox segment %s: %d bad records quarantined, %d good ones kept",
                name,
                len(new),
                good,
            )
            self._quarantine(name, data, new, base)

    def remove(self, segment: Segment) -> None:
        """Delete a segment ClickHouse has every record of."""
        self._remove_file(segment.path)

    def _quarantine(
        self, name: str, data: bytes, regions: Sequence[BadRegion], base: int = 0
    ) -> None:
        lines = quarantine_lines(name, data, regions, base)
        with (self.directory / QUARANTINE_NAME).open("ab") as file:
            file.write(lines)
            file.flush()
            os.fsync(file.fileno())
        self.quarantined += len(regions)

    # -- recovery and figures --------------------------------------------------------

    def _recover(self) -> None:
        for entry in sorted(os.scandir(self.directory), key=lambda entry: entry.name):
            path = Path(entry.path)
            if entry.name.endswith(".tmp"):
                log.warning("outbox: removing %s, a segment whose write never finished", path)
                path.unlink()
            elif entry.name.endswith(".open"):
                self._recover_open(path)
        sync_directory(self.directory)

    def _recover_open(self, path: Path) -> None:
        """Cut a dead process's active segment at its last whole record and seal it."""
        data = path.read_bytes()
        found = scan(data)
        end = found.tail.start if found.tail is not None else found.end
        if found.tail is not None:
            log.warning(
                "outbox: cut a torn tail of %d bytes off %s (%s)",
                found.tail.stop - found.tail.start,
                path.name,
                found.tail.reason,
            )
        if end == 0:
            path.unlink()
            return
        with path.open("r+b") as file:
            file.truncate(end)
            file.flush()
            os.fsync(file.fileno())
        os.rename(path, path.with_suffix(".seg"))

    def _retire(self, segment: _Active) -> None:
        """Delete a settled log segment; under the lock.

        The file goes before the name leaves ``_live``: :meth:`replayable`
        skips live names, so it never sees a settled segment as one to replay.
        """
        self._remove_file(segment.path.with_suffix(".seg"))
        self._live.pop(segment.name, None)

    def _remove_file(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _disk_bytes(self) -> int:
        """The segments' size on disk; under the lock.

        This run's own files count from memory, not from the directory: a
        scan can miss a file the fsync thread or a spill is renaming, and a
        log segment taken out of service counts at the size it is cut to even
        before it is cut. Whether an append finds room must not depend on how
        far another thread has got.
        """
        own = dict(self._spilling)
        for segment in self._live.values():
            own[segment.name] = self.segment_bytes if segment is self._active else segment.position
        if self._spare is not None:
            own[self._spare.name] = self.segment_bytes
        total = sum(own.values())
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.directory):
                stem, _, suffix = entry.name.rpartition(".")
                if suffix in ("seg", "open", "tmp") and stem not in own:
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
        return total

    def figures(self) -> OutboxFigures:
        """The outbox's size, age and counters."""
        segments, size, oldest = directory_figures(self.directory)
        return OutboxFigures(
            outbox_bytes=size,
            outbox_segments=segments,
            outbox_oldest_age=oldest,
            outbox_spilled=self.spilled,
            outbox_replayed=self.replayed,
            outbox_quarantined=self.quarantined,
            outbox_refused=self.refused,
            outbox_fsyncs=self.fsyncs,
        )


def directory_figures(directory: Path) -> tuple[int, int, float]:
    """Return ``(segments, bytes, oldest segment's age in seconds)`` of an outbox directory."""
    segments, size, oldest = 0, 0, None
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name.endswith((".seg", ".open")):
                with contextlib.suppress(FileNotFoundError):
                    size += entry.stat().st_size
                segments += 1
                created = segment_created_at(entry.name)
                oldest = created if oldest is None else min(oldest, created)
    age = 0.0 if oldest is None else max(0.0, time.time() - oldest)
    return segments, size, age


def quarantined_count(directory: Path) -> int:
    """How many records ``quarantine.ndjson`` holds."""
    return len(read_quarantine(directory))
