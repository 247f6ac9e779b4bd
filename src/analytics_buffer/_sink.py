"""The ``Sink`` protocol: where the Writer puts chunks of events.

A sink turns events into rows of one table and inserts them. The Writer owns
batching, retries and dead-lettering; a sink only reports, by the class of
error it raises, whether an insert may be retried:

* returns normally: the chunk is persisted;
* :class:`~analytics_buffer.TransientSinkError`: not persisted, or possibly
  persisted (``possibly_persisted``); safe to retry with the same ``token``;
* :class:`~analytics_buffer.PermanentSinkError`: refused (schema, types); a
  retry cannot help.

The token is the chunk's stable identity: the same chunk always carries the
same token, so a server that deduplicates by token stores it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ._event import Event

__all__ = ("Sink",)


class Sink(Protocol):
    """A table that accepts chunks of events."""

    async def open(self) -> None:
        """Connect, create the table when asked to, and learn its columns.

        :raises ConfigError: when the table lacks a column for an event field
        :raises TransientSinkError: when the server cannot be reached
        """

    async def aclose(self) -> None:
        """Release connections; safe to call twice."""

    async def insert(self, events: Sequence[Event], token: str) -> None:
        """Insert ``events`` as one INSERT identified by ``token``.

        :raises TransientSinkError: the insert may be retried with the same token
        :raises PermanentSinkError: the server refused the rows
        """

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a read query and return its rows (for counting back, tests and the CLI)."""
