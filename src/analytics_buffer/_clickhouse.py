"""``ClickHouseSink``: the events table on a ClickHouse server, over asynch (native TCP).

Opening detects the server version (``SELECT version()``), creates the table
for it when asked to (:func:`~analytics_buffer._schema.events_ddl`), and maps
the Event fields onto the table's columns (:mod:`analytics_buffer._rows`).
Each INSERT carries ``insert_deduplicate=1``, the chunk's
``insert_deduplication_token`` (22.2+) and ``async_insert=0`` (21.11+), and
each attempt is bounded by ``insert_timeout``.

Each chunk is one INSERT (the server makes one part of it) whose data goes
as columns, in blocks of ``insert_block_rows`` with a turn of the event loop
after each; one INSERT at a time sends its blocks. asynch's cursor offers
neither columns nor turns, so :func:`_insert_blocks` drives its protocol
connection, :func:`_send_block` writes the table's columns itself
(:mod:`._wire`), and :func:`_reset` makes an interrupted INSERT store
nothing: private asynch API (checked against asynch 0.4.0), kept to those
three functions and pinned by ``tests/test_clickhouse_sink.py``.

At most ``pool_size`` connections are open; a connection whose query
failed or was interrupted (timeout, cancellation, a broken socket) is left
half-way through the protocol, so it is closed and forgotten, never reused.
The pool is a small one of our own rather than ``asynch.Pool`` (checked
against asynch 0.4.0): after a cancelled query, asynch's ``close()`` awaits a
close waiter that the cancellation already cancelled, so every later close
raises that stale ``CancelledError``; ``asynch.Pool`` pings and closes a
connection when it comes back, so a discarded one would raise out of the
pool, and its give-back is itself cancellable (an interrupted give-back
leaves the slot taken for good). Ours closes a failed connection once, in a
shielded scope, ignores the stale error and drops it; it does not ping, as
asynch already pings before each query and reconnects a stale socket.

Errors never leave unwrapped (``raise ... from exc``):

* the server refused the query: by its code (:mod:`._clickhouse_codes`),
  :class:`~analytics_buffer.PermanentSinkError` or
  :class:`~analytics_buffer.TransientSinkError`;
* the server cannot be reached: transient, not persisted;
* the connection broke or timed out once the INSERT had started: transient
  and ``possibly_persisted`` (the server may have stored the block);
* the rows do not serialise into the table's types: permanent, code 0.

``open`` raises :class:`~analytics_buffer.ConfigError` instead of a
permanent error (unknown database, refused credentials, a table that does
not fit): nothing can be written until the configuration changes.

asynch runs on asyncio only, so this sink needs anyio's asyncio backend.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, final

import anyio
import anyio.lowlevel
import asynch
from asynch.errors import ClickHouseException, ColumnException, NetworkError, ServerException
from asynch.proto import constants
from asynch.proto.block import BlockInfo as _BlockInfo
from asynch.proto.block import ColumnOrientedBlock
from asynch.proto.columns import write_column as _write_column
from asynch.proto.context import ExecuteContext
from asynch.proto.protocol import ClientPacket
from asynch.proto.utils.dsn import DSNError, parse_dsn

from ._clickhouse_codes import PERMANENT_CODES, error_for_code
from ._event import Event
from ._exceptions import ConfigError, PermanentSinkError, SinkError, TransientSinkError
from ._rows import RowPlan
from ._settings import Settings
from ._table_sink import TableSink
from ._wire import column_wire

__all__ = ("ClickHouseSink",)

log = logging.getLogger("analytics_buffer.clickhouse")

_SERIALISATION_ERRORS = (ColumnException, struct.error, TypeError, ValueError, OverflowError)


def _sink_error(exc: Exception, *, started: bool) -> SinkError:
    """Return the sink error for a driver error; ``started``: the query had been sent."""
    if isinstance(exc, SinkError):
        return exc
    if isinstance(exc, ServerException):
        code = exc.code or 0
        return error_for_code(code, f"ClickHouse error {code}: {exc.message}")
    if isinstance(exc, NetworkError):
        # asynch raises it only when no host accepts a connection.
        return TransientSinkError(f"ClickHouse is unreachable: {exc}")
    if isinstance(exc, TimeoutError):
        # Ours (insert_timeout) or one of asynch's socket timeouts.
        return TransientSinkError("ClickHouse did not answer in time", possibly_persisted=started)
    if isinstance(exc, (OSError, EOFError)):
        what = type(exc).__name__
        return TransientSinkError(
            f"ClickHouse connection failed: {what}: {exc}", possibly_persisted=started
        )
    if isinstance(exc, ClickHouseException) and exc.code in PERMANENT_CODES:
        # Client-side checks with a server code, e.g. CannotParseUuidError (376).
        return PermanentSinkError(f"rows do not fit the table: {exc}", code=int(exc.code))
    if isinstance(exc, _SERIALISATION_ERRORS):
        return PermanentSinkError(f"rows do not fit the table: {type(exc).__name__}: {exc}")
    return TransientSinkError(
        f"ClickHouse client error: {type(exc).__name__}: {exc}", possibly_persisted=started
    )


def _connection_options(settings: Settings) -> dict[str, Any]:
    if not settings.clickhouse_url:
        raise ConfigError("ClickHouseSink needs settings.clickhouse_url")
    try:
        options: dict[str, Any] = parse_dsn(settings.clickhouse_url)
    except (DSNError, ValueError) as exc:
        raise ConfigError(f"clickhouse_url does not parse: {exc}") from exc
    # Timeouts given in the URL win over the settings.
    defaults = {
        "connect_timeout": settings.connect_timeout,
        "sync_request_timeout": settings.connect_timeout,
        "send_receive_timeout": settings.insert_timeout,
    }
    return defaults | options


async def _close_quietly(connection: asynch.Connection) -> None:
    """Close ``connection`` and ignore how that fails; call it in a shielded scope.

    After a cancelled query the close raises the stale ``CancelledError`` of
    asynch's cancelled close waiter (no cancellation can reach us in the
    shield); the socket itself was closed just before that wait.
    """
    with suppress(Exception, anyio.get_cancelled_exc_class()):
        await connection.close()


async def _insert_blocks(
    connection: asynch.Connection,
    sql: str,
    settings: dict[str, int | str],
    blocks: Iterable[list[list[Any]]],
    sending: anyio.Lock,
    encoded: dict[str, bytes],
) -> None:
    """Run the INSERT ``sql`` with ``blocks`` (lists of columns) as its data.

    One INSERT makes one part on the server however many blocks it has (the
    server squashes them), while the event loop gets a turn after every
    block: a large INSERT is cheap for the server and never stalls the loop
    for longer than one block takes to build and serialise. ``sending`` lets
    one INSERT at a time send its blocks (the others wait for the server or
    for their turn), so a turn of the loop holds at most one block.

    asynch's public ``Cursor.execute`` takes rows only and serialises all of
    an INSERT's blocks back to back, so this drives asynch's protocol
    connection itself, step for step as its ``process_insert_query`` does.
    Private asynch API (checked against asynch 0.4.0), used nowhere else;
    ``tests/test_clickhouse_sink.py`` pins what it relies on.
    """
    # Untyped in asynch's stubs (or absent from them): typed as Any here, once.
    protocol: Any = connection._connection
    block: Callable[..., Any] = ColumnOrientedBlock
    async with ExecuteContext(protocol, sql, settings):
        await protocol.send_query(sql)
        await protocol.send_external_tables(None)
        sample = await protocol.receive_sample_block()
        structure = sample.columns_with_types
        try:
            async with sending:
                for columns in blocks:
                    if protocol.compression:
                        await protocol.send_block(block(columns_with_types=structure, data=columns))
                    else:
                        await _send_block(protocol, structure, columns, encoded)
                    await anyio.lowlevel.checkpoint()
                await protocol.send_block(block())  # an empty block ends the data
        except BaseException:
            # A server that sees the socket close mid-INSERT takes the blocks
            # it has as the whole INSERT; a reset makes it drop them instead.
            _reset(protocol.writer.writer)
            raise
        packet = await protocol._receive_packet()
        if packet.exception:
            raise packet.exception


# Untyped in asynch's stubs: typed as Any here, once.
write_column: Callable[..., Any] = _write_column
BlockInfo: Callable[[], Any] = _BlockInfo


async def _send_block(
    protocol: Any,
    structure: list[tuple[str, str]],
    columns: list[list[Any]],
    encoded: dict[str, bytes],
) -> None:
    """Send one Data packet holding ``columns``, as asynch's ``send_block`` would.

    The columns the events table uses are written by :func:`column_wire`;
    any other type goes through asynch's own column writer. Uncompressed
    connections only.
    """
    writer = protocol.writer
    revision = protocol.server_info.revision
    await writer.write_varint(ClientPacket.DATA)
    if revision >= constants.DBMS_MIN_REVISION_WITH_TEMPORARY_TABLES:
        await writer.write_str("")  # no temporary table
    if revision >= constants.DBMS_MIN_REVISION_WITH_BLOCK_INFO:
        await BlockInfo().write(writer)
    await writer.write_varint(len(columns))
    await writer.write_varint(len(columns[0]) if columns else 0)
    for (name, kind), values in zip(structure, columns, strict=True):
        await writer.write_str(name)
        await writer.write_str(kind)
        wire = column_wire(kind, values, encoded)
        if wire is None:
            await write_column(protocol.reader, writer, protocol.context, name, kind, values)
        else:
            await writer.write_bytes(wire)
    await writer.flush()


def _reset(stream: asyncio.StreamWriter) -> None:
    """Close ``stream``'s socket with a TCP reset (no orderly end of data)."""
    sock = stream.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.transport.abort()


@final
class _Connections:
    """At most ``size`` asynch connections, opened on demand; a failed one is dropped."""

    def __init__(self, size: int, options: dict[str, Any]) -> None:
        self._options = options
        self._slots = anyio.Semaphore(size)
        self._idle: list[asynch.Connection] = []
        self._busy: set[asynch.Connection] = set()
        self._closed = False

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asynch.Connection]:
        """Lend a connected connection; it is closed and dropped if the body fails."""
        async with self._slots:
            connection = self._idle.pop() if self._idle else asynch.Connection(**self._options)
            self._busy.add(connection)
            healthy = False
            try:
                # asynch pings before each query and reconnects a stale socket.
                await connection.connect()
                yield connection
                healthy = True
            finally:
                self._busy.discard(connection)
                if healthy and not self._closed:
                    self._idle.append(connection)
                else:
                    with anyio.CancelScope(shield=True):
                        await _close_quietly(connection)

    @property
    def idle(self) -> int:
        """Connections open and waiting to be lent."""
        return len(self._idle)

    @property
    def busy(self) -> int:
        """Connections lent out."""
        return len(self._busy)

    async def aclose(self) -> None:
        """Close every connection, including lent ones (their queries fail)."""
        self._closed = True
        connections = [*self._idle, *self._busy]
        self._idle.clear()
        with anyio.CancelScope(shield=True):
            for connection in connections:
                await _close_quietly(connection)


@final
class ClickHouseSink(TableSink):
    """The events table on a ClickHouse server (see the module docstring).

    :param settings: ``clickhouse_url``, ``table``, ``pool_size``,
        ``connect_timeout`` and ``insert_timeout`` are used
    :param create_table: create the table (``IF NOT EXISTS``) when opening
    :raises ConfigError: when ``clickhouse_url`` is missing or malformed
    """

    _engine = "ClickHouse"
    _dialect = "native"

    def __init__(self, settings: Settings, *, create_table: bool = True) -> None:
        super().__init__(settings, create_table=create_table)
        self._options = _connection_options(settings)
        self._pool: _Connections | None = None
        self._sending = anyio.Lock()
        self._encoded: dict[str, bytes] = {}

    async def _connect(self) -> None:
        pass  # connections open on demand, in _run

    async def _fetch(self, sql: str) -> list[tuple[Any, ...]]:
        return await self._run(sql)

    async def _execute(self, sql: str) -> None:
        await self._run(sql)

    async def _insert_rows(
        self, head: str, plan: RowPlan, settings: dict[str, int | str], events: Sequence[Event]
    ) -> None:
        size = self._settings.insert_block_rows
        # Built lazily: each block's columns are made just before it is sent.
        blocks = (
            plan.column_values(events[start : start + size])
            for start in range(0, len(events), size)
        )
        await self._run(f"{head} VALUES", settings, blocks)

    async def insert_tuples(self, head: str, rows: list[tuple[Any, ...]], token: str) -> None:
        """Insert ``rows`` through ``head`` (``INSERT INTO t (columns)``) as one INSERT.

        For tables other than the events table (the counters' rollups);
        ``token`` is the insert's deduplication identity, as in :meth:`insert`.

        :raises TransientSinkError: may be retried with the same token
        :raises PermanentSinkError: the server refused the rows
        """
        if not rows:
            return
        caps = await self.fetch_capabilities()
        columns = [list(column) for column in zip(*rows, strict=True)]
        await self._run(f"{head} VALUES", caps.insert_settings(token), [columns])

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a read query and return its rows (asynch's Python values).

        :raises TransientSinkError: may be retried
        :raises PermanentSinkError: the server refused the query
        """
        return await self._run(sql)

    async def aclose(self) -> None:
        """Close every connection; safe to call twice."""
        pool, self._pool = self._pool, None
        self._plan = None
        if pool is not None:
            await pool.aclose()

    async def _run(
        self,
        sql: str,
        settings: dict[str, int | str] | None = None,
        blocks: Iterable[list[list[Any]]] | None = None,
    ) -> list[tuple[Any, ...]]:
        """Execute one statement on a pooled connection, within ``insert_timeout``.

        With ``blocks``, ``sql`` is an INSERT and they are its data.
        """
        started = False
        try:
            with anyio.fail_after(self._settings.insert_timeout):
                async with self._connections().connection() as connection:
                    started = True
                    if blocks is not None:
                        await _insert_blocks(
                            connection, sql, settings or {}, blocks, self._sending, self._encoded
                        )
                        return []
                    cursor = connection.cursor()
                    if settings:
                        cursor.set_settings(settings)  # type: ignore[no-untyped-call]
                    await cursor.execute(sql)
                    return list(await cursor.fetchall())
        except Exception as exc:  # cancellation passes through unmapped
            raise _sink_error(exc, started=started) from exc

    def _connections(self) -> _Connections:
        if self._pool is None:
            self._pool = _Connections(self._settings.pool_size, self._options)
        return self._pool
