"""Counters shared by the actors, and the ``Stats`` snapshot users read."""

from __future__ import annotations

from typing import NamedTuple, final

__all__ = ("Counters", "Stats")


class Stats(NamedTuple):
    """A snapshot of a buffer's counters since it started.

    Every accepted event ends up counted in exactly one of ``written`` or
    ``dead_lettered``, or is still ``buffered`` (session events count as
    buffered until the session store holds them; ``written`` also counts the
    session_end events made for idle sessions), or waits in the disk outbox
    (``outbox_spilled`` minus ``outbox_replayed``; replayed events count in
    ``written`` or ``dead_lettered`` as well).
    """

    accepted: int
    """Events ``track``/``put`` accepted."""
    dropped: int
    """Valid events refused because the buffer was full (``drop_newest``)."""
    rejected: int
    """Invalid events refused with ``InvalidEvent``."""
    written: int
    """Events ClickHouse confirmed."""
    dead_lettered: int
    """Events written to a dead-letter file instead, with the reason."""
    flushes: int
    """Batches handed to the writer."""
    retries: int
    """INSERT attempts repeated after a transient failure."""
    restarts: int
    """Actor restarts after a crash."""
    buffered: int
    """Events accepted and not yet written or dead-lettered."""
    buffered_bytes: int
    """Their estimated size."""
    sessions_ended: int
    """Sessions ended (by a session_end event or by idleness) by this instance."""
    session_screen_views: int
    """Screen views this instance wrote with their duration."""
    sessions_waiting: int
    """Events with a session_id not yet handed to the session store."""
    sessions_degraded: bool
    """Whether the session store is unreachable (events wait in memory)."""
    stale_sessions_removed: int
    """Ended sessions forgotten after ``session_retention``."""
    counted: int
    """Accepted events added to the counters and live visitors."""
    counter_rollups: int
    """Rollups of the counters this instance wrote into ClickHouse."""
    counters_degraded: bool
    """Whether the counter store is unreachable (counts wait in memory)."""
    counter_keys_held: int
    """Counters and visitors held in this instance's memory, not yet in the store."""

    # --- the disk outbox (filled in by AnalyticsBuffer.stats)
    outbox_bytes: int = 0
    """Size of the outbox's segment files on disk (an active log segment counts in full)."""
    outbox_segments: int = 0
    """Segment files in the outbox (the active one included)."""
    outbox_oldest_age: float = 0.0
    """Age in seconds of the oldest segment (0 when there is none)."""
    outbox_spilled: int = 0
    """Events moved to the outbox after their retries ran out (not dead-lettered)."""
    outbox_replayed: int = 0
    """Events replayed from the outbox (also counted in ``written``, or in
    ``dead_lettered`` when ClickHouse refused them), this run's and earlier runs'."""
    outbox_quarantined: int = 0
    """Outbox records that failed their checks, moved to ``quarantine.ndjson``."""
    outbox_refused: int = 0
    """Events the outbox could not take (its cap, a full disk, a failed fsync)."""
    outbox_fsyncs: int = 0
    """fsyncs of the outbox's log (``wal``)."""


@final
class Counters:
    """The mutable counters behind :class:`Stats`; owned by one event loop."""

    __slots__ = (
        "accepted",
        "buffered",
        "buffered_bytes",
        "counted",
        "counter_keys_held",
        "counter_rollups",
        "counters_degraded",
        "dead_lettered",
        "dropped",
        "flushes",
        "rejected",
        "restarts",
        "retries",
        "session_screen_views",
        "sessions_degraded",
        "sessions_ended",
        "sessions_waiting",
        "stale_sessions_removed",
        "written",
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.dropped = 0
        self.rejected = 0
        self.written = 0
        self.dead_lettered = 0
        self.flushes = 0
        self.retries = 0
        self.restarts = 0
        self.buffered = 0
        self.buffered_bytes = 0
        self.sessions_ended = 0
        self.session_screen_views = 0
        self.sessions_waiting = 0
        self.sessions_degraded = False
        self.stale_sessions_removed = 0
        self.counted = 0
        self.counter_rollups = 0
        self.counters_degraded = False
        self.counter_keys_held = 0

    def snapshot(self) -> Stats:
        """Return the counters as an immutable :class:`Stats`."""
        return Stats(
            accepted=self.accepted,
            dropped=self.dropped,
            rejected=self.rejected,
            written=self.written,
            dead_lettered=self.dead_lettered,
            flushes=self.flushes,
            retries=self.retries,
            restarts=self.restarts,
            buffered=self.buffered,
            buffered_bytes=self.buffered_bytes,
            sessions_ended=self.sessions_ended,
            session_screen_views=self.session_screen_views,
            sessions_waiting=self.sessions_waiting,
            sessions_degraded=self.sessions_degraded,
            stale_sessions_removed=self.stale_sessions_removed,
            counted=self.counted,
            counter_rollups=self.counter_rollups,
            counters_degraded=self.counters_degraded,
            counter_keys_held=self.counter_keys_held,
        )
