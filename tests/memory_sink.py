"""An in-memory sink for unit tests of the pure buffering logic (trio, virtual clock).

Integration tests use the real ClickHouse; this only stands in where the
logic under test is ours, not the server's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from analytics_buffer import Event, PermanentSinkError, TransientSinkError


class MemorySink:
    """Keeps inserted chunks; deduplicates by token like a server with token dedup.

    ``fail_transient`` / ``fail_permanent`` make the next inserts fail;
    ``crash_next`` makes them raise a plain ``RuntimeError``, as an adapter
    bug would, which crashes the Writer.
    """

    def __init__(self) -> None:
        self.rows: list[Event] = []
        self.tokens: set[str] = set()
        self.inserts = 0
        self.fail_transient = 0
        self.fail_permanent = 0
        self.crash_next = 0
        self.opened = 0
        self.closed = 0

    async def open(self) -> None:
        self.opened += 1

    async def aclose(self) -> None:
        self.closed += 1

    async def insert(self, events: Sequence[Event], token: str) -> None:
        self.inserts += 1
        if self.crash_next:
            self.crash_next -= 1
            raise RuntimeError("adapter bug")
        if self.fail_permanent:
            self.fail_permanent -= 1
            raise PermanentSinkError("Code: 16. No such column nope", code=16)
        if self.fail_transient:
            self.fail_transient -= 1
            raise TransientSinkError("connection refused")
        if token in self.tokens:
            return
        self.tokens.add(token)
        self.rows.extend(events)

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        return [(len(self.rows),)]
