"""``ChdbSink``: the events table in embedded ClickHouse (chdb), the default engine.

chdb runs ClickHouse (26.x) inside the process, storing under
``<data_dir>/chdb``; it is the ``embedded`` extra
(``pip install 'analytics-buffer[embedded]'``) and is imported only when a
sink opens. Its calls block, so each runs in a worker thread, one at a time
per sink (a capacity limiter of one); a call that has started runs to its end
even if the caller is cancelled, so an INSERT is never left half-done.

Rows are built by the same row function as the native sink (see
:mod:`analytics_buffer._rows`, its ``json`` dialect) and sent as
``JSONCompactEachRow`` with one reused msgspec encoder, in the worker
thread (a chunk of ``insert_chunk_rows`` would stall the event loop): ``created_at`` as
seconds with a three-digit fraction (JSON reads a bare integer as seconds),
UUIDs as text, dicts as maps.
Each INSERT carries ``insert_deduplication_token`` (the table is created with
``non_replicated_deduplication_window``), so a retried chunk is stored once.

chdb hosts one embedded server per process, bound to the data directory of
the first session; opening a sink on another directory while one is open is
a :class:`~analytics_buffer.ConfigError`. Sinks on the same directory share
it. Server errors are classified by their code like the native sink's
(:mod:`analytics_buffer._clickhouse_codes`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar, final

import anyio
import anyio.to_thread
import msgspec

from ._clickhouse_codes import code_in_message, error_for_code
from ._event import Event
from ._exceptions import ConfigError, SinkError, TransientSinkError
from ._rows import RowPlan
from ._schema import Capabilities
from ._settings import Settings
from ._table_sink import TableSink

__all__ = ("ChdbSink", "embedded_capabilities")

_T = TypeVar("_T")

_INSTALL_HINT: Final = "pip install 'analytics-buffer[embedded]'"
# 64-bit integers as JSON numbers, so counts come back as ints.
_SESSION_OPTIONS: Final = "?output_format_json_quote_64bit_integers=0"

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(list[Any])


def _import_chdb() -> Any:
    try:
        import chdb.session
    except ImportError as exc:
        raise ConfigError(f"the embedded engine needs chdb: {_INSTALL_HINT}") from exc
    return chdb


def embedded_capabilities() -> Capabilities:
    """Return the capabilities of the installed chdb engine, without starting it.

    :raises ConfigError: when chdb is not installed
    """
    return Capabilities.for_version(str(_import_chdb().engine_version))


def _sql_literal(value: int | str) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _sink_error(exc: Exception) -> SinkError:
    message = str(exc)
    code = code_in_message(message)
    if code is None:
        return TransientSinkError(f"chdb failed: {message}")
    return error_for_code(code, f"chdb error {code}: {message}")


@final
class ChdbSink(TableSink):
    """The events table in chdb under ``<data_dir>/chdb`` (see the module docstring).

    :param settings: ``data_dir`` and ``table`` are used
    :param create_table: create the table (``IF NOT EXISTS``) when opening
    :raises ConfigError: when opening finds chdb missing, or another data
        directory open in this process
    """

    _engine = "chdb"
    _dialect = "json"

    def __init__(self, settings: Settings, *, create_table: bool = True) -> None:
        super().__init__(settings, create_table=create_table)
        self._path = os.path.join(settings.data_dir, "chdb")
        self._limiter = anyio.CapacityLimiter(1)
        self._session: Any = None

    @property
    def path(self) -> str:
        """The chdb data directory."""
        return self._path

    async def _connect(self) -> None:
        if self._session is None:
            # Importing chdb loads a large library: keep it off the event loop too.
            chdb = await self._call(_import_chdb)
            self._session = await self._call(self._start, chdb)

    def _start(self, chdb: Any) -> Any:
        os.makedirs(self._path, exist_ok=True)
        try:
            return chdb.session.Session(self._path + _SESSION_OPTIONS)
        except RuntimeError as exc:
            # e.g. "EmbeddedServer already initialized with path '...'".
            raise ConfigError(
                f"chdb cannot open {self._path!r}: {exc} "
                "(chdb serves one data directory per process)"
            ) from exc

    async def _insert_rows(
        self, head: str, plan: RowPlan, settings: dict[str, int | str], events: Sequence[Event]
    ) -> None:
        literals = ", ".join(f"{name}={_sql_literal(value)}" for name, value in settings.items())
        prefix = f"{head} SETTINGS {literals} FORMAT JSONCompactEachRow\n"

        def statement() -> str:
            # Built in the worker thread: a whole chunk would stall the event loop.
            return prefix + _encoder.encode_lines(plan.rows(events)).decode()

        await self._query(statement)

    async def insert_tuples(self, head: str, rows: list[tuple[Any, ...]], token: str) -> None:
        """Insert ``rows`` through ``head`` (``INSERT INTO t (columns)``) as one INSERT.

        For tables other than the events table (the counters' rollups);
        values are sent as JSON, ``token`` is the insert's deduplication identity.

        :raises TransientSinkError: may be retried with the same token
        :raises PermanentSinkError: the engine refused the rows
        """
        await self._connect()
        settings = (await self.fetch_capabilities()).insert_settings(token)
        literals = ", ".join(f"{name}={_sql_literal(value)}" for name, value in settings.items())
        body = _encoder.encode_lines(rows)
        await self._execute(
            f"{head} SETTINGS {literals} FORMAT JSONCompactEachRow\n{body.decode()}"
        )

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a read query; rows hold JSON values (numbers, strings, lists, dicts).

        :raises TransientSinkError: may be retried
        :raises PermanentSinkError: the engine refused the query
        """
        if self._session is None:
            await self.open()
        return await self._fetch(sql)

    async def aclose(self) -> None:
        """Close this sink's chdb session; safe to call twice."""
        session, self._session = self._session, None
        self._plan = None
        if session is not None:
            with anyio.CancelScope(shield=True):
                await self._call(session.close)

    async def _fetch(self, sql: str) -> list[tuple[Any, ...]]:
        output = await self._query(sql, "JSONCompactEachRow")
        return [tuple(row) for row in _decoder.decode_lines(output)]

    async def _execute(self, sql: str) -> None:
        await self._query(sql)

    async def _query(self, sql: str | Callable[[], str], fmt: str = "CSV") -> bytes:
        """Run ``sql`` (or the statement it builds, in the worker thread) in the session."""
        session = self._session
        if session is None:
            raise TransientSinkError("the chdb sink is closed")

        def run() -> Any:
            return session.query(sql if isinstance(sql, str) else sql(), fmt)

        try:
            result = await self._call(run)
        except RuntimeError as exc:  # chdb's ChdbError is a RuntimeError
            raise _sink_error(exc) from exc
        return bytes(result.bytes())

    async def _call(self, function: Callable[..., _T], *args: Any) -> _T:
        return await anyio.to_thread.run_sync(function, *args, limiter=self._limiter)
