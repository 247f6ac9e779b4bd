"""Events to rows: each Event field finds the table column of the same name.

The sink reads the table's columns when it opens (``DESCRIBE TABLE``) and
calls :func:`plan_rows`, which checks that every Event field has a column of
a type it can fill and compiles one row function for that table. Extra table
columns are left out of the INSERT, so they take their defaults; a field
without a column is a :class:`~analytics_buffer.ConfigError` naming them all.

Values are what the native protocol (asynch) takes without conversion:

* ``created_at`` as an integer: milliseconds since the epoch for
  ``DateTime64(3)`` (ticks for other scales), seconds for ``DateTime``; an
  optional ``created_at_ms`` column gets the millisecond of the second.
  asynch writes integers as they are, where an aware ``datetime`` costs it a
  ``timetuple()`` and ``timegm()`` per value; the millisecond comes from
  exact ``timedelta`` arithmetic, never a float;
* ``id`` as a :class:`uuid.UUID` (its text for a ``String`` column);
* ``properties`` as a ``dict[str, str]`` for ``Map(String, String)``, or as
  two tuples for the ``Nested`` pair ``properties.key``/``properties.value``
  (tuples of strings, unlike lists, drop out of the garbage collector's
  tracking, which matters with thousands of rows held per INSERT).
  Values become strings: ``str`` as is, ``bool`` as ``"true"``/``"false"``,
  ``int`` by ``str``, ``float`` by ``repr`` (shortest round trip).

The ``json`` dialect, for ``JSONCompactEachRow`` (chdb), differs only for
``DateTime64``: seconds with a three-digit fraction, because JSON input reads
a bare integer as seconds.

The row function is generated source, compiled once per table: a tuple of
attribute reads with no per-column call (about 0.5 us an event here, where
a list of per-column getters costs twice that). Its fragments are constants
of this module; column names only select them. The native sink sends
columns rather than rows (:meth:`RowPlan.column_values`, generated from the
same fragments): one list comprehension per column, no tuple per event, and
nothing for asynch to transpose.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, NamedTuple, final

from ._event import Event, PropertyValue
from ._exceptions import ConfigError

__all__ = ("Column", "Dialect", "RowPlan", "plan_rows", "stringify_properties")

Dialect = Literal["native", "json"]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)

_TEXT_FIELDS: Final = frozenset(
    {"name", "project_id", "profile_id", "session_id", "path", "origin", "referrer"}
)
_EVENT_FIELDS: Final = Event.__struct_fields__
_NESTED_KEYS: Final = ("properties.key", "properties.value")
_WRAPPER: Final = re.compile(r"^(?:LowCardinality|Nullable)\((.*)\)$")
_DATETIME64: Final = re.compile(r"^DateTime64\((\d)\s*(?:,.*)?\)$")
_DATETIME: Final = re.compile(r"^DateTime(?:\(.*\))?$")
_INTEGER: Final = re.compile(r"^U?Int(?:8|16|32|64|128|256)$")
_MAP_TYPES: Final = frozenset({"Map(String, String)", "Map(LowCardinality(String), String)"})
_DURATION_TYPES: Final = frozenset({"UInt32", "UInt64", "Int64", "UInt128", "Int128"})


def stringify_properties(properties: Mapping[str, PropertyValue]) -> dict[str, str]:
    """Return ``properties`` with every value as the string ClickHouse stores."""
    # An if-chain on the exact type: half the time of a dict of formatters.
    out: dict[str, str] = {}
    for key, value in properties.items():
        kind = type(value)
        if kind is str:
            out[key] = value  # type: ignore[assignment]
        elif kind is bool:
            out[key] = "true" if value else "false"
        elif kind is float:
            out[key] = repr(value)
        else:
            out[key] = str(value)
    return out


class Column(NamedTuple):
    """One column of ``DESCRIBE TABLE``: its name, type and default kind."""

    name: str
    type: str
    default_kind: str = ""
    """``""``, ``DEFAULT``, ``MATERIALIZED``, ``ALIAS`` or ``EPHEMERAL``."""

    @property
    def insertable(self) -> bool:
        """Whether an INSERT may name the column."""
        return self.default_kind not in ("MATERIALIZED", "ALIAS")


@final
class RowPlan:
    """The INSERT column list of one table and the function making a row of an event.

    Built by :func:`plan_rows`; ``row(event)`` returns a tuple in the order
    of ``columns``.
    """

    __slots__ = ("column_list", "column_values", "columns", "row")

    def __init__(
        self,
        columns: tuple[str, ...],
        row: Callable[[Event], tuple[Any, ...]],
        column_values: Callable[[Sequence[Event]], list[list[Any]]],
    ) -> None:
        self.columns = columns
        self.row = row
        self.column_values = column_values
        """``column_values(events)``: one fresh list per column, in the order of
        ``columns``, holding what ``row`` would put there for each event."""
        self.column_list = ", ".join(f"`{name}`" for name in columns)
        """The columns as an SQL list, backquoted: ``"`id`, `name`, ..."``."""

    def rows(self, events: Iterable[Event]) -> list[tuple[Any, ...]]:
        """Return the rows of ``events``."""
        row = self.row
        return [row(event) for event in events]


def _base_type(column_type: str) -> str:
    while found := _WRAPPER.match(column_type):
        column_type = found.group(1)
    return column_type


def _time_expression(column: Column, dialect: Dialect) -> str | None:
    base = _base_type(column.type)
    if found := _DATETIME64.match(base):
        if dialect == "json":
            # JSON reads an integer as seconds; ms / 1000 prints as exactly its
            # three decimals (doubles near 1e9 are 2e-7 apart).
            return "ms / 1000"
        scale = int(found.group(1))
        if scale == 3:
            return "ms"
        return f"ms * {10 ** (scale - 3)}" if scale > 3 else f"ms // {10 ** (3 - scale)}"
    if _DATETIME.match(base):
        return "ms // 1000"
    return None


def _expression(field: str, column: Column, dialect: Dialect) -> str | None:
    """Return the source of the value of ``field`` for ``column``, or None if it cannot fill it."""
    base = _base_type(column.type)
    if field in _TEXT_FIELDS:
        return f"e.{field}" if base == "String" else None
    if field == "id":
        return {"UUID": "e.id", "String": "str(e.id)"}.get(base)
    if field == "duration":
        return "e.duration" if base in _DURATION_TYPES else None
    if field == "created_at":
        return _time_expression(column, dialect)
    if field == "created_at_ms":
        return "ms % 1000" if _INTEGER.match(base) else None
    if field == "properties":
        return "props" if base in _MAP_TYPES else None
    if field in _NESTED_KEYS:
        if base != "Array(String)":
            return None
        return "tuple(props)" if field == "properties.key" else "tuple(props.values())"
    raise AssertionError(field)  # pragma: no cover


_PRELUDE: Final = """\
def row(e):
    ms = (e.created_at - _EPOCH) // _ONE_MS
    props = e.properties
    for value in props.values():
        if type(value) is not str:
            props = _stringify(props)
            break
    return ({values},)


def column_values(events):
    mss = [(e.created_at - _EPOCH) // _ONE_MS for e in events]
    propss = [e.properties for e in events]
    for i, props in enumerate(propss):
        for value in props.values():
            if type(value) is not str:
                propss[i] = _stringify(props)
                break
    return [{columns}]
"""
_SOURCES: Final = {"e": "events", "ms": "mss", "props": "propss"}
"""The per-event names a value expression uses, and the lists that hold them."""
_NAME: Final = re.compile(r"\b(e|ms|props)\b")


def _column_expression(expression: str) -> str:
    """Return the source of a whole column of the per-event ``expression``."""
    found = _NAME.search(expression)
    assert found is not None, expression
    name = found.group(1)
    if expression == name:
        return _SOURCES[name]
    return f"[{expression} for {name} in {_SOURCES[name]}]"


def plan_rows(
    columns: Iterable[Column | tuple[str, str] | tuple[str, str, str]],
    table: str,
    *,
    dialect: Dialect = "native",
) -> RowPlan:
    """Map the Event fields to ``columns`` by name and compile the row function.

    :param columns: the table's columns, as ``DESCRIBE TABLE`` lists them
    :param table: the table's name, for error messages
    :param dialect: ``"native"`` for asynch, ``"json"`` for ``JSONCompactEachRow``
        (they differ only in ``DateTime64``: integer ticks, or seconds with
        a fraction)
    :raises ConfigError: naming every Event field without a usable column
    """
    by_name = {column.name: column for column in (Column(*c) for c in columns) if column.insertable}
    missing: list[str] = []
    wrong: list[str] = []
    chosen: list[tuple[str, str]] = []
    for field in _EVENT_FIELDS:
        targets = [field]
        if field == "properties" and field not in by_name and set(_NESTED_KEYS) <= by_name.keys():
            targets = list(_NESTED_KEYS)
        if field == "created_at" and "created_at_ms" in by_name:
            targets.append("created_at_ms")
        for name in targets:
            column = by_name.get(name)
            if column is None:
                missing.append(name)
            elif (source := _expression(name, column, dialect)) is None:
                wrong.append(f"{name} {column.type}")
            else:
                chosen.append((name, source))
    problems = []
    if missing:
        problems.append(f"no column for {', '.join(missing)}")
    if wrong:
        problems.append(f"unsupported column types: {', '.join(wrong)}")
    if problems:
        raise ConfigError(
            f"table {table!r} does not fit the events: {'; '.join(problems)} "
            "(see `analytics-buffer schema` for the expected table)"
        )
    source = _PRELUDE.format(
        values=", ".join(expression for _, expression in chosen),
        columns=", ".join(_column_expression(expression) for _, expression in chosen),
    )
    namespace: dict[str, Any] = {
        "_EPOCH": _EPOCH,
        "_ONE_MS": _ONE_MS,
        "_stringify": stringify_properties,
    }
    exec(compile(source, f"<row function for {table}>", "exec"), namespace)
    return RowPlan(tuple(name for name, _ in chosen), namespace["row"], namespace["column_values"])
