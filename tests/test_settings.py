"""``Settings``: documented defaults, ``from_env``, and the range checks of ``__post_init__``."""

from __future__ import annotations

import ast
import inspect
import itertools
import math
import typing
from typing import Any

import msgspec
import pytest

from analytics_buffer import ConfigError, Durability, Overflow, Settings
from analytics_buffer import _settings as settings_module

DEFAULTS: dict[str, Any] = {
    "clickhouse_url": None,
    "data_dir": "analytics-buffer-data",
    "table": "events",
    "flush_interval": 5.0,
    "max_batch_events": 20_000,
    "max_batch_bytes": 16 * 1024 * 1024,
    "max_buffered_events": 200_000,
    "max_buffered_bytes": 128 * 1024 * 1024,
    "max_event_bytes": 64 * 1024,
    "overflow": "drop_newest",
    "put_timeout": 5.0,
    "shutdown_timeout": 10.0,
    "insert_chunk_rows": 20_000,
    "insert_block_rows": 500,
    "pool_size": 2,
    "connect_timeout": 5.0,
    "insert_timeout": 30.0,
    "retry_attempts": 8,
    "retry_initial_backoff": 0.1,
    "retry_max_backoff": 5.0,
    "max_restarts": 3,
    "max_seconds": 5.0,
    "durability": "memory",
    "fsync_interval": 0.1,
    "fsync_batch": 10_000,
    "outbox_max_bytes": 1024 * 1024 * 1024,
    "outbox_segment_bytes": 16 * 1024 * 1024,
    "outbox_segment_age": 10.0,
}

FIELDS = msgspec.structs.fields(Settings)
INT_FIELDS = [field.name for field in FIELDS if field.type is int]
FLOAT_FIELDS = [field.name for field in FIELDS if field.type is float]
OPTIONAL_FIELDS = [field.name for field in FIELDS if field.type == (str | None)]
NON_NEGATIVE = {"max_restarts", "retry_initial_backoff", "retry_max_backoff"}
"""The only numbers that may be 0; every other count is at least 1, every duration positive."""
AT_LEAST_ONE_FIELDS = [name for name in INT_FIELDS if name not in NON_NEGATIVE]
POSITIVE_FLOAT_FIELDS = [name for name in FLOAT_FIELDS if name not in NON_NEGATIVE]


def env(**values: str) -> dict[str, str]:
    return {f"ANALYTICS_BUFFER_{name.upper()}": value for name, value in values.items()}


# -- defaults ------------------------------------------------------------------------


def test_the_field_lists_cover_every_field() -> None:
    assert set(DEFAULTS) <= {field.name for field in FIELDS}
    assert {"max_batch_events", "max_restarts"} <= set(INT_FIELDS)
    assert {"flush_interval", "retry_max_backoff"} <= set(FLOAT_FIELDS)
    assert "clickhouse_url" in OPTIONAL_FIELDS


def test_defaults_are_the_documented_ones() -> None:
    settings = Settings()
    for field in FIELDS:
        assert getattr(settings, field.name) == field.default, field.name
    for name, value in DEFAULTS.items():
        assert getattr(settings, name) == value, name
        assert type(getattr(settings, name)) is type(value), name


def test_every_field_has_a_docstring_in_the_struct() -> None:
    tree = ast.parse(inspect.getsource(settings_module))
    (cls,) = [
        node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Settings"
    ]
    documented: set[str] = set()
    body = cls.body
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
            and after.value.value.strip()
        ):
            documented.add(node.target.id)
    assert documented == {field.name for field in FIELDS}


def test_durability_modes_and_the_outbox_bounds() -> None:
    for mode in typing.get_args(Durability):
        assert Settings(durability=mode).durability == mode
    with pytest.raises(ConfigError, match="durability"):
        Settings(durability="disk")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="outbox_segment_bytes must not exceed"):
        Settings(outbox_max_bytes=1000, outbox_segment_bytes=1001)


def test_overflow_policies() -> None:
    assert set(typing.get_args(Overflow)) == {"drop_newest", "block", "raise"}
    for policy in typing.get_args(Overflow):
        assert Settings(overflow=policy).overflow == policy


def test_settings_are_frozen_and_replace_validates() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.flush_interval = 1.0  # type: ignore[misc]
    changed = settings.replace(flush_interval=1.0, table="events_v2")
    assert (changed.flush_interval, changed.table) == (1.0, "events_v2")
    assert settings.flush_interval == 5.0
    with pytest.raises(ConfigError, match="max_batch_events"):
        settings.replace(max_batch_events=0)


# -- from_env ------------------------------------------------------------------------


def test_from_env_without_variables_gives_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({"UNRELATED": "1", "FLUSH_INTERVAL": "1"}) == Settings()


def test_from_env_parses_ints_floats_and_strings() -> None:
    settings = Settings.from_env(
        env(
            clickhouse_url="clickhouse://u:p@db:9000/analytics",
            data_dir="/var/lib/ab",
            table="events_v2",
            flush_interval="0.25",
            max_batch_events="500",
            max_buffered_events="1000",
            retry_initial_backoff="1e-2",
            overflow="block",
            max_restarts="0",
        )
    )
    assert settings.clickhouse_url == "clickhouse://u:p@db:9000/analytics"
    assert settings.data_dir == "/var/lib/ab"
    assert settings.table == "events_v2"
    assert settings.flush_interval == 0.25
    assert type(settings.flush_interval) is float
    assert settings.max_batch_events == 500
    assert type(settings.max_batch_events) is int
    assert settings.max_buffered_events == 1000
    assert settings.retry_initial_backoff == 0.01
    assert settings.overflow == "block"
    assert settings.max_restarts == 0
    assert settings.put_timeout == DEFAULTS["put_timeout"]


@pytest.mark.parametrize("name", INT_FIELDS)
def test_from_env_reads_every_int_field(name: str) -> None:
    value = 7 if name != "max_restarts" else 0
    changes = {name: str(value)}
    if name in ("max_buffered_events",):
        changes["max_batch_events"] = "7"
    if name == "max_buffered_bytes":
        changes["max_event_bytes"] = "7"
    if name == "outbox_max_bytes":
        changes["outbox_segment_bytes"] = "7"
    assert getattr(Settings.from_env(env(**changes)), name) == value


@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_from_env_reads_every_float_field(name: str) -> None:
    changes = {name: "7.5"}
    if name == "retry_initial_backoff":
        changes["retry_max_backoff"] = "8"
    assert getattr(Settings.from_env(env(**changes)), name) == 7.5


@pytest.mark.parametrize("name", OPTIONAL_FIELDS)
def test_an_empty_value_means_none_where_none_is_allowed(name: str) -> None:
    assert getattr(Settings.from_env(env(**{name: ""})), name) is None
    assert getattr(Settings.from_env(env(**{name: "scheme://h"})), name) == "scheme://h"


def test_empty_value_for_a_field_without_none_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_batch_events"):
        Settings.from_env(env(max_batch_events=""))
    with pytest.raises(ConfigError, match="table"):
        Settings.from_env(env(table=""))


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANALYTICS_BUFFER_FLUSH_INTERVAL", "2.5")
    monkeypatch.setenv("ANALYTICS_BUFFER_TABLE", "from_os")
    settings = Settings.from_env()
    assert (settings.flush_interval, settings.table) == (2.5, "from_os")


def test_variable_names_are_upper_case_with_the_prefix() -> None:
    lower = {"analytics_buffer_flush_interval": "1", "ANALYTICS_BUFFER_flush_interval": "1"}
    assert Settings.from_env(lower).flush_interval == DEFAULTS["flush_interval"]


def test_overrides_win_over_the_environment() -> None:
    environ = env(flush_interval="1", table="from_env", max_batch_events="10")
    settings = Settings.from_env(environ, flush_interval=3.0, table="override")
    assert (settings.flush_interval, settings.table, settings.max_batch_events) == (
        3.0,
        "override",
        10,
    )
    assert Settings.from_env(env(clickhouse_url="clickhouse://h"), clickhouse_url=None) == (
        Settings()
    )


def test_overrides_are_validated_too() -> None:
    with pytest.raises(ConfigError, match="max_batch_events"):
        Settings.from_env({}, max_batch_events=0)


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("raw", ["abc", "1.5", " 3 x"])
def test_unparsable_int_raises_config_error_naming_the_field(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env(**{name: raw}))
    assert isinstance(info.value, ValueError)
    assert name in str(info.value)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_unparsable_float_raises_config_error_naming_the_field(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env(env(**{name: "soon"}))


def test_unknown_overflow_raises_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="overflow"):
        Settings.from_env(env(overflow="spill"))


def test_out_of_range_value_from_the_environment_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="flush_interval must be positive"):
        Settings.from_env(env(flush_interval="0"))
    with pytest.raises(ConfigError, match="flush_interval must be positive"):
        Settings.from_env(env(flush_interval="nan"))


def test_config_error_names_the_variable_that_does_not_parse() -> None:
    # Fixed bug (_settings.py from_env): the docstring promises "naming the
    # variable that does not parse"; the message says "ANALYTICS_BUFFER_*: ...
    # at `$.max_batch_events`", never the variable's name.
    with pytest.raises(ConfigError, match="ANALYTICS_BUFFER_MAX_BATCH_EVENTS"):
        Settings.from_env(env(max_batch_events="lots"))


# -- __post_init__ range checks ------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        *[({name: 0}, name) for name in AT_LEAST_ONE_FIELDS],
        *[({name: -1}, name) for name in AT_LEAST_ONE_FIELDS],
        *[({name: 0.0}, name) for name in POSITIVE_FLOAT_FIELDS],
        *[({name: -1.0}, name) for name in POSITIVE_FLOAT_FIELDS],
        *[({name: math.nan}, name) for name in POSITIVE_FLOAT_FIELDS],
        ({"max_restarts": -1}, "max_restarts"),
        ({"retry_initial_backoff": -0.1}, "retry_initial_backoff"),
        ({"retry_initial_backoff": 2.0, "retry_max_backoff": 1.0}, "retry_max_backoff"),
        ({"overflow": "spill"}, "overflow"),
        ({"max_batch_events": 11, "max_buffered_events": 10}, "max_batch_events"),
        ({"max_event_bytes": 2048, "max_buffered_bytes": 1024}, "max_event_bytes"),
        ({"table": ""}, "table"),
        ({"table": "events; DROP TABLE x"}, "table"),
        ({"table": "db.events"}, "table"),
    ],
    ids=repr,
)
def test_out_of_range_settings_raise_config_error_naming_the_field(
    changes: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(**changes)
    assert named in str(info.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"max_batch_events": 1, "max_buffered_events": 1},
        {"max_batch_events": 10, "max_buffered_events": 10},
        {"max_event_bytes": 1024, "max_buffered_bytes": 1024},
        {"retry_initial_backoff": 0.0, "retry_max_backoff": 0.0},
        {"retry_initial_backoff": 1.0, "retry_max_backoff": 1.0},
        {"max_restarts": 0},
        {"table": "events_2024"},
        {"flush_interval": 0.001},
    ],
    ids=repr,
)
def test_values_at_the_bounds_are_accepted(changes: dict[str, Any]) -> None:
    settings = Settings(**changes)
    for name, value in changes.items():
        assert getattr(settings, name) == value


@pytest.mark.parametrize(
    "changes",
    [{"flush_interval": "5"}, {"max_batch_events": "10"}, {"table": 5}],
    ids=repr,
)
def test_wrong_types_raise_config_error_naming_the_field(changes: dict[str, Any]) -> None:
    # Fixed bug (_settings.py __post_init__): ConfigError is documented as
    # "Raised when a setting is ... of the wrong type", but a Struct does not
    # check types on construction, so __post_init__ fails with a bare TypeError
    # ("'>' not supported between instances of 'str' and 'int'") or
    # AttributeError, naming no field.
    (name,) = changes
    with pytest.raises(ConfigError, match=name):
        Settings(**changes)
