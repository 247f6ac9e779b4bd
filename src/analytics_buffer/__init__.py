"""analytics-buffer: track analytics events in an asyncio service; supervised
actors batch them into ClickHouse."""

from contextlib import suppress as _suppress

from ._actor import Actor as Actor
from ._actor import ActorRef as ActorRef
from ._actor import Reply as Reply
from ._actor import Timer as Timer
from ._client import AnalyticsBuffer as AnalyticsBuffer
from ._deadletter import DeadLetter as DeadLetter
from ._event import Event as Event
from ._event import PropertyValue as PropertyValue
from ._exceptions import ActorDeadError as ActorDeadError
from ._exceptions import ActorError as ActorError
from ._exceptions import AnalyticsBufferError as AnalyticsBufferError
from ._exceptions import BufferClosed as BufferClosed
from ._exceptions import BufferFull as BufferFull
from ._exceptions import CallTimeout as CallTimeout
from ._exceptions import ConfigError as ConfigError
from ._exceptions import InvalidArgument as InvalidArgument
from ._exceptions import InvalidEvent as InvalidEvent
from ._exceptions import MailboxFull as MailboxFull
from ._exceptions import OutboxError as OutboxError
from ._exceptions import OutboxFull as OutboxFull
from ._exceptions import PermanentSinkError as PermanentSinkError
from ._exceptions import RestartIntensityExceeded as RestartIntensityExceeded
from ._exceptions import SinkError as SinkError
from ._exceptions import StoreUnavailable as StoreUnavailable
from ._exceptions import TransientSinkError as TransientSinkError
from ._mailbox import Mailbox as Mailbox
from ._mailbox import MailboxStatistics as MailboxStatistics
from ._settings import Durability as Durability
from ._settings import Overflow as Overflow
from ._settings import Settings as Settings
from ._sink import Sink as Sink
from ._stats import Stats as Stats
from ._supervisor import ChildSpec as ChildSpec
from ._supervisor import Restart as Restart
from ._supervisor import Supervisor as Supervisor
from ._writer import FlushReport as FlushReport

__all__ = (
    "Actor",
    "ActorDeadError",
    "ActorError",
    "ActorRef",
    "AnalyticsBuffer",
    "AnalyticsBufferError",
    "BufferClosed",
    "BufferFull",
    "CallTimeout",
    "ChildSpec",
    "ConfigError",
    "DeadLetter",
    "Durability",
    "Event",
    "FlushReport",
    "InvalidArgument",
    "InvalidEvent",
    "Mailbox",
    "MailboxFull",
    "MailboxStatistics",
    "OutboxError",
    "OutboxFull",
    "Overflow",
    "PermanentSinkError",
    "PropertyValue",
    "Reply",
    "Restart",
    "RestartIntensityExceeded",
    "Settings",
    "Sink",
    "SinkError",
    "Stats",
    "StoreUnavailable",
    "Supervisor",
    "Timer",
    "TransientSinkError",
)

# Show the public names as analytics_buffer.X in reprs, tracebacks and docs.
for _name in __all__:
    _value = globals()[_name]
    if getattr(_value, "__module__", "").startswith("analytics_buffer._"):
        with _suppress(AttributeError, TypeError):
            _value.__module__ = __name__
del _name, _value
