"""An in-memory rollup target for tests of the CounterActor's logic (trio, virtual clock).

Integration tests roll up into the real ClickHouse and chdb; this only
stands in where the logic under test is ours.
"""

from __future__ import annotations

from collections.abc import Collection

from analytics_buffer import TransientSinkError
from analytics_buffer._counter_store import Staged
from analytics_buffer._counters import parse_field


class MemoryRollups:
    """Keeps each rollup by identity, as the counters table does under ``FINAL``.

    ``fail_next`` makes the next writes raise ``TransientSinkError`` without
    storing; ``lose_reply_next`` stores them and then raises it (the outcome
    the writer cannot know); ``crash_next`` raises a plain ``RuntimeError``
    (an adapter bug) without storing.
    """

    def __init__(self) -> None:
        self.rollups: dict[str, dict[str, int]] = {}
        self.writes = 0
        self.fail_next = 0
        self.lose_reply_next = 0
        self.crash_next = 0

    async def write(self, rollup: Staged) -> None:
        self.writes += 1
        if self.crash_next:
            self.crash_next -= 1
            raise RuntimeError("adapter bug")
        if self.fail_next:
            self.fail_next -= 1
            raise TransientSinkError("connection refused")
        self.rollups[rollup.id] = dict(rollup.counts)
        if self.lose_reply_next:
            self.lose_reply_next -= 1
            raise TransientSinkError("connection reset", possibly_persisted=True)

    async def totals(
        self, project_id: str, name: str, start: int, end: int, exclude: Collection[str]
    ) -> dict[str, int]:
        found: dict[str, int] = {}
        for rollup_id, counts in self.rollups.items():
            if rollup_id in exclude:
                continue
            for field, count in counts.items():
                bucket = parse_field(field)
                if (bucket.project_id, bucket.name) == (project_id, name) and (
                    start <= bucket.start < end
                ):
                    found[field] = found.get(field, 0) + count
        return found
