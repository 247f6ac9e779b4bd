"""Columns in ClickHouse's native wire format, for the types the events table uses.

asynch's column writers check and convert every value on their own (its
``UUID`` writer about 210 ns a value here, ``DateTime`` about 100), while
the values the sink sends are already what the table takes: validated at
``track`` and shaped by :mod:`._rows`. :func:`column_wire` writes them in
bulk instead: ``struct`` packs whole integer columns in one call (about
10 ns a value), and ``String`` columns join cached wire forms in a C loop.
Types it does not know return ``None``; the sink leaves those to asynch.

Formats, as ClickHouse reads them: integers are little-endian of their
width; ``DateTime`` is seconds as ``UInt32`` and ``DateTime64`` ticks as
``Int64``; ``UUID`` is two ``UInt64``, the high half first; ``String`` is
an unsigned LEB128 length, then the UTF-8 bytes; ``Array(String)`` is the
running total of the array lengths (``UInt64``), then all items as a
``String`` column. A value that does not fit its type raises
``struct.error`` or ``TypeError`` before anything of its column is written
(the sink maps both to a permanent error, as it did asynch's own).
"""

from __future__ import annotations

import itertools
import re
import struct
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, Final

__all__ = ("STRING_CACHE_SIZE", "column_wire", "strings_wire")

STRING_CACHE_SIZE: Final = 65_536
"""Distinct strings kept with their wire form; the cache starts over past it."""

_LENGTH_BYTE: Final = tuple(bytes((length,)) for length in range(128))
_LOW_64: Final = (1 << 64) - 1
_INTEGER_CODES: Final = {
    "UInt8": "B",
    "UInt16": "H",
    "UInt32": "I",
    "UInt64": "Q",
    "Int8": "b",
    "Int16": "h",
    "Int32": "i",
    "Int64": "q",
}
_DATETIME: Final = re.compile(r"^DateTime(?:\('[^']*'\))?$")
_DATETIME64: Final = re.compile(r"^DateTime64\(\d(?:,\s*'[^']*')?\)$")

_ColumnWriter = Callable[[Sequence[Any], dict[str, bytes]], bytes]


def _varint(value: int) -> bytes:
    """Unsigned LEB128, as the native protocol writes lengths."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _wire_form(value: str) -> bytes:
    data = value.encode()
    size = len(data)
    return (_LENGTH_BYTE[size] if size < 128 else _varint(size)) + data


def strings_wire(values: Sequence[str], encoded: dict[str, bytes]) -> bytes:
    """Return ``values`` as a ``String`` column, reusing ``encoded`` wire forms.

    Analytics columns repeat their values (names, paths, origins): each
    distinct string is encoded once, and a column whose strings are all
    known is one C-level join (about 15 ns a value). Strings new to the
    cache are added first; past :data:`STRING_CACHE_SIZE` it starts over.
    """
    try:
        return b"".join(map(encoded.__getitem__, values))
    except KeyError:
        pass
    missing = set(values).difference(encoded)
    if len(encoded) + len(missing) > STRING_CACHE_SIZE:
        encoded.clear()
        missing = set(values)
    for value in missing:
        encoded[value] = _wire_form(value)
    return b"".join(map(encoded.__getitem__, values))


def _string_arrays(values: Sequence[Sequence[str]], encoded: dict[str, bytes]) -> bytes:
    ends = list(itertools.accumulate(map(len, values)))
    items = list(itertools.chain.from_iterable(values))
    return struct.pack(f"<{len(ends)}Q", *ends) + strings_wire(items, encoded)


def _uuids(values: Sequence[Any], _encoded: dict[str, bytes]) -> bytes:
    halves: list[int] = []
    try:
        for value in values:
            number = value.int
            halves += (number >> 64, number & _LOW_64)
    except AttributeError:
        raise TypeError(f"a UUID column takes uuid.UUID values, got {value!r}") from None
    return struct.pack(f"<{len(halves)}Q", *halves)


def _integers(code: str) -> _ColumnWriter:
    def write(values: Sequence[Any], _encoded: dict[str, bytes]) -> bytes:
        return struct.pack(f"<{len(values)}{code}", *values)

    return write


@cache
def _writer_for(kind: str) -> _ColumnWriter | None:
    if kind == "String":
        return strings_wire
    if kind == "Array(String)":
        return _string_arrays
    if kind == "UUID":
        return _uuids
    if kind in _INTEGER_CODES:
        return _integers(_INTEGER_CODES[kind])
    if _DATETIME.match(kind):
        return _integers("I")
    if _DATETIME64.match(kind):
        return _integers("q")
    return None


def column_wire(kind: str, values: Sequence[Any], encoded: dict[str, bytes]) -> bytes | None:
    """Return the column of type ``kind`` holding ``values`` on the wire, or ``None``.

    ``None`` means the type is not one written here (``LowCardinality``,
    ``Map``, ``Nullable`` and others): the caller uses asynch's writer.
    ``DateTime``/``DateTime64`` values must be integers (seconds, ticks),
    ``UUID`` values :class:`uuid.UUID`, ``Array(String)`` values sequences
    of strings.
    """
    writer = _writer_for(kind)
    return None if writer is None else writer(values, encoded)
