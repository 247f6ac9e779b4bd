"""``Settings``: every knob of the buffer, with its default, in one typed struct."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Final, Literal

import msgspec

from ._exceptions import ConfigError

__all__ = ("ENV_PREFIX", "Durability", "Overflow", "Settings")

ENV_PREFIX: Final = "ANALYTICS_BUFFER_"
_FIELD_IN_MESSAGE: Final = re.compile(r"`\$\.(\w+)`|^(\w+):")

Overflow = Literal["drop_newest", "block", "raise"]
Durability = Literal["memory", "wal"]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Configuration of an :class:`~analytics_buffer.AnalyticsBuffer`.

    Every field can also come from an environment variable named
    ``ANALYTICS_BUFFER_<FIELD>`` (upper case) through :meth:`from_env`; an
    empty value there means ``None`` for the fields that accept it.
    Sizes are in events or bytes, durations in seconds.
    """

    clickhouse_url: str | None = None
    """``clickhouse://user:password@host:port/database``; ``None`` selects the
    embedded engine (chdb, the ``embedded`` extra) storing under ``data_dir``."""
    data_dir: str = "analytics-buffer-data"
    """Directory for the embedded engine's data and the dead-letter files."""
    table: str = "events"
    """Table the events are written to (see ``analytics-buffer schema``)."""

    flush_interval: float = 5.0
    """A batch is flushed at the latest this long after the previous flush."""
    max_batch_events: int = 20_000
    """A batch is flushed as soon as it holds this many events."""
    max_batch_bytes: int = 16 * 1024 * 1024
    """... or this many (estimated) bytes."""

    max_buffered_events: int = 200_000
    """Bound on events accepted but not yet written, wherever they are."""
    max_buffered_bytes: int = 128 * 1024 * 1024
    """Bound on their estimated encoded size."""
    max_event_bytes: int = 64 * 1024
    """Larger events are refused with ``InvalidEvent``."""
    overflow: Overflow = "drop_newest"
    """What ``track`` does at the bound: ``drop_newest`` returns ``False`` and
    counts the event as dropped; ``raise`` raises ``BufferFull``; ``block``
    also raises ``BufferFull`` from ``track`` (a sync call cannot wait) and is
    the hint that callers use ``await put(event)``, which always waits."""
    put_timeout: float = 5.0
    """How long ``put`` waits for room before raising ``BufferFull``."""
    shutdown_timeout: float = 10.0
    """Bound on the best-effort flush when the buffer stops."""

    insert_chunk_rows: int = 20_000
    """Rows per INSERT, the unit that is retried, deduplicated and
    dead-lettered; each INSERT makes one part on the server, so small ones
    cost it dearly (the default sends a full batch as one INSERT)."""
    insert_block_rows: int = 500
    """Rows serialised at a time within an INSERT; the writer yields to the
    event loop between blocks, so a smaller block means a shorter stall."""
    pool_size: int = 2
    """Connections kept to ClickHouse."""
    connect_timeout: float = 5.0
    """Bound on opening one connection."""
    insert_timeout: float = 30.0
    """Bound on one INSERT attempt; past it the attempt counts as a transient failure."""
    retry_attempts: int = 8
    """Attempts per chunk for transient failures before the batch is dead-lettered."""
    retry_initial_backoff: float = 0.1
    """First backoff between attempts; it doubles up to ``retry_max_backoff``, with jitter."""
    retry_max_backoff: float = 5.0
    """Longest backoff between attempts."""

    redis_url: str | None = None
    """``redis://host:port/db`` for session state shared by many instances;
    ``None`` keeps it in this process's memory."""
    redis_prefix: str = "ab"
    """Prefix of every Redis key (inside the hash tag)."""
    session_timeout: float = 1800.0
    """A session with no new event for this long is ended."""
    session_interval: float = 1.0
    """How often sessions are settled (paired, ended) and written."""
    session_lease: float = 30.0
    """How long a claim on a shard of sessions lasts before another
    instance may take it over (when its holder died)."""
    session_shards: int = 16
    """Sessions are spread over this many shards, each claimed as a unit."""
    session_retention: float = 86_400.0
    """Ended sessions (and their Redis keys) are kept this long, so late
    events are recognised; then they are cleaned up."""

    live_window: float = 300.0
    """A profile counts as a live visitor of its project for this long after
    the ``created_at`` of its latest event."""
    counter_tick: float = 1.0
    """How often counted events are written to the counter store (one round
    trip to Redis per tick, whatever the number of events)."""
    rollup_interval: float = 60.0
    """How often the counters are rolled up into ClickHouse."""
    counter_retention: float = 604_800.0
    """Counters not yet rolled up live this long in Redis after their last
    write (keep it far above any ClickHouse outage you expect)."""
    max_counter_keys: int = 100_000
    """Counters and visitors held in memory (while Redis is unreachable)
    past which the counters are rolled up from memory straight into ClickHouse."""

    durability: Durability = "memory"
    """``memory``: events are held in memory until written; a batch whose
    retries run out for a transient reason goes to the disk outbox
    (``<data_dir>/outbox``) and is replayed. ``wal``: in addition, every
    accepted event is in the outbox's log before ``track``/``put`` returns,
    so a killed process loses nothing it accepted (see the README's
    guarantees table)."""
    fsync_interval: float = 0.1
    """``wal``: the longest time between fsyncs of the log (a power loss
    takes at most this window)."""
    fsync_batch: int = 10_000
    """``wal``: fsync as soon as this many records are not yet synced."""
    outbox_max_bytes: int = 1024 * 1024 * 1024
    """Cap on the outbox's files on disk; at the cap the ``overflow`` policy applies."""
    outbox_segment_bytes: int = 16 * 1024 * 1024
    """The active log segment is sealed at this size (and preallocated to it)."""
    outbox_segment_age: float = 10.0
    """... or once it is this old and holds a record."""

    max_restarts: int = 3
    """A child may crash this often within ``max_seconds`` before the supervisor gives up."""
    max_seconds: float = 5.0
    """The sliding window of ``max_restarts``."""

    def __post_init__(self) -> None:
        for field in msgspec.structs.fields(self):
            try:
                msgspec.convert(getattr(self, field.name), field.type)
            except msgspec.ValidationError as exc:
                raise ConfigError(f"{field.name}: {exc}") from None
        for name in (
            "max_batch_events",
            "max_batch_bytes",
            "max_buffered_events",
            "max_buffered_bytes",
            "max_event_bytes",
            "insert_chunk_rows",
            "insert_block_rows",
            "pool_size",
            "retry_attempts",
            "session_shards",
            "fsync_batch",
            "outbox_max_bytes",
            "outbox_segment_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in (
            "flush_interval",
            "put_timeout",
            "shutdown_timeout",
            "connect_timeout",
            "insert_timeout",
            "max_seconds",
            "session_timeout",
            "session_interval",
            "session_lease",
            "session_retention",
            "fsync_interval",
            "outbox_segment_age",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("live_window", "counter_tick", "rollup_interval", "counter_retention"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_counter_keys < 1:
            raise ConfigError(f"max_counter_keys must be at least 1, got {self.max_counter_keys}")
        if self.retry_initial_backoff < 0 or self.retry_max_backoff < self.retry_initial_backoff:
            raise ConfigError("need 0 <= retry_initial_backoff <= retry_max_backoff")
        if self.max_restarts < 0:
            raise ConfigError(f"max_restarts must not be negative, got {self.max_restarts}")
        if self.overflow not in ("drop_newest", "block", "raise"):
            raise ConfigError(
                f"overflow must be 'drop_newest', 'block' or 'raise', got {self.overflow!r}"
            )
        if self.durability not in ("memory", "wal"):
            raise ConfigError(f"durability must be 'memory' or 'wal', got {self.durability!r}")
        if self.outbox_segment_bytes > self.outbox_max_bytes:
            raise ConfigError("outbox_segment_bytes must not exceed outbox_max_bytes")
        if self.max_batch_events > self.max_buffered_events:
            raise ConfigError("max_batch_events must not exceed max_buffered_events")
        if self.max_event_bytes > self.max_buffered_bytes:
            raise ConfigError("max_event_bytes must not exceed max_buffered_bytes")
        if not self.table.replace("_", "").isalnum():
            raise ConfigError(f"table must be a plain identifier, got {self.table!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``ANALYTICS_BUFFER_*`` variables, then ``overrides``.

        :raises ConfigError: naming the variable that does not parse
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in msgspec.structs.fields(cls):
            raw = environ.get(ENV_PREFIX + field.name.upper())
            if raw is None:
                continue
            values[field.name] = None if raw == "" and _accepts_none(field.type) else raw
        values.update(overrides)
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            found = _FIELD_IN_MESSAGE.search(str(exc))
            name = (found.group(1) or found.group(2)) if found else "*"
            source = f"{ENV_PREFIX}{name.upper()}"
            raise ConfigError(f"{source}: {exc}") from exc

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied (and validated)."""
        return msgspec.structs.replace(self, **changes)


def _accepts_none(annotation: object) -> bool:
    return "None" in str(annotation)
