"""The sink's own column encodings, byte for byte against asynch's writers.

Pure logic, no server: asynch writes each column into memory, and
:func:`column_wire` must produce the same bytes. The round trip through a
real server is in ``tests/test_clickhouse_sink.py``.
"""

from __future__ import annotations

import struct
import uuid
from typing import Any

import pytest
from asynch.proto.columns import write_column
from asynch.proto.context import Context
from asynch.proto.streams.buffered import BufferedWriter
from hypothesis import given
from hypothesis import strategies as st

from analytics_buffer._event import new_event_id
from analytics_buffer._wire import STRING_CACHE_SIZE, column_wire, strings_wire

pytestmark = pytest.mark.anyio


class _ServerInfo:
    """What asynch's DateTime writer asks of the server."""

    timezone = "UTC"

    def get_timezone(self) -> str:
        return "UTC"


async def asynch_wire(kind: str, values: list[Any]) -> bytes:
    """The bytes asynch's own writer produces for the column."""
    context: Any = Context()  # untyped in asynch's stubs
    context.server_info = _ServerInfo()
    context.settings = {}
    context.client_settings = {
        "strings_as_bytes": False,
        "strings_encoding": "utf-8",
        "use_numpy": False,
        "input_format_null_as_default": False,
    }
    writer: Any = BufferedWriter(None)  # type: ignore[no-untyped-call]
    await write_column(None, writer, context, "column", kind, list(values))  # type: ignore[no-untyped-call]
    return bytes(writer.buffer)


STRINGS = ["", "click", "ünï", "x" * 127, "y" * 128, "é" * 300, "click", "\n\t'\""]
UUIDS = [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), uuid.uuid4(), new_event_id()]


@pytest.mark.parametrize(
    ("kind", "values"),
    [
        ("String", STRINGS),
        ("Array(String)", [[], ["a"], STRINGS, ["b", ""]]),
        ("UUID", UUIDS),
        ("DateTime", [0, 1_700_000_000, 2**32 - 1]),
        ("DateTime('UTC')", [0, 1_700_000_000, 2**32 - 1]),
        ("DateTime64(3, 'UTC')", [0, 1_700_000_000_123, -1]),
        ("UInt8", [0, 255]),
        ("UInt16", [0, 999, 65_535]),
        ("UInt32", [0, 2**32 - 1]),
        ("UInt64", [0, 2**64 - 1]),
        ("Int8", [-128, 127]),
        ("Int16", [-(2**15), 2**15 - 1]),
        ("Int32", [-(2**31), 2**31 - 1]),
        ("Int64", [-(2**63), 2**63 - 1]),
    ],
)
async def test_columns_are_written_as_asynch_writes_them(kind: str, values: list[Any]) -> None:
    encoded: dict[str, bytes] = {}
    expected = await asynch_wire(kind, values)
    assert column_wire(kind, values, encoded) == expected
    assert column_wire(kind, values, encoded) == expected  # again, from the string cache


@pytest.mark.parametrize("kind", ["LowCardinality(String)", "Map(String, String)", "Float64"])
def test_other_types_are_left_to_asynch(kind: str) -> None:
    assert column_wire(kind, ["x"], {}) is None


@given(st.lists(st.text(max_size=300), max_size=50))
async def test_any_strings_are_written_as_asynch_writes_them(values: list[str]) -> None:
    assert strings_wire(values, {}) == await asynch_wire("String", values)


def test_the_string_cache_starts_over_when_full() -> None:
    encoded = {f"old{index}": b"" for index in range(STRING_CACHE_SIZE - 1)}
    assert strings_wire(["a", "b", "a"], encoded) == b"\x01a\x01b\x01a"
    assert encoded == {"a": b"\x01a", "b": b"\x01b"}
    assert len(encoded) <= STRING_CACHE_SIZE


def test_a_value_that_does_not_fit_its_type_raises() -> None:
    with pytest.raises(struct.error):
        column_wire("UInt16", [1, 65_536], {})
    with pytest.raises(struct.error):
        column_wire("DateTime", [-1], {})
    with pytest.raises(TypeError, match=r"uuid\.UUID values, got '0f'"):
        column_wire("UUID", [uuid.uuid4(), "0f"], {})
