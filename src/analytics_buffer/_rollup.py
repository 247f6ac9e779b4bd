"""Rollups in ClickHouse: the counters table, its DDL by server version, writes and reads.

A rollup is written as one row per counter: ``(project_id, name, period,
start, count, rollup_id)``. The table is a ``ReplacingMergeTree`` whose
sorting key ends with ``rollup_id``, and reads sum ``count`` under
``FINAL``. That makes a rollup idempotent on every server:

* a rollup written again under the same identity (a retry after an unknown
  outcome, or an instance finishing a rollup another one had staged)
  collapses to one row per counter, at once under ``FINAL``;
* where the server has ``insert_deduplication_token`` (22.2+, chdb), each
  chunk also carries ``<rollup_id>:<chunk>`` and the table has a
  ``non_replicated_deduplication_window``, so a retry is usually not even
  stored twice. ClickHouse 18.16 has neither: there the sorting key alone
  does it.

It plays the part of a ``SummingMergeTree`` (a dashboard sums ``count``
per counter), at the price of one row per counter per rollup instead of
one per counter: about ``2 * 1440`` rows a day for a name counted every
minute. A ``SummingMergeTree`` would add up the two copies of a retried
rollup on 18.16, which is the double count this layout exists to prevent.

A read names the rollup still staged in the store (if any), whose rows must
not be counted from ClickHouse as well as from the store.

It goes through the sink's ``query`` and ``insert_tuples``, so it works on
both :class:`~analytics_buffer._clickhouse.ClickHouseSink` and the embedded
:class:`~analytics_buffer._chdb.ChdbSink`.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any, Final, Protocol, final, runtime_checkable

import anyio

from ._counter_store import Staged
from ._counters import Bucket, field_of, parse_field
from ._schema import Capabilities, replacing_table_ddl

__all__ = (
    "ROLLUP_CHUNK_ROWS",
    "RollupTarget",
    "SinkRollups",
    "TupleSink",
    "counters_ddl",
    "counters_table",
)

ROLLUP_CHUNK_ROWS: Final = 5000
"""Rows per INSERT of a rollup; chunks are cut the same way on every attempt."""
_COLUMNS: Final = "project_id, name, period, start, count, rollup_id"


def counters_table(table: str) -> str:
    """The counters table that goes with the events table ``table``."""
    return f"{table}_counters"


def counters_ddl(table: str, caps: Capabilities) -> str:
    """Return the ``CREATE TABLE IF NOT EXISTS`` statement of the counters table.

    :param table: the counters table's name (a plain identifier)
    :param caps: the capabilities of the server the table is created on
    """
    text = "LowCardinality(String)" if caps.has_low_cardinality else "String"
    columns = [
        f"`project_id` {text}",
        f"`name` {text}",
        f"`period` {text}",
        "`start` DateTime('UTC')",
        "`count` UInt64",
        "`rollup_id` String",
    ]
    return replacing_table_ddl(
        table,
        columns,
        partition_by="toYYYYMM(start)",
        order_by="project_id, name, period, start, rollup_id",
        caps=caps,
    )


@runtime_checkable
class TupleSink(Protocol):
    """What a rollup needs of a sink (both ClickHouse sinks have it)."""

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a query and return its rows."""

    async def insert_tuples(self, head: str, rows: list[tuple[Any, ...]], token: str) -> None:
        """Insert ``rows`` through ``head`` as one INSERT identified by ``token``."""


class RollupTarget(Protocol):
    """Where rollups go, and where reads find them."""

    async def write(self, rollup: Staged) -> None:
        """Store ``rollup``; storing the same identity again changes no read.

        :raises SinkError: not stored (or unknown); safe to retry
        """

    async def totals(
        self, project_id: str, name: str, start: int, end: int, exclude: Collection[str]
    ) -> dict[str, int]:
        """Counts by field of ``(project_id, name)`` whose start is in ``[start, end)``.

        Rows of the rollups in ``exclude`` are left out.
        """


def _literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _time(seconds: int) -> str:
    # A DateTime literal in UTC: the column's time zone.
    return "'" + datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S") + "'"


@final
class SinkRollups:
    """The counters table next to a sink's events table, reached through ``sink.query``.

    The table is created (``IF NOT EXISTS``) before the first write or read.

    :param sink: an open-able ClickHouse or chdb sink
    :param table: the counters table
    """

    def __init__(self, sink: TupleSink, table: str) -> None:
        self._sink = sink
        self._table = table
        self._caps: Capabilities | None = None
        self._lock = anyio.Lock()

    async def prepare(self) -> Capabilities:
        """Create the table (``IF NOT EXISTS``) once; return the server's capabilities."""
        async with self._lock:
            if self._caps is None:
                rows = await self._sink.query("SELECT version()")
                caps = Capabilities.for_version(str(rows[0][0]))
                await self._sink.query(counters_ddl(self._table, caps))
                self._caps = caps
        return self._caps

    async def write(self, rollup: Staged) -> None:
        await self.prepare()
        fields = sorted(field for field, count in rollup.counts.items() if count)
        head = f"INSERT INTO `{self._table}` ({_COLUMNS})"
        for chunk, first in enumerate(range(0, len(fields), ROLLUP_CHUNK_ROWS)):
            rows: list[tuple[Any, ...]] = [
                (*parse_field(field), rollup.counts[field], rollup.id)
                for field in fields[first : first + ROLLUP_CHUNK_ROWS]
            ]
            await self._sink.insert_tuples(head, rows, f"{rollup.id}:{chunk}")

    async def totals(
        self, project_id: str, name: str, start: int, end: int, exclude: Collection[str]
    ) -> dict[str, int]:
        await self.prepare()
        skip = ""
        if exclude:
            skip = f" AND rollup_id NOT IN ({', '.join(map(_literal, sorted(exclude)))})"
        rows = await self._sink.query(
            f"SELECT period, toUInt32(start), sum(count) FROM `{self._table}` FINAL "
            f"WHERE project_id = {_literal(project_id)} AND name = {_literal(name)} "
            f"AND start >= {_time(start)} AND start < {_time(end)}{skip} "
            "GROUP BY period, start"
        )
        return {
            field_of(Bucket(project_id, name, str(period), int(at))): int(count)  # type: ignore[arg-type]
            for period, at, count in rows
        }
