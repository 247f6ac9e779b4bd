"""Pure tests of the schema layer: versions, capabilities, DDL, error codes and row plans."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from analytics_buffer import (
    ConfigError,
    Event,
    PermanentSinkError,
    PropertyValue,
    TransientSinkError,
)
from analytics_buffer._clickhouse_codes import PERMANENT_CODES, code_in_message, error_for_code
from analytics_buffer._rows import Column, plan_rows, stringify_properties
from analytics_buffer._schema import Capabilities, ServerVersion, events_ddl

OLD = Capabilities.for_version("18.16.1")
MODERN = Capabilities.for_version("26.9.2.1")


def describe(ddl: str) -> list[Column]:
    """The columns ``DESCRIBE TABLE`` lists for a table created by ``ddl``."""
    columns = []
    for name, column_type in re.findall(r"^    `(\w+)` (.+?),?$", ddl, re.MULTILINE):
        if column_type.startswith("Nested("):
            columns += [
                Column(f"{name}.key", "Array(String)"),
                Column(f"{name}.value", "Array(String)"),
            ]
        else:
            columns.append(Column(name, column_type))
    return columns


# -- versions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("18.16.1", (18, 16, 1, 0)),
        ("26.9.2.1", (26, 9, 2, 1)),
        ("22.2", (22, 2, 0, 0)),
        (" 21.8.10.19-lts", (21, 8, 10, 19)),
    ],
)
def test_version_parses(text: str, expected: tuple[int, int, int, int]) -> None:
    assert ServerVersion.parse(text) == expected


def test_versions_compare_numerically() -> None:
    versions = [
        ServerVersion.parse(v) for v in ("26.9.2.1", "18.16.1", "21.11.1", "21.8.15", "9.1")
    ]
    assert [str(v) for v in sorted(versions)] == [
        "9.1.0",
        "18.16.1",
        "21.8.15",
        "21.11.1",
        "26.9.2.1",
    ]
    assert ServerVersion.parse("21.10") < (21, 11) <= ServerVersion.parse("21.11.0.1")


@pytest.mark.parametrize("text", ["", "x", "version 21", "21"])
def test_bad_version_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="cannot parse"):
        ServerVersion.parse(text)


# -- capabilities -------------------------------------------------------------------

CAPABILITY_SINCE = {
    "has_low_cardinality": (19, 3),
    "has_datetime64": (20, 1),
    "has_non_replicated_dedup_window": (21, 5),
    "has_map": (21, 8),
    "has_async_insert": (21, 11),
    "has_dedup_token": (22, 2),
}


@pytest.mark.parametrize(("capability", "since"), CAPABILITY_SINCE.items())
def test_capability_starts_at_its_version(capability: str, since: tuple[int, int]) -> None:
    major, minor = since
    before = ServerVersion(major, minor - 1, 99)
    assert getattr(Capabilities.for_version(before), capability) is False
    assert getattr(Capabilities.for_version(ServerVersion(major, minor)), capability) is True


def test_debian_1816_has_none_and_chdb_has_all() -> None:
    assert not any(getattr(OLD, name) for name in CAPABILITY_SINCE)
    assert all(getattr(MODERN, name) for name in CAPABILITY_SINCE)
    assert OLD.version == (18, 16, 1, 0)


def test_insert_settings_follow_the_version() -> None:
    assert OLD.insert_settings("tok") == {"insert_deduplicate": 1}
    assert MODERN.insert_settings("tok") == {
        "insert_deduplicate": 1,
        "insert_deduplication_token": "tok",
        "async_insert": 0,
    }
    between = Capabilities.for_version("21.12.1")  # async_insert, no token yet
    assert between.insert_settings("tok") == {"insert_deduplicate": 1, "async_insert": 0}


# -- DDL ----------------------------------------------------------------------------


def test_modern_ddl() -> None:
    ddl = events_ddl("events", MODERN)
    assert ddl.startswith("CREATE TABLE IF NOT EXISTS `events`\n")
    assert describe(ddl) == [
        Column("id", "UUID"),
        Column("name", "LowCardinality(String)"),
        Column("project_id", "LowCardinality(String)"),
        Column("profile_id", "String"),
        Column("session_id", "String"),
        Column("created_at", "DateTime64(3, 'UTC')"),
        Column("path", "String"),
        Column("origin", "String"),
        Column("referrer", "String"),
        Column("duration", "UInt32"),
        Column("properties", "Map(String, String)"),
    ]
    assert "ENGINE = ReplacingMergeTree()" in ddl
    assert "PARTITION BY toYYYYMM(created_at)" in ddl
    assert "ORDER BY (project_id, name, created_at, id)" in ddl
    assert ddl.endswith("SETTINGS non_replicated_deduplication_window = 1000")


def test_1816_ddl_keeps_milliseconds_and_properties_in_old_types() -> None:
    ddl = events_ddl("t1", OLD)
    columns = {column.name: column.type for column in describe(ddl)}
    assert columns["created_at"] == "DateTime('UTC')"
    assert columns["created_at_ms"] == "UInt16"
    assert columns["properties.key"] == columns["properties.value"] == "Array(String)"
    assert columns["name"] == columns["project_id"] == "String"
    assert "LowCardinality" not in ddl
    assert "Map(" not in ddl
    assert "DateTime64" not in ddl
    assert "SETTINGS" not in ddl
    assert "ORDER BY (project_id, name, created_at, created_at_ms, id)" in ddl
    assert "ENGINE = ReplacingMergeTree()" in ddl


def test_ddl_columns_are_the_event_fields() -> None:
    fields = set(Event.__struct_fields__)
    assert {c.name for c in describe(events_ddl("e", MODERN))} == fields
    old = {c.name.split(".")[0] for c in describe(events_ddl("e", OLD))}
    assert old == fields | {"created_at_ms"}


# -- error codes --------------------------------------------------------------------


@pytest.mark.parametrize("code", [16, 53, 60, 6, 27, 62, 81, 516])
def test_schema_and_type_codes_are_permanent(code: int) -> None:
    error = error_for_code(code, "refused")
    assert isinstance(error, PermanentSinkError)
    assert error.code == code


@pytest.mark.parametrize(
    ("code", "possibly_persisted"),
    [
        (252, False),
        (241, False),
        (202, False),
        (733, False),
        (319, True),
        (159, True),
        (99999, False),
    ],
)
def test_load_restart_and_unknown_codes_are_transient(code: int, possibly_persisted: bool) -> None:
    error = error_for_code(code, "try again")
    assert isinstance(error, TransientSinkError)
    assert error.possibly_persisted is possibly_persisted
    assert code not in PERMANENT_CODES


def test_code_in_message() -> None:
    assert code_in_message("Code: 16. DB::Exception: No such column x") == 16
    assert code_in_message("Failed: Code: 252. DB::Exception: Too many parts") == 252
    assert code_in_message("no code here") is None


# -- rows ---------------------------------------------------------------------------

MODERN_COLUMNS = describe(events_ddl("events", MODERN))
OLD_COLUMNS = describe(events_ddl("events", OLD))


def event(**fields: object) -> Event:
    return Event(name="click", project_id="p1", **fields)  # type: ignore[arg-type]


def test_modern_row_holds_native_values() -> None:
    created = datetime(2024, 5, 1, 12, 30, 45, 123000, tzinfo=UTC)
    ev = event(created_at=created, profile_id="u", path="/a", duration=7, properties={"k": "v"})
    plan = plan_rows(MODERN_COLUMNS, "events")
    row = dict(zip(plan.columns, plan.row(ev), strict=True))
    assert set(plan.columns) == set(Event.__struct_fields__)
    assert row["id"] == ev.id
    assert isinstance(row["id"], uuid.UUID)
    assert row["created_at"] == 1714566645123
    assert (row["name"], row["profile_id"], row["path"], row["duration"]) == ("click", "u", "/a", 7)
    assert row["properties"] == {"k": "v"}
    assert plan.column_list.startswith("`name`, `project_id`, `id`")


def test_old_row_splits_seconds_milliseconds_and_properties() -> None:
    created = datetime(2024, 5, 1, 14, 30, 45, 999000, tzinfo=timezone(timedelta(hours=2)))
    ev = event(created_at=created, properties={"a": "x", "b": True, "n": 3, "f": 0.1})
    plan = plan_rows(OLD_COLUMNS, "events")
    row = dict(zip(plan.columns, plan.row(ev), strict=True))
    assert row["created_at"] == 1714566645  # the same instant as 12:30:45 UTC
    assert row["created_at_ms"] == 999
    assert row["properties.key"] == ("a", "b", "n", "f")
    assert row["properties.value"] == ("x", "true", "3", "0.1")
    assert "properties" not in row


def test_milliseconds_are_exact_where_floats_are_not() -> None:
    # 0.001 * n is not exact in binary; the row uses integer timedelta arithmetic.
    plan = plan_rows(MODERN_COLUMNS, "events")
    position = plan.columns.index("created_at")
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for ms in (0, 1, 7, 123, 500, 999):
        created = base + timedelta(milliseconds=ms)
        assert plan.row(event(created_at=created))[position] == 1767225600000 + ms
    pre_epoch = datetime(1969, 12, 31, 23, 59, 59, 1000, tzinfo=UTC)
    assert plan.row(event(created_at=pre_epoch))[position] == -999


def test_json_dialect_sends_seconds_with_a_fraction() -> None:
    plan = plan_rows(MODERN_COLUMNS, "events", dialect="json")
    position = plan.columns.index("created_at")
    created = datetime(2024, 1, 1, 12, 0, 0, 456000, tzinfo=UTC)
    value = plan.row(event(created_at=created))[position]
    assert repr(value) == "1704110400.456"
    old = plan_rows(OLD_COLUMNS, "events", dialect="json")
    row = dict(zip(old.columns, old.row(event(created_at=created)), strict=True))
    assert (row["created_at"], row["created_at_ms"]) == (1704110400, 456)


def test_other_scales_and_string_ids() -> None:
    columns = [
        Column("id", "String"),
        *(c for c in MODERN_COLUMNS if c.name not in ("id", "created_at")),
        Column("created_at", "DateTime64(6, 'UTC')"),
    ]
    plan = plan_rows(columns, "events")
    ev = event(created_at=datetime(2024, 1, 1, 0, 0, 0, 5000, tzinfo=UTC))
    row = dict(zip(plan.columns, plan.row(ev), strict=True))
    assert row["id"] == str(ev.id)
    assert row["created_at"] == 1704067200005000


def test_stringify_properties() -> None:
    values: dict[str, PropertyValue] = {
        "s": "x",
        "t": True,
        "f": False,
        "i": -3,
        "big": 10**30,
        "x": 0.1,
        "e": 1e20,
    }
    assert stringify_properties(values) == {
        "s": "x",
        "t": "true",
        "f": "false",
        "i": "-3",
        "big": str(10**30),
        "x": "0.1",
        "e": "1e+20",
    }


def test_extra_columns_are_left_to_their_defaults() -> None:
    columns = [
        *MODERN_COLUMNS,
        Column("ingested_at", "DateTime", "DEFAULT"),
        Column("day", "Date", "MATERIALIZED"),
    ]
    plan = plan_rows(columns, "events")
    assert "ingested_at" not in plan.columns
    assert "day" not in plan.columns
    assert len(plan.row(event())) == len(plan.columns) == len(Event.__struct_fields__)


def test_missing_columns_are_named_at_once() -> None:
    columns = [c for c in MODERN_COLUMNS if c.name not in ("referrer", "duration")]
    with pytest.raises(ConfigError, match="no column for referrer, duration") as raised:
        plan_rows(columns, "events")
    assert "'events'" in str(raised.value)


def test_a_materialized_column_cannot_take_a_field() -> None:
    columns = [c for c in MODERN_COLUMNS if c.name != "path"] + [Column("path", "String", "ALIAS")]
    with pytest.raises(ConfigError, match="no column for path"):
        plan_rows(columns, "events")


def test_unusable_column_types_are_named() -> None:
    columns = [
        Column(c.name, "Int8") if c.name == "duration" else c
        for c in MODERN_COLUMNS
        if c.name != "properties"
    ] + [Column("properties", "Map(String, UInt64)")]
    with pytest.raises(ConfigError) as raised:
        plan_rows(columns, "events")
    message = str(raised.value)
    assert "duration Int8" in message
    assert "properties Map(String, UInt64)" in message


def test_properties_need_both_nested_arrays() -> None:
    columns = [c for c in OLD_COLUMNS if c.name != "properties.value"]
    with pytest.raises(ConfigError, match="no column for properties"):
        plan_rows(columns, "events")


@pytest.mark.parametrize("columns", [MODERN_COLUMNS, OLD_COLUMNS], ids=["modern", "18.16"])
def test_column_values_are_the_rows_transposed(columns: list[Column]) -> None:
    plan = plan_rows(columns, "events")
    sent = [
        event(
            created_at=datetime(2024, 5, 1, 12, 30, 45, ms * 1000, tzinfo=UTC),
            profile_id=f"u{ms}",
            duration=ms,
            properties={"text": "x", "n": ms, "f": 0.5, "b": ms % 2 == 0} if ms % 3 else {},
        )
        for ms in range(7)
    ]
    values = plan.column_values(sent)
    assert len(values) == len(plan.columns)
    assert values == [list(column) for column in zip(*plan.rows(sent), strict=True)]
    assert plan.column_values([]) == [[] for _ in plan.columns]
