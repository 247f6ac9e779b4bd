"""The events table: server versions, what each version can do, and the DDL.

One layout, two spellings. Servers with ``DateTime64`` and ``Map`` (20.1 and
21.8) get the modern table; older ones, such as the Debian 18.16 package,
get the same columns in older types, keeping the millisecond in a separate
``created_at_ms`` column and the properties in a ``Nested`` pair of arrays
(``properties.key`` and ``properties.value``). Column names always match the
:class:`~analytics_buffer.Event` fields, which is how rows find their columns
(see :mod:`analytics_buffer._rows`).

Both spellings use ``ReplacingMergeTree`` ordered by ``(project_id, name,
created_at, id)`` (``created_at_ms`` goes before ``id`` in the old one): a
chunk that was stored twice (a retry after an unknown outcome on a server
without ``insert_deduplication_token``) collapses to one row per event id on
merge, and at once under ``SELECT ... FINAL``. Where the server has it,
``non_replicated_deduplication_window`` makes the token work on a plain
(non-replicated) table, so a retried chunk is not stored twice in the first
place.

Version facts, checked against the ClickHouse changelogs:

* 19.3: ``LowCardinality`` without a setting (``allow_experimental_low_cardinality_type``
  was removed);
* 20.1: ``DateTime64``;
* 21.5: ``non_replicated_deduplication_window`` for plain MergeTree (PR #22514);
* 21.8: ``Map`` without a setting (21.7 still asks for ``allow_experimental_map_type``);
* 21.11: ``async_insert`` (on by default from 26.2, so we send ``async_insert=0``);
* 22.2: ``insert_deduplication_token``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, NamedTuple

from ._exceptions import ConfigError

__all__ = ("Capabilities", "ServerVersion", "events_ddl")

DEDUPLICATION_WINDOW: Final = 1000
"""Tokens a plain MergeTree table remembers (``non_replicated_deduplication_window``)."""

_VERSION: Final = re.compile(r"\s*(\d+)\.(\d+)(?:\.(\d+))?(?:\.(\d+))?")


class ServerVersion(NamedTuple):
    """A ClickHouse version such as ``18.16.1`` or ``26.9.2.1``; compares as a tuple."""

    major: int
    minor: int
    patch: int = 0
    build: int = 0

    @classmethod
    def parse(cls, text: str) -> ServerVersion:
        """Parse the result of ``SELECT version()``.

        :raises ConfigError: when ``text`` does not start with ``major.minor``
        """
        found = _VERSION.match(text)
        if found is None:
            raise ConfigError(f"cannot parse the ClickHouse version {text!r}")
        return cls(*(int(part) for part in found.groups("0")))

    def __str__(self) -> str:
        return ".".join(map(str, self if self.build else self[:3]))


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a server version supports that the schema and the inserts depend on."""

    version: ServerVersion
    has_low_cardinality: bool
    """``LowCardinality(String)`` without an experimental setting (19.3)."""
    has_datetime64: bool
    """``DateTime64(3, 'UTC')``, so milliseconds fit in ``created_at`` (20.1)."""
    has_non_replicated_dedup_window: bool
    """``non_replicated_deduplication_window`` on plain MergeTree tables (21.5)."""
    has_map: bool
    """``Map(String, String)`` without an experimental setting (21.8)."""
    has_async_insert: bool
    """The ``async_insert`` setting exists, so it can be turned off (21.11)."""
    has_dedup_token: bool
    """``insert_deduplication_token`` (22.2)."""

    @classmethod
    def for_version(cls, version: ServerVersion | str) -> Capabilities:
        """Return the capabilities of ``version`` (a :class:`ServerVersion` or its text)."""
        if isinstance(version, str):
            version = ServerVersion.parse(version)
        return cls(
            version=version,
            has_low_cardinality=version >= (19, 3),
            has_datetime64=version >= (20, 1),
            has_non_replicated_dedup_window=version >= (21, 5),
            has_map=version >= (21, 8),
            has_async_insert=version >= (21, 11),
            has_dedup_token=version >= (22, 2),
        )

    def insert_settings(self, token: str) -> dict[str, int | str]:
        """Return the settings of an INSERT of the chunk identified by ``token``.

        ``insert_deduplicate`` is explicit because a profile may turn it off;
        ``async_insert`` is turned off because we batch ourselves and read
        after write (26.2+ turns it on by default).
        """
        settings: dict[str, int | str] = {"insert_deduplicate": 1}
        if self.has_dedup_token:
            settings["insert_deduplication_token"] = token
        if self.has_async_insert:
            settings["async_insert"] = 0
        return settings


def events_ddl(table: str, caps: Capabilities) -> str:
    """Return the ``CREATE TABLE IF NOT EXISTS`` statement of the events table.

    :param table: a plain identifier (``Settings`` checks it)
    :param caps: the capabilities of the server the table is created on
    """
    low_cardinality = "LowCardinality(String)" if caps.has_low_cardinality else "String"
    if caps.has_datetime64:
        time_columns = ["`created_at` DateTime64(3, 'UTC')"]
        sort_key = "project_id, name, created_at, id"
    else:
        # DateTime has whole seconds: the millisecond lives next to it.
        time_columns = ["`created_at` DateTime('UTC')", "`created_at_ms` UInt16"]
        sort_key = "project_id, name, created_at, created_at_ms, id"
    properties = "Map(String, String)" if caps.has_map else "Nested(key String, value String)"
    columns = [
        "`id` UUID",
        f"`name` {low_cardinality}",
        f"`project_id` {low_cardinality}",
        "`profile_id` String",
        "`session_id` String",
        *time_columns,
        "`path` String",
        "`origin` String",
        "`referrer` String",
        "`duration` UInt32",
        f"`properties` {properties}",
    ]
    return replacing_table_ddl(
        table, columns, partition_by="toYYYYMM(created_at)", order_by=sort_key, caps=caps
    )


def replacing_table_ddl(
    table: str, columns: list[str], *, partition_by: str, order_by: str, caps: Capabilities
) -> str:
    """Return ``CREATE TABLE IF NOT EXISTS`` of a ``ReplacingMergeTree`` table.

    Where the server has it, inserts are deduplicated over the last
    ``DEDUPLICATION_WINDOW`` blocks even without replication.
    """
    lines = [
        f"CREATE TABLE IF NOT EXISTS `{table}`",
        "(",
        ",\n".join(f"    {column}" for column in columns),
        ")",
        "ENGINE = ReplacingMergeTree()",
        f"PARTITION BY {partition_by}",
        f"ORDER BY ({order_by})",
    ]
    if caps.has_non_replicated_dedup_window:
        lines.append(f"SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}")
    return "\n".join(lines)
