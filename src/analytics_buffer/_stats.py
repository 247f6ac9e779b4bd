"""Counters shared by the actors, and the ``Stats`` snapshot users read."""

from __future__ import annotations

from typing import NamedTuple, final

__all__ = ("Counters", "Stats")


class Stats(NamedTuple):
    """A snapshot of a buffer's counters since it started.

    Every accepted event ends up counted in exactly one of ``written`` or
    ``dead_lettered``, or is still ``buffered``.
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


@final
class Counters:
    """The mutable counters behind :class:`Stats`; owned by one event loop."""

    __slots__ = (
        "accepted",
        "buffered",
        "buffered_bytes",
        "dead_lettered",
        "dropped",
        "flushes",
        "rejected",
        "restarts",
        "retries",
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
        )
