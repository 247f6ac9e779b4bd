"""The exceptions of analytics-buffer: one root, a few branches.

::

    AnalyticsBufferError
    ├── ConfigError              (also ValueError)
    ├── InvalidEvent             (also ValueError)
    ├── InvalidArgument          (also ValueError)
    ├── BufferFull
    │   └── OutboxFull       (also OutboxError)
    ├── BufferClosed
    ├── OutboxError          (the disk outbox cannot take or keep events)
    ├── StoreUnavailable         (the session/counter store cannot be reached)
    ├── ActorError
    │   ├── ActorDeadError
    │   ├── CallTimeout          (also TimeoutError)
    │   ├── MailboxFull
    │   └── RestartIntensityExceeded
    └── SinkError
        ├── TransientSinkError   (safe to retry with the same batch identity)
        └── PermanentSinkError   (retrying cannot help: the batch is dead-lettered)

Errors raised by the drivers (asynch, chdb, redis) never leave an adapter
unwrapped: the adapter maps them onto this tree with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any

__all__ = (
    "ActorDeadError",
    "ActorError",
    "AnalyticsBufferError",
    "BufferClosed",
    "BufferFull",
    "CallTimeout",
    "ConfigError",
    "InvalidArgument",
    "InvalidEvent",
    "MailboxFull",
    "OutboxError",
    "OutboxFull",
    "PermanentSinkError",
    "RestartIntensityExceeded",
    "SinkError",
    "StoreUnavailable",
    "TransientSinkError",
)


class AnalyticsBufferError(Exception):
    """Raised for every failure of analytics-buffer; the root of the tree."""


class ConfigError(AnalyticsBufferError, ValueError):
    """Raised when a setting is missing, out of range or of the wrong type."""


class InvalidEvent(AnalyticsBufferError, ValueError):
    """Raised when ``track`` is given an event that cannot be accepted.

    :param field: the event field at fault (``"event"`` for the whole event)
    :param problem: what is wrong with it
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"invalid event: {field}: {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self) -> tuple[type[InvalidEvent], tuple[str, str]]:
        return (InvalidEvent, (self.field, self.problem))


class InvalidArgument(AnalyticsBufferError, ValueError):
    """Raised when a read such as ``count`` or ``last_screen_view`` gets an unusable argument."""


class BufferFull(AnalyticsBufferError):
    """Raised when the buffer is at its bound and the overflow policy says to raise."""


class OutboxError(AnalyticsBufferError):
    """Raised when the disk outbox cannot take or keep events (I/O error, failed fsync)."""


class OutboxFull(OutboxError, BufferFull):
    """Raised when the outbox reached ``outbox_max_bytes`` or its disk is full (ENOSPC)."""


class BufferClosed(AnalyticsBufferError):
    """Raised when an event is tracked on a buffer that is not running."""


class StoreUnavailable(AnalyticsBufferError):
    """Raised when the session or counter store (Redis) cannot be reached; safe to retry."""


class ActorError(AnalyticsBufferError):
    """Raised for failures of the actor runtime."""


class ActorDeadError(ActorError):
    """Raised when a message is sent to, or awaited from, an actor that has stopped."""


class CallTimeout(ActorError, TimeoutError):
    """Raised when an actor does not reply to a call within its timeout."""


class MailboxFull(ActorError):
    """Raised when ``cast`` finds an actor's bounded mailbox full."""


class RestartIntensityExceeded(ActorError):
    """Raised when a child crashes more than ``max_restarts`` times in ``max_seconds``."""


class SinkError(AnalyticsBufferError):
    """Raised when a sink fails to store a chunk of events."""


class TransientSinkError(SinkError):
    """Raised when a write failed for a reason that may pass (network, restart, load).

    :param possibly_persisted: ``True`` when the server may have stored the
        chunk before the failure (the connection broke after sending it); a
        retry must then reuse the same deduplication identity.
    """

    def __init__(self, message: str, *, possibly_persisted: bool = False) -> None:
        super().__init__(message)
        self.possibly_persisted = possibly_persisted

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (TransientSinkError, str(self), {"possibly_persisted": self.possibly_persisted}),
        )


class PermanentSinkError(SinkError):
    """Raised when the server refused a chunk for a reason a retry cannot fix.

    :param code: the server's error code (0 when it gave none)
    """

    def __init__(self, message: str, *, code: int = 0) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (PermanentSinkError, str(self), {"code": self.code}))


def _rebuild(cls: type[SinkError], message: str, keywords: dict[str, Any]) -> SinkError:
    return cls(message, **keywords)
