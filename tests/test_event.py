"""Validation at the boundary: ``check_event``, ``decode_event`` and ``track``/``track_json``.

Every rule must refuse bad input with an :class:`InvalidEvent` whose ``field``
names what is wrong, and must leave events already accepted alone. Pure
logic: no server; the one buffer test writes into a ``MemorySink`` on trio
with a virtual clock.
"""

from __future__ import annotations

import math
import os
import pickle
import uuid
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from enum import StrEnum
from pathlib import Path
from typing import Any

import msgspec
import pytest
from trio.testing import MockClock

from analytics_buffer import AnalyticsBuffer, Event, InvalidEvent, Settings
from analytics_buffer._event import check_event, decode_event, new_event_id, utc_now
from memory_sink import MemorySink

MAX = 64 * 1024
"""The default ``max_event_bytes``."""

FIXED_ID = uuid.UUID("2f1e6c1e-3c8a-4d7e-9b1a-0c5d8e7f6a5b")
FIXED_TIME = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)

trio_mock = pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-mock")],
)


def event_with(**changes: Any) -> Event:
    """A valid event with ``changes`` applied, unchecked (a Struct does not validate on init)."""
    fields: dict[str, Any] = {"name": "click", "project_id": "p1", **changes}
    return Event(**fields)


def refused_field(event: object, max_event_bytes: int = MAX) -> str:
    """Run ``check_event``, which must refuse ``event``; return the field it names."""
    with pytest.raises(InvalidEvent) as info:
        check_event(event, max_event_bytes)
    error = info.value
    assert isinstance(error, ValueError)
    assert str(error).startswith(f"invalid event: {error.field}: ")
    assert error.problem
    return error.field


def decode_refused_field(raw: bytes | str, max_event_bytes: int = MAX) -> str:
    """Run ``decode_event``, which must refuse ``raw``; return the field it names."""
    with pytest.raises(InvalidEvent) as info:
        decode_event(raw, max_event_bytes)
    assert info.value.problem
    return info.value.field


class _NoOffset(tzinfo):
    """A tzinfo that does not know its offset: the datetime is effectively naive."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None

    def tzname(self, dt: datetime | None) -> str | None:
        return None


# -- check_event: what is accepted ---------------------------------------------------


def test_a_minimal_event_is_accepted_with_defaults() -> None:
    event = Event(name="signup", project_id="p1")
    checked, size = check_event(event, MAX)
    assert checked == event
    assert checked.profile_id == checked.session_id == checked.path == ""
    assert checked.duration == 0
    assert checked.properties == {}
    assert checked.created_at.tzinfo is not None
    assert size > len("signup") + len("p1")


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"duration": 0}, id="duration-0"),
        pytest.param({"duration": 2**32 - 1}, id="duration-max"),
        pytest.param({"properties": {"s": "", "i": -(2**63), "f": -0.5, "b": True}}, id="props"),
        pytest.param({"properties": {"": "empty key is a string"}}, id="empty-key"),
        pytest.param({"created_at": datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=-7)))}),
        pytest.param({"profile_id": "u", "session_id": "s", "path": "/", "origin": "o"}),
    ],
)
def test_valid_edge_values_are_accepted(changes: dict[str, Any]) -> None:
    event = event_with(**changes)
    checked, _ = check_event(event, MAX)
    assert checked == event


class Plan(StrEnum):
    PRO = "pro"


def test_str_subclasses_are_accepted_in_text_fields_and_property_values() -> None:
    plain = event_with(name="pro", path="pro", properties={"pro": "pro"})
    enum = event_with(name=Plan.PRO, path=Plan.PRO, properties={Plan.PRO: Plan.PRO})
    checked, size = check_event(enum, MAX)
    assert checked == enum
    assert size == check_event(plain, MAX)[1]


# -- check_event: every rule names its field ----------------------------------------


@pytest.mark.parametrize("event", [{"name": "x", "project_id": "p"}, None, "event", b"{}"])
def test_something_other_than_an_event_names_event(event: object) -> None:
    assert refused_field(event) == "event"


@pytest.mark.parametrize("field", ["name", "project_id"])
@pytest.mark.parametrize("value", ["", 1, None, b"x", ["x"]], ids=repr)
def test_required_strings_must_be_non_empty_str(field: str, value: object) -> None:
    assert refused_field(event_with(**{field: value})) == field


@pytest.mark.parametrize("field", ["name", "project_id"])
def test_required_fields_cannot_be_missing_in_python(field: str) -> None:
    # A Struct refuses a missing required field itself; it never reaches check_event.
    fields: dict[str, Any] = {"name": "n", "project_id": "p"}
    del fields[field]
    with pytest.raises(TypeError, match=field):
        Event(**fields)


@pytest.mark.parametrize("field", ["profile_id", "session_id", "path", "origin", "referrer"])
@pytest.mark.parametrize("value", [1, None, b"x", 1.5], ids=repr)
def test_optional_strings_must_be_str(field: str, value: object) -> None:
    assert refused_field(event_with(**{field: value})) == field


@pytest.mark.parametrize("value", [str(FIXED_ID), FIXED_ID.int, FIXED_ID.bytes, None], ids=repr)
def test_id_must_be_a_uuid(value: object) -> None:
    assert refused_field(event_with(id=value)) == "id"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("2024-01-01T00:00:00Z", id="str"),
        pytest.param(1_700_000_000.0, id="float"),
        pytest.param(date(2024, 1, 1), id="date"),
        pytest.param(None, id="None"),
        pytest.param(datetime(2024, 1, 1), id="naive"),
        pytest.param(datetime(2024, 1, 1, tzinfo=_NoOffset()), id="tzinfo-without-offset"),
    ],
)
def test_created_at_must_be_an_aware_datetime(value: object) -> None:
    assert refused_field(event_with(created_at=value)) == "created_at"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC), id="before-1970"),
        pytest.param(datetime(1970, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))), id="tz"),
        pytest.param(datetime(2106, 2, 7, 6, 28, 16, tzinfo=UTC), id="after-2106"),
        pytest.param(datetime(9999, 1, 1, tzinfo=UTC), id="year-9999"),
    ],
)
def test_created_at_outside_what_the_table_holds_is_refused(value: datetime) -> None:
    assert refused_field(event_with(created_at=value)) == "created_at"
    raw = msgspec.json.encode({"name": "n", "project_id": "p", "created_at": value})
    assert decode_refused_field(raw) == "created_at"


@pytest.mark.parametrize(
    "value",
    [
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2106, 2, 7, 6, 28, 15, 999000, tzinfo=UTC),
        datetime(2106, 2, 7, 8, 28, 15, tzinfo=timezone(timedelta(hours=2))),
    ],
    ids=str,
)
def test_created_at_at_the_ends_of_the_range_is_accepted(value: datetime) -> None:
    assert check_event(event_with(created_at=value), MAX)[0].created_at == value


def test_naive_created_at_problem_says_timezone() -> None:
    with pytest.raises(InvalidEvent, match="timezone"):
        check_event(event_with(created_at=datetime(2024, 1, 1)), MAX)


@pytest.mark.parametrize("value", [-1, 2**32, True, 1.0, "5", None], ids=repr)
def test_duration_must_be_an_int_of_milliseconds_in_range(value: object) -> None:
    assert refused_field(event_with(duration=value)) == "duration"


@pytest.mark.parametrize("value", [[], None, "k=v", [("k", "v")]], ids=repr)
def test_properties_must_be_a_dict(value: object) -> None:
    assert refused_field(event_with(properties=value)) == "properties"


@pytest.mark.parametrize("key", [1, None, b"k", ("k",)], ids=repr)
def test_property_keys_must_be_str(key: object) -> None:
    assert refused_field(event_with(properties={"ok": 1, key: "v"})) == "properties"


@pytest.mark.parametrize(
    "value", [[1], {"a": 1}, None, b"v", 1j, ("t",), {1, 2}, datetime.now(UTC)], ids=repr
)
def test_property_values_of_other_types_name_the_key(value: object) -> None:
    assert refused_field(event_with(properties={"ok": 1, "bad": value})) == "properties.bad"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=repr)
def test_non_finite_floats_are_refused(value: float) -> None:
    event = event_with(properties={"ratio": value})
    assert refused_field(event) == "properties.ratio"
    with pytest.raises(InvalidEvent, match="finite"):
        check_event(event, MAX)


def test_the_first_bad_field_is_named() -> None:
    event = event_with(name="", project_id="", duration=-1)
    assert refused_field(event) == "name"


# -- size bound ----------------------------------------------------------------------


def _sized(text: str) -> Event:
    return event_with(id=FIXED_ID, created_at=FIXED_TIME, properties={"text": text})


@pytest.mark.parametrize(
    "char",
    [
        pytest.param("a", id="ascii-1B"),
        pytest.param("é", id="latin-2B"),
        pytest.param("€", id="bmp-3B"),
        pytest.param("😀", id="astral-4B"),
    ],
)
@pytest.mark.parametrize("count", [1, 300, 1000])
def test_event_exactly_at_max_event_bytes_passes_and_one_byte_over_fails(
    char: str, count: int
) -> None:
    base = len(msgspec.json.encode(_sized("")))
    per_char = len(char.encode())
    event = _sized(char * count)
    encoded = len(msgspec.json.encode(event))
    assert encoded == base + per_char * count
    checked, size = check_event(event, encoded)
    assert checked == event
    assert size == encoded
    assert refused_field(event, encoded - 1) == "event"


def test_over_max_event_bytes_problem_gives_the_size() -> None:
    event = _sized("x" * 5000)
    encoded = len(msgspec.json.encode(event))
    with pytest.raises(InvalidEvent, match=f"encodes to {encoded} bytes, over max_event_bytes"):
        check_event(event, 4096)


def test_many_small_properties_over_the_bound_are_refused() -> None:
    event = event_with(properties={f"k{i}": i for i in range(3000)})
    encoded = len(msgspec.json.encode(event))
    assert refused_field(event, encoded - 1) == "event"
    assert check_event(event, encoded)[0] == event


def test_control_characters_count_at_their_escaped_size() -> None:
    # Fixed bug (_event.py:154): the cheap estimate assumes at most 4 bytes a
    # character, but JSON escapes a control character as 6 bytes (\u0001), so
    # this event (about 96 KB encoded) passes a 64 KiB bound.
    event = _sized("\x01" * 16_000)
    encoded = len(msgspec.json.encode(event))
    assert encoded > MAX
    assert decode_refused_field(msgspec.json.encode(event)) == "event"  # the JSON path refuses it
    assert refused_field(event) == "event"


def test_decode_refuses_json_over_the_bound_before_parsing() -> None:
    raw = b'{"name": "n", "project_id": "p", "path": "' + b"x" * 200 + b'"}'
    assert decode_refused_field(raw, 100) == "event"
    assert decode_event(raw, len(raw) + 200)[0].path == "x" * 200


# -- created_at: milliseconds --------------------------------------------------------


def test_created_at_is_truncated_to_the_millisecond() -> None:
    event = event_with(created_at=datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC))
    checked, _ = check_event(event, MAX)
    assert checked.created_at == datetime(2024, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)
    assert checked.created_at.microsecond == 123000
    assert msgspec.structs.replace(checked, created_at=event.created_at) == event


def test_truncation_keeps_the_timezone() -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    event = event_with(created_at=datetime(2024, 1, 2, 3, 4, 5, 999999, tzinfo=ist))
    checked, _ = check_event(event, MAX)
    assert checked.created_at.utcoffset() == timedelta(hours=5, minutes=30)
    assert checked.created_at == datetime(2024, 1, 2, 3, 4, 5, 999000, tzinfo=ist)


@pytest.mark.parametrize("microsecond", [0, 1000, 123000, 999000])
def test_whole_milliseconds_are_kept(microsecond: int) -> None:
    created_at = datetime(2024, 1, 2, 3, 4, 5, microsecond, tzinfo=UTC)
    checked, _ = check_event(event_with(created_at=created_at), MAX)
    assert checked.created_at == created_at
    assert checked.created_at.microsecond == microsecond


def test_default_created_at_is_aware_and_whole_milliseconds() -> None:
    for _ in range(100):
        now = utc_now()
        assert now.tzinfo is UTC
        assert now.microsecond % 1000 == 0
    assert Event(name="n", project_id="p").created_at.microsecond % 1000 == 0


def test_decoded_created_at_is_truncated_too() -> None:
    raw = b'{"name": "n", "project_id": "p", "created_at": "2024-01-02T03:04:05.123456+02:00"}'
    event, _ = decode_event(raw, MAX)
    assert event.created_at == datetime(
        2024, 1, 2, 3, 4, 5, 123000, tzinfo=timezone(timedelta(hours=2))
    )


# -- ids -----------------------------------------------------------------------------


def _assert_uuid4(value: uuid.UUID) -> None:
    assert type(value) is uuid.UUID
    assert value.version == 4
    assert value.variant == uuid.RFC_4122
    assert uuid.UUID(str(value)) == value
    assert uuid.UUID(int=value.int) == value
    assert hash(uuid.UUID(str(value))) == hash(value)


def test_ids_are_unique_valid_version_4_uuids() -> None:
    ids = [new_event_id() for _ in range(5000)]  # several pools of 512
    assert len(set(ids)) == len(ids)
    for value in ids:
        _assert_uuid4(value)
    # Not all bits the same: the random part really varies in every position.
    varying = 0
    for value in ids[:64]:
        varying |= value.int ^ ids[0].int
    assert varying | (0xF000 << 64) | (0xC000 << 48) == (1 << 128) - 1


def test_default_event_ids_are_unique_and_round_trip() -> None:
    events = [Event(name="n", project_id="p") for _ in range(1000)]
    assert len({event.id for event in events}) == len(events)
    for event in events[:50]:
        _assert_uuid4(event.id)
        assert pickle.loads(pickle.dumps(event.id)) == event.id
        assert msgspec.json.decode(msgspec.json.encode(event), type=Event) == event


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_ids_drawn_in_a_forked_child_differ_from_the_parents() -> None:
    count = 256  # fewer than one pool: without the reset the child repeats the parent
    before = new_event_id()  # the pool is now filled in the parent
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read_fd)
            payload = memoryview(
                b"".join(Event(name="n", project_id="p").id.bytes for _ in range(count))
            )
            while payload:
                payload = payload[os.write(write_fd, payload) :]
            os.close(write_fd)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    parent_ids = [new_event_id() for _ in range(count)]
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(data) == 16 * count
    child_ids = [uuid.UUID(bytes=data[i : i + 16]) for i in range(0, len(data), 16)]
    assert len(set(child_ids)) == count
    assert set(child_ids).isdisjoint(parent_ids)
    assert before not in child_ids
    for value in child_ids:
        _assert_uuid4(value)


# -- decode_event (track_json) -------------------------------------------------------


def test_good_json_decodes_to_the_same_event() -> None:
    event = event_with(
        id=FIXED_ID,
        created_at=FIXED_TIME,
        profile_id="u1",
        path="/home",
        duration=1500,
        properties={"plan": "pro", "seats": 3, "ratio": 0.25, "trial": False},
    )
    decoded, size = decode_event(msgspec.json.encode(event), MAX)
    assert decoded == event
    assert size > 0
    decoded_str, _ = decode_event(msgspec.json.encode(event).decode(), MAX)
    assert decoded_str == event


def test_json_without_id_or_created_at_gets_fresh_ones() -> None:
    first, _ = decode_event(b'{"name": "n", "project_id": "p"}', MAX)
    second, _ = decode_event(b'{"name": "n", "project_id": "p"}', MAX)
    assert first.id != second.id
    _assert_uuid4(first.id)
    assert first.created_at.tzinfo is not None


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        pytest.param(b'{"name": 1, "project_id": "p"}', "name", id="name-int"),
        pytest.param(b'{"name": "", "project_id": "p"}', "name", id="name-empty"),
        pytest.param(b'{"name": null, "project_id": "p"}', "name", id="name-null"),
        pytest.param(b'{"name": "n", "project_id": ["p"]}', "project_id", id="project-list"),
        pytest.param(b'{"name": "n", "project_id": "p", "profile_id": 7}', "profile_id"),
        pytest.param(b'{"name": "n", "project_id": "p", "referrer": {}}', "referrer"),
        pytest.param(b'{"name": "n", "project_id": "p", "id": "nope"}', "id", id="id"),
        pytest.param(b'{"name": "n", "project_id": "p", "duration": -1}', "duration"),
        pytest.param(b'{"name": "n", "project_id": "p", "duration": true}', "duration"),
        pytest.param(b'{"name": "n", "project_id": "p", "duration": 4294967296}', "duration"),
        pytest.param(b'{"name": "n", "project_id": "p", "properties": []}', "properties"),
        pytest.param(b'{"name": "n", "project_id": "p", "properties": {"k": null}}', "properties"),
        pytest.param(b'{"name": "n", "project_id": "p", "properties": {"k": [1]}}', "properties"),
        pytest.param(b'{"name": "n", "project_id": "p", "properties": {"k": 1e999}}', "properties"),
        pytest.param(
            b'{"name": "n", "project_id": "p", "created_at": "2024-01-01T00:00:00"}',
            "created_at",
            id="naive-datetime",
        ),
        pytest.param(
            b'{"name": "n", "project_id": "p", "created_at": "yesterday"}',
            "created_at",
            id="not-a-datetime",
        ),
    ],
)
def test_bad_json_fields_are_named(raw: bytes, field: str) -> None:
    assert decode_refused_field(raw) == field


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"not json", b'{"name": "n",}', b"[1, 2]", b"null", b'"event"']
)
def test_invalid_json_names_event(raw: bytes) -> None:
    assert decode_refused_field(raw) == "event"


def test_invalid_json_problem_says_so() -> None:
    with pytest.raises(InvalidEvent, match="not valid JSON"):
        decode_event(b'{"name": ', MAX)


@pytest.mark.parametrize("field", ["name", "project_id"])
def test_missing_required_json_field_is_named(field: str) -> None:
    # Fixed bug (_event.py:179-180): msgspec says "Object missing required field
    # `name`" with no "- at `$.name`" path, so the field falls back to "event".
    fields = {"name": "n", "project_id": "p"}
    del fields[field]
    assert decode_refused_field(msgspec.json.encode(fields)) == field


# -- track / track_json on a running buffer -----------------------------------------


@pytest.mark.anyio
@trio_mock
async def test_track_of_a_bad_event_raises_counts_rejected_and_spares_the_others(
    tmp_path: Path,
) -> None:
    sink = MemorySink()
    good = [event_with(name=f"e{i}", created_at=FIXED_TIME) for i in range(6)]
    async with AnalyticsBuffer(Settings(data_dir=str(tmp_path)), sink=sink) as buffer:
        for event in good[:3]:
            assert buffer.track(event) is True
        with pytest.raises(InvalidEvent) as info:
            buffer.track(event_with(name=""))
        assert info.value.field == "name"
        with pytest.raises(InvalidEvent) as info:
            buffer.track(event_with(properties={"bad": None}))
        assert info.value.field == "properties.bad"
        with pytest.raises(InvalidEvent) as info:
            buffer.track_json(b'{"name": 1, "project_id": "p"}')
        assert info.value.field == "name"
        with pytest.raises(InvalidEvent) as info:
            buffer.track_json(b"{not json")
        assert info.value.field == "event"
        assert buffer.track_json(msgspec.json.encode(good[3])) is True
        for event in good[4:]:
            assert buffer.track(event) is True
        stats = buffer.stats()
        assert stats.rejected == 4
        assert stats.accepted == len(good)
        await buffer.flush()
        assert sink.rows == good
    stats = buffer.stats()
    assert (stats.written, stats.dead_lettered, stats.buffered, stats.rejected) == (6, 0, 0, 4)
    assert sink.rows == good
    assert not (tmp_path / "dead-letter").exists()
