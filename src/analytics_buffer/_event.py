"""The ``Event`` struct and its validation at the boundary.

``track`` validates an ``Event`` built in Python with :func:`check_event`
(plain type checks, no re-encoding); ``track_json`` decodes bytes with one
reused :class:`msgspec.json.Decoder` whose type constraints do the same
checks, then runs :func:`check_event` for what a type cannot say.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final, NoReturn

import msgspec

from ._exceptions import InvalidEvent

__all__ = ("Event", "PropertyValue", "check_event", "decode_event", "new_event_id", "utc_now")

PropertyValue = str | int | float | bool

_MAX_DURATION_MS: Final = 2**32 - 1
EARLIEST_CREATED_AT: Final = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_CREATED_AT: Final = datetime(2106, 2, 7, 6, 28, 15, 999000, tzinfo=UTC)
"""The range every supported column type holds (ClickHouse ``DateTime`` is
the narrowest), so an event the table cannot store is refused at ``track``."""
_FIXED_EVENT_BYTES: Final = 160
"""Encoded size of an event's id, timestamps, numbers and JSON punctuation."""


class _IdSource:
    """Random version-4 UUIDs drawn from one ``os.urandom`` call per 512 ids.

    ``uuid.uuid4()`` makes a system call per id (about 3 us here), which is
    more than the whole ``track`` budget; this amortises it. The pool is
    dropped in a forked child so two processes never share ids.
    """

    _BATCH: Final = 512

    def __init__(self) -> None:
        self._pool = b""
        self._offset = 0
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._pool = b""
        self._offset = 0

    def __call__(self) -> uuid.UUID:
        offset = self._offset
        if offset >= len(self._pool):
            self._pool = os.urandom(16 * self._BATCH)
            offset = 0
        self._offset = offset + 16
        value = int.from_bytes(self._pool[offset : offset + 16])
        # Set the version (4) and RFC 4122 variant bits, as uuid.uuid4 does.
        value = (value & ~(0xF000 << 64) & ~(0xC000 << 48)) | (0x4000 << 64) | (0x8000 << 48)
        event_id = object.__new__(uuid.UUID)
        object.__setattr__(event_id, "int", value)
        object.__setattr__(event_id, "is_safe", uuid.SafeUUID.unknown)
        return event_id


new_event_id: Final = _IdSource()


def utc_now() -> datetime:
    """Return the current UTC time, truncated to the millisecond."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond - now.microsecond % 1000)


class Event(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One analytics event.

    Only ``name`` and ``project_id`` are required. ``created_at`` must be
    timezone-aware and between 1970 and 2106 (what every supported column
    type holds); it is kept to the millisecond end to end (finer parts are
    truncated when the event is accepted). ``duration`` is in
    milliseconds, 0 when unknown. Property values are ``str``, ``int``,
    ``float`` or ``bool``; ClickHouse stores them as strings.

    Events are not tracked by the cyclic garbage collector (``gc=False``):
    they never form reference cycles, and a buffer holding hundreds of
    thousands of them would otherwise make every full collection long.
    """

    name: Annotated[str, msgspec.Meta(min_length=1)]
    project_id: Annotated[str, msgspec.Meta(min_length=1)]
    id: uuid.UUID = msgspec.field(default_factory=new_event_id)
    profile_id: str = ""
    session_id: str = ""
    created_at: Annotated[datetime, msgspec.Meta(tz=True)] = msgspec.field(default_factory=utc_now)
    path: str = ""
    origin: str = ""
    referrer: str = ""
    duration: Annotated[int, msgspec.Meta(ge=0, le=_MAX_DURATION_MS)] = 0
    properties: dict[str, PropertyValue] = msgspec.field(default_factory=dict)


_UUID: Final = uuid.UUID
_join: Final = "".join
_TEXT_FIELDS: Final = ("profile_id", "session_id", "path", "origin", "referrer")
_decoder: Final = msgspec.json.Decoder(Event)
_encoder: Final = msgspec.json.Encoder()
_PATH_IN_MESSAGE: Final = re.compile(r" - at `\$\.([A-Za-z_]+)|missing required field `(\w+)`")


def check_event(event: object, max_event_bytes: int) -> tuple[Event, int]:
    """Validate an event and return it (normalised) with its estimated size.

    The size is the length of its strings plus a fixed overhead: cheap, and
    close to the JSON size for ASCII text. Only when the estimate could
    exceed ``max_event_bytes`` is the exact encoded size computed. Text
    fields, property keys and values may be subclasses of ``str`` (a ``StrEnum``
    member, say); the other types are checked exactly.

    :raises InvalidEvent: naming the first field at fault
    """
    if type(event) is not Event:
        raise InvalidEvent("event", f"expected an Event, got {type(event).__name__}")
    name, project_id = event.name, event.project_id
    try:
        # One join type-checks the seven text fields and sums their lengths, in C.
        size = _FIXED_EVENT_BYTES + len(
            _join(
                (
                    name,
                    project_id,
                    event.profile_id,
                    event.session_id,
                    event.path,
                    event.origin,
                    event.referrer,
                )
            )
        )
    except TypeError:
        _raise_text_field(event)
    if not name or not project_id:
        _raise_text_field(event)
    if type(event.id) is not _UUID:
        raise InvalidEvent("id", f"must be a uuid.UUID, got {type(event.id).__name__}")
    created_at = event.created_at
    if type(created_at) is not datetime:
        raise InvalidEvent("created_at", f"must be a datetime, got {type(created_at).__name__}")
    tzinfo = created_at.tzinfo
    if tzinfo is None or (tzinfo is not UTC and created_at.utcoffset() is None):
        raise InvalidEvent("created_at", "must be timezone-aware (naive datetimes are ambiguous)")
    if not EARLIEST_CREATED_AT <= created_at <= LATEST_CREATED_AT:
        raise InvalidEvent(
            "created_at", f"must lie in [{EARLIEST_CREATED_AT}, {LATEST_CREATED_AT}]"
        )
    duration = event.duration
    if type(duration) is not int or not 0 <= duration <= _MAX_DURATION_MS:
        raise InvalidEvent("duration", f"must be an int of milliseconds in [0, {_MAX_DURATION_MS}]")
    properties: dict[Any, Any] = event.properties  # exact types are checked below
    if type(properties) is not dict:
        raise InvalidEvent("properties", f"must be a dict, got {type(properties).__name__}")
    for key, value in properties.items():
        if type(key) is not str and not isinstance(key, str):
            raise InvalidEvent("properties", f"keys must be strings, got {type(key).__name__}")
        kind = type(value)
        if kind is str:
            size += len(key) + len(value) + 6
        elif kind is int or kind is bool or (kind is float and math.isfinite(value)):
            size += len(key) + 26
        elif isinstance(value, str):  # a subclass of str (a StrEnum member, say)
            size += len(key) + len(value) + 6
        else:
            _raise_property_value(key, value)
    if size * 6 > max_event_bytes:
        # A character can take up to six bytes of JSON (\u0001): measure exactly.
        size = len(_encoder.encode(event))
        if size > max_event_bytes:
            raise InvalidEvent("event", f"encodes to {size} bytes, over max_event_bytes")
    if created_at.microsecond % 1000:
        created_at = created_at.replace(
            microsecond=created_at.microsecond - created_at.microsecond % 1000
        )
        event = msgspec.structs.replace(event, created_at=created_at)
    return event, size


def _raise_text_field(event: Event) -> NoReturn:
    for field in ("name", "project_id"):
        value = getattr(event, field)
        if not isinstance(value, str) or not value:
            raise InvalidEvent(field, "must be a non-empty string")
    for field in _TEXT_FIELDS:
        value = getattr(event, field)
        if not isinstance(value, str):
            raise InvalidEvent(field, f"must be a string, got {type(value).__name__}")
    raise AssertionError("called for an event whose text fields are fine")


def _raise_property_value(key: str, value: object) -> NoReturn:
    if type(value) is float:
        raise InvalidEvent(f"properties.{key}", "must be a finite number")
    raise InvalidEvent(
        f"properties.{key}", f"must be str, int, float or bool, got {type(value).__name__}"
    )


def decode_event(
    raw: bytes | bytearray | memoryview | str, max_event_bytes: int
) -> tuple[Event, int]:
    """Decode one JSON event, as an HTTP handler received it, and validate it.

    :raises InvalidEvent: naming the field at fault
    """
    if len(raw) > max_event_bytes:
        raise InvalidEvent("event", f"{len(raw)} bytes of JSON, over max_event_bytes")
    try:
        event = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        found = _PATH_IN_MESSAGE.search(str(exc))
        field = (found.group(1) or found.group(2)) if found else "event"
        raise InvalidEvent(field, str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise InvalidEvent("event", f"not valid JSON: {exc}") from exc
    return check_event(event, max_event_bytes)
