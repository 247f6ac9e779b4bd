"""Choosing the storage engine from the settings."""

from __future__ import annotations

from ._settings import Settings
from ._sink import Sink

__all__ = ("create_sink",)


def create_sink(settings: Settings, *, create_table: bool = True) -> Sink:
    """Return the sink ``settings`` ask for, not yet opened.

    A :class:`~analytics_buffer._clickhouse.ClickHouseSink` when
    ``clickhouse_url`` is set, else the embedded
    :class:`~analytics_buffer._chdb.ChdbSink` under ``data_dir`` (chdb is
    imported only when that sink opens).

    :param create_table: let the sink create its table (``IF NOT EXISTS``) when it opens
    :raises ConfigError: when ``clickhouse_url`` does not parse
    """
    if settings.clickhouse_url:
        from ._clickhouse import ClickHouseSink

        return ClickHouseSink(settings, create_table=create_table)
    from ._chdb import ChdbSink

    return ChdbSink(settings, create_table=create_table)
