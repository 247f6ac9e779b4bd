"""A Hypothesis state machine for the outbox alone, against a model of ClickHouse.

The machine appends events to the write-ahead log, delivers some through a
stand-in for the live pipeline (then settles them), spills others, seals,
replays segments chunk by chunk (sometimes only part of one), kills the
process at any step (sometimes in the middle of an append, leaving half a
record) and flips bytes in sealed segments. The model sink deduplicates by
token, as ClickHouse 22.2+ does.

Invariants: nothing accepted is lost (at the end, each event is in the sink
or its record was corrupted and quarantined); nothing is stored more than
twice, and twice only in the documented window: an event settled (delivered
or spilled) before a crash whose log segment still held it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from analytics_buffer import Event
from analytics_buffer._outbox import Outbox
from analytics_buffer._segments import HEADER, decode_payload, encode_frame, read_quarantine, scan

CHUNK_BYTES = 700
"""Bytes of segment per replayed chunk (about four records)."""


class OutboxMachine(RuleBasedStateMachine):
    def __init__(self, base: Path) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(dir=base))
        self.outbox = self.open_outbox()
        self.accepted: set[uuid.UUID] = set()
        self.unsettled: list[Event] = []
        self.sink: dict[str, list[uuid.UUID]] = {}
        self.settled: set[uuid.UUID] = set()
        self.may_repeat: set[uuid.UUID] = set()
        self.corrupted: dict[tuple[str, int], uuid.UUID] = {}
        self.live_tokens = 0
        self.number = 0

    def open_outbox(self) -> Outbox:
        outbox = Outbox(
            self.directory,
            wal=True,
            max_bytes=64 * 1024 * 1024,
            segment_bytes=2048,
            segment_age=3600.0,
            fsync_interval=0.01,
            fsync_batch=50,
        )
        outbox.open()
        # The machine ticks the fsync thread's work itself (fsync_tick), so that
        # every run of an example does the same.
        outbox._stopping = True
        outbox._wake.set()
        assert outbox._thread is not None
        outbox._thread.join()
        outbox._thread = None
        return outbox

    def new_events(self, count: int) -> list[Event]:
        self.number += count
        return [
            Event(name="e", project_id="p", properties={"n": self.number + i}) for i in range(count)
        ]

    def stored(self) -> dict[uuid.UUID, int]:
        counts: dict[uuid.UUID, int] = {}
        for ids in self.sink.values():
            for event_id in ids:
                counts[event_id] = counts.get(event_id, 0) + 1
        return counts

    # -- rules -------------------------------------------------------------------------

    @rule(count=st.integers(1, 30))
    def append(self, count: int) -> None:
        for event in self.new_events(count):
            self.outbox.append(event)
            self.accepted.add(event.id)
            self.unsettled.append(event)

    @precondition(lambda self: self.unsettled)
    @rule(count=st.integers(1, 40))
    def deliver(self, count: int) -> None:
        """The live pipeline writes some events, then settles them."""
        taken, self.unsettled = self.unsettled[:count], self.unsettled[count:]
        self.live_tokens += 1
        self.sink[f"live-{self.live_tokens}"] = [event.id for event in taken]
        self.settled.update(event.id for event in taken)
        self.outbox.settle(taken)

    @precondition(lambda self: self.unsettled)
    @rule(count=st.integers(1, 40))
    def spill(self, count: int) -> None:
        """The live pipeline gave up on some events: they move to a sealed segment."""
        taken, self.unsettled = self.unsettled[:count], self.unsettled[count:]
        self.outbox.spill(taken)
        self.settled.update(event.id for event in taken)
        self.outbox.settle(taken)

    @rule()
    def seal(self) -> None:
        self.outbox.seal()

    @rule()
    def fsync_tick(self) -> None:
        """What the fsync thread does on a tick: fsync, and seal the full segments."""
        self.outbox._sync_once()

    @rule(chunks=st.integers(1, 6))
    def replay(self, chunks: int) -> None:
        """Replay up to ``chunks`` chunks of the oldest segment; delete it if that was all."""
        waiting = self.outbox.replayable()
        if not waiting:
            return
        segment = waiting[0]
        loaded = self.outbox.chunks(segment, CHUNK_BYTES)
        for chunk in loaded[:chunks]:
            events = self.outbox.read_chunk(segment, chunk)
            # A known token is deduplicated, as by ClickHouse 22.2+.
            self.sink.setdefault(f"{segment.token}:{chunk.number}", [event.id for event in events])
        if chunks >= len(loaded):
            self.outbox.remove(segment)

    @rule(tear=st.booleans())
    def crash(self, tear: bool) -> None:
        """The process dies (SIGKILL), maybe half-way through an append; it restarts."""
        outbox = self.outbox
        active = outbox._active
        if tear and active is not None:
            frame = encode_frame(self.new_events(1)[0])
            half = min(len(frame) // 2, outbox.segment_bytes - active.position)
            os.pwrite(active.fd, frame[:half], active.position)
        # What the kernel keeps: the page cache. Nothing of the process's own state.
        for segment in {*outbox._live.values(), *filter(None, [outbox._spare])}:
            if not segment.closed:
                segment.closed = True
                os.close(segment.fd)
        assert outbox._lock_fd is not None
        os.close(outbox._lock_fd)
        # Settled events (delivered or spilled) whose log segment survives are
        # replayed from it once more: the documented at-least-once window.
        self.may_repeat |= self.settled
        self.unsettled = []
        self.outbox = self.open_outbox()

    @rule(data=st.data())
    def flip_a_byte(self, data: st.DataObject) -> None:
        waiting = self.outbox.replayable()
        if not waiting:
            return
        segment = data.draw(st.sampled_from(waiting))
        raw = bytearray(segment.path.read_bytes())
        frames = [
            (offset, payload)
            for offset, payload in scan(bytes(raw)).frames
            if (segment.name, offset) not in self.corrupted
        ]
        if not frames:
            return
        offset, payload = data.draw(st.sampled_from(frames))
        spot = offset + HEADER.size + data.draw(st.integers(0, len(payload) - 1))
        raw[spot] ^= 0x5A
        segment.path.write_bytes(bytes(raw))
        self.corrupted[(segment.name, offset)] = decode_payload(payload).id

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def stored_at_most_twice_and_only_in_the_window(self) -> None:
        counts = self.stored()
        assert set(counts) <= self.accepted
        for event_id, count in counts.items():
            assert count == 1 or (count == 2 and event_id in self.may_repeat), count

    def teardown(self) -> None:
        try:
            # The live pipeline finishes; then everything left is replayed.
            if self.unsettled:
                self.deliver(len(self.unsettled))
            self.outbox.seal()
            while self.outbox.replayable():
                self.replay(10_000)
            self.stored_at_most_twice_and_only_in_the_window()
            counts = self.stored()
            lost = self.accepted - set(counts) - set(self.corrupted.values())
            assert not lost, f"{len(lost)} accepted events are nowhere"
            # Each flipped record is in a quarantined region (neighbours merge into one).
            regions = [
                (entry.segment, entry.offset, entry.offset + entry.length)
                for entry in read_quarantine(self.directory)
            ]
            for name, offset in self.corrupted:
                assert any(n == name and a <= offset < b for n, a, b in regions), offset
            for name, start, stop in regions:
                assert any(n == name and start <= o < stop for n, o in self.corrupted), start
            self.outbox.close()
            left = [path.name for path in self.directory.iterdir() if path.suffix != ".ndjson"]
            assert left == ["outbox.lock"]
        finally:
            with contextlib.suppress(Exception):
                self.outbox.close()
            shutil.rmtree(self.directory, ignore_errors=True)


def test_outbox_state_machine(tmp_path: Path) -> None:
    class Machine(OutboxMachine):
        def __init__(self) -> None:
            super().__init__(tmp_path)

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=100,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
