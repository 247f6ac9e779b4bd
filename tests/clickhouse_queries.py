"""Reading back what the tests wrote: queries on a ClickHouse connection of their own."""

from __future__ import annotations

from typing import Any

import anyio
from asynch import Connection


async def query(url: str, sql: str, *, timeout: float = 10.0) -> list[tuple[Any, ...]]:
    """Run a read query on its own connection (never a buffer's) and return the rows."""
    with anyio.fail_after(timeout):
        async with Connection(dsn=url) as connection, connection.cursor() as cursor:
            await cursor.execute(sql)
            return list(await cursor.fetchall())


async def table_counts(url: str, table: str = "events") -> tuple[int, int, int]:
    """``(count(), uniqExact(id), count() FINAL)`` of ``table``."""
    [(count, unique)] = await query(url, f"SELECT count(), uniqExact(id) FROM {table}")
    [(final,)] = await query(url, f"SELECT count() FROM {table} FINAL")
    return int(count), int(unique), int(final)
