"""What every sink does the same way: set up its table, and open late.

A sink only says how it connects (:meth:`TableSink._connect`), runs SQL
(:meth:`TableSink._fetch`, :meth:`TableSink._execute`) and sends rows
(:meth:`TableSink._insert_rows`). This base detects the server version,
creates the table when asked to, learns its columns, maps them onto the
event fields, and makes an ``insert`` open the sink first when the server
was down at start.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import anyio

from ._event import Event
from ._exceptions import ConfigError, PermanentSinkError
from ._rows import Dialect, RowPlan, plan_rows
from ._schema import Capabilities, events_ddl
from ._settings import Settings

__all__ = ("TableSink",)


class TableSink(ABC):
    """A sink writing events into one ClickHouse table (see the module docstring).

    :param settings: ``table`` and what the concrete sink needs
    :param create_table: create the table (``IF NOT EXISTS``) when opening
    """

    _engine: ClassVar[str]
    """Names the engine in error messages."""
    _dialect: ClassVar[Dialect]
    """How rows are sent (see :func:`~analytics_buffer._rows.plan_rows`)."""

    def __init__(self, settings: Settings, *, create_table: bool = True) -> None:
        self._settings = settings
        self._create_table = create_table
        self._open_lock = anyio.Lock()
        self._capabilities: Capabilities | None = None
        self._plan: RowPlan | None = None

    @property
    def capabilities(self) -> Capabilities | None:
        """What the server supports; ``None`` until the version is known."""
        return self._capabilities

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns each INSERT names; empty until opened."""
        return self._plan.columns if self._plan else ()

    async def open(self) -> None:
        """Connect, detect the version, create the table if asked to, learn its columns.

        Safe to call again: an open sink returns at once.

        :raises ConfigError: the table does not fit the events, or the server
            refused the set-up (unknown database, credentials)
        :raises TransientSinkError: the server cannot be reached
        """
        async with self._open_lock:
            if self._plan is not None:
                return
            await self._connect()
            table = self._settings.table
            try:
                capabilities = await self.fetch_capabilities()
                if self._create_table:
                    await self._execute(events_ddl(table, capabilities))
                described = await self._fetch(f"DESCRIBE TABLE `{table}`")
            except PermanentSinkError as exc:
                raise ConfigError(
                    f"{self._engine} refused to set up table {table!r}: {exc}"
                ) from exc
            columns = ((row[0], row[1], row[2]) for row in described)
            self._plan = plan_rows(columns, table, dialect=self._dialect)

    async def fetch_capabilities(self) -> Capabilities:
        """Learn (once) what the server supports from its version."""
        if self._capabilities is None:
            rows = await self._fetch("SELECT version()")
            self._capabilities = Capabilities.for_version(str(rows[0][0]))
        return self._capabilities

    async def insert(self, events: Sequence[Event], token: str) -> None:
        """Insert ``events`` as one INSERT identified by ``token``.

        Opens the sink first if an earlier ``open`` failed (the server was
        down at start); a table found unusable then refuses the insert for
        good, as a :class:`PermanentSinkError`.

        :raises TransientSinkError: may be retried with the same token
        :raises PermanentSinkError: the server refused the rows
        """
        if not events:
            return
        if self._plan is None:
            try:
                await self.open()
            except ConfigError as exc:
                raise PermanentSinkError(str(exc)) from exc
        assert self._plan is not None
        assert self._capabilities is not None
        head = f"INSERT INTO `{self._settings.table}` ({self._plan.column_list})"
        await self._insert_rows(head, self._plan, self._capabilities.insert_settings(token), events)

    @abstractmethod
    async def _connect(self) -> None:
        """Make the server reachable (may do nothing until the first query)."""

    @abstractmethod
    async def _fetch(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a read query and return its rows."""

    @abstractmethod
    async def _execute(self, sql: str) -> None:
        """Run a statement that returns nothing."""

    @abstractmethod
    async def _insert_rows(
        self, head: str, plan: RowPlan, settings: dict[str, int | str], events: Sequence[Event]
    ) -> None:
        """Send ``events`` through ``head`` (``INSERT INTO t (columns)``) with ``settings``."""
