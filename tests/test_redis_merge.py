"""The Redis store's pure merging: what a claim's ``complete`` writes (no server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from analytics_buffer import Event
from analytics_buffer._redis_merge import (
    ENCODER,
    STORED_DECODER,
    Held,
    Merged,
    changes,
    merge_groups,
)
from analytics_buffer._redis_sessions import session_key
from analytics_buffer._session_store import SessionKey, SessionOutcome

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
KEY: SessionKey = ("p1", "s1")


def test_a_retried_complete_writes_the_same_changes() -> None:
    views = [
        Event(
            name="screen_view",
            project_id="p1",
            profile_id="u1",
            session_id="s1",
            created_at=T0 + timedelta(seconds=at),
        )
        for at in range(3)
    ]
    merged: dict[SessionKey, Merged | None] = {KEY: None}
    (work,) = merge_groups({KEY: ([100.0], views)}, merged, set(), 0.0, session_key)
    held = Held(shard=0, consumed=1, merged=merged, own=[])
    written = [view.id for view in views[:2]]
    outcomes = [SessionOutcome(key=KEY, state=work.state, written=written)]

    first = changes(held, outcomes, session_key)
    again = changes(held, outcomes, session_key)

    assert ENCODER.encode(again) == ENCODER.encode(first)
    name, value = first[0]
    assert name == session_key(KEY)
    stored = STORED_DECODER.decode(_str_body(bytes(value))[1:])  # after the flag byte
    assert stored.written == b"".join(view.id.bytes for view in views[:2])
    assert len(stored.pending) == 1


def _str_body(packed: bytes) -> bytes:
    """The bytes of a msgpack ``str`` (how values travel to Redis's cmsgpack)."""
    header = {0xD9: 2, 0xDA: 3, 0xDB: 5}[packed[0]]
    return packed[header:]
