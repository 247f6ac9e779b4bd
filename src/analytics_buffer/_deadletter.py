"""Dead-letter files: where events go that ClickHouse will not take.

One NDJSON line per event, under ``<data_dir>/dead-letter/<table>.ndjson``::

    {"reason": "...", "code": 16, "token": "...", "event": {...}}

``code`` is the server's error code (0 when there was none). The files are
only appended to; replaying them is up to the operator (the ``event``
objects decode back into :class:`~analytics_buffer.Event`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, final

import anyio
import msgspec

from ._event import Event

__all__ = ("DeadLetter", "DeadLetters")


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """One line of a dead-letter file."""

    reason: str
    code: int
    token: str
    event: Event


_encoder: Final = msgspec.json.Encoder()


@final
class DeadLetters:
    """Appends refused events to the table's dead-letter file.

    :param directory: the ``dead-letter`` folder (created on first use)
    :param table: names the file
    :param on_written: called on the event loop's thread with the events once
        they are in the file, wherever they were dead-lettered from (the
        outbox's log drops them then, so they are not also replayed)
    """

    def __init__(
        self,
        directory: Path,
        table: str,
        *,
        on_written: Callable[[Sequence[Event]], None] | None = None,
    ) -> None:
        self.path = directory / f"{table}.ndjson"
        self.on_written = on_written

    def write_now(self, events: Sequence[Event], *, reason: str, code: int, token: str) -> None:
        """Append ``events`` synchronously (for shutdown paths that cannot wait)."""
        self._append(events, reason=reason, code=code, token=token)
        if self.on_written is not None:
            self.on_written(events)

    async def write(self, events: Sequence[Event], *, reason: str, code: int, token: str) -> None:
        """Append ``events`` from a worker thread, so the event loop does not stall."""
        await anyio.to_thread.run_sync(
            lambda: self._append(events, reason=reason, code=code, token=token)
        )
        if self.on_written is not None:
            self.on_written(events)

    def _append(self, events: Sequence[Event], *, reason: str, code: int, token: str) -> None:
        lines = b"".join(
            _encoder.encode(DeadLetter(reason=reason, code=code, token=token, event=event)) + b"\n"
            for event in events
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as file:
            file.write(lines)
            file.flush()

    def read(self) -> list[DeadLetter]:
        """Return every dead letter in the file (empty when there is none)."""
        if not self.path.exists():
            return []
        decoder = msgspec.json.Decoder(DeadLetter)
        return [decoder.decode(line) for line in self.path.read_bytes().splitlines() if line]
