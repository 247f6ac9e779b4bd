"""Outbox segment files: record framing, scanning, torn tails and quarantine.

A segment is a file of records, each framed as::

    <u32 little-endian payload length> <u32 CRC-32 of the payload> <payload>

The payload is one :class:`~analytics_buffer.Event` as MessagePack: msgspec
encodes it about a fifth faster than JSON and a fifth smaller, which the
write-ahead log pays for on every tracked event (``analytics-buffer outbox
inspect`` prints records as JSON). Payloads written as JSON by earlier
versions (they start with ``{``, which no MessagePack map does) still
decode. A frame
whose header is all zero bytes ends the data (an active segment is
preallocated with zeros). :func:`scan` walks the frames; where a frame does
not check out (length out of range, a payload that does not start as an
event's encoding, CRC mismatch) it searches forward for the next frame that
does, and reports the bytes in between as a bad region. A bad region with
no valid frame after it is the segment's *tail*. The first-byte check comes
before the CRC so that the search through garbage rarely computes one: a
candidate's checksum runs over as many bytes as its length claims.

File names, in ``<data_dir>/outbox``:

* ``<ns>-<rand>.open``: the active segment of a ``wal`` buffer (preallocated,
  written with ``pwrite``); ``<ns>`` is the creation time in nanoseconds since the
  epoch, so names sort by age;
* ``<ns>-<rand>.seg``: a sealed segment, immutable until it is deleted;
* ``<ns>-<rand>.tmp``: a segment being written in one go (a spill); one left
  by a crash was never reported written, and is removed;
* ``quarantine.ndjson``: one JSON line per record that failed its checks;
* ``outbox.lock``: held (``flock``) by the buffer that owns the directory.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final, NamedTuple

import msgspec

from ._event import Event

__all__ = (
    "HEADER",
    "MAX_PAYLOAD",
    "QUARANTINE_NAME",
    "BadRegion",
    "Quarantined",
    "Scan",
    "decode_payload",
    "encode_frame",
    "encode_frames",
    "new_segment_stem",
    "scan",
    "segment_created_at",
    "sync_directory",
)

HEADER: Final = struct.Struct("<II")
MAX_PAYLOAD: Final = 16 * 1024 * 1024
"""Longer lengths are corruption: an event is at most ``max_event_bytes`` of JSON."""
QUARANTINE_NAME: Final = "quarantine.ndjson"

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Event)
_json_decoder: Final = msgspec.json.Decoder(Event)
_pack_header: Final = HEADER.pack
_unpack_header: Final = HEADER.unpack_from
_crc32: Final = binascii.crc32
"""The CRC-32 of zlib, through ``binascii``: the same values, ~50 ns a call less here."""
_PAYLOAD_STARTS: Final = frozenset([*range(0x80, 0x90), 0xDE, 0xDF, ord("{")])
"""First bytes of an event's encoding: a MessagePack map (fixmap, map 16, map 32), or a
JSON object from earlier versions."""


def encode_frame(event: Event) -> bytes:
    """Return the framed record of ``event``."""
    payload = _encoder.encode(event)
    return _pack_header(len(payload), _crc32(payload)) + payload


def encode_frames(events: Iterable[Event]) -> bytes:
    """Return the framed records of ``events``, back to back."""
    return b"".join(map(encode_frame, events))


def decode_payload(payload: bytes | memoryview) -> Event:
    """Decode one record's payload.

    :raises msgspec.DecodeError: when it is not an event (including validation errors)
    """
    if payload[:1] == b"{":
        return _json_decoder.decode(payload)
    return _decoder.decode(payload)


class BadRegion(NamedTuple):
    """Bytes ``[start, stop)`` of a segment that hold no valid frame."""

    start: int
    stop: int
    reason: str


class Scan(NamedTuple):
    """What :func:`scan` found in a segment's bytes."""

    frames: list[tuple[int, bytes]]
    """``(offset, payload)`` of every valid frame, in order."""
    bad: list[BadRegion]
    """Bad regions followed by a valid frame (corruption in the middle)."""
    tail: BadRegion | None
    """A bad region with no valid frame after it: a torn write, or corruption."""
    end: int
    """Where the data ends: after the last valid frame or bad region."""


def _frame_at(data: bytes, offset: int, size: int) -> tuple[int, str]:
    """Return ``(end, "")`` for a valid frame at ``offset``, else ``(0, reason)``."""
    if offset + HEADER.size > size:
        return 0, "truncated header"
    length, crc = _unpack_header(data, offset)
    start = offset + HEADER.size
    if length == 0 or length > MAX_PAYLOAD:
        return 0, f"impossible length {length}"
    if start + length > size:
        return 0, f"truncated record ({length} bytes announced, {size - start} left)"
    if data[start] not in _PAYLOAD_STARTS:
        return 0, "payload does not start as an encoded event"
    if _crc32(data[start : start + length]) != crc:
        return 0, "checksum mismatch"
    return start + length, ""


def scan(data: bytes) -> Scan:
    """Walk the frames of ``data``, separating valid frames from bad regions."""
    size = len(data)
    # Past the last non-zero byte there is nothing but preallocated space.
    used = len(data.rstrip(b"\x00"))
    frames: list[tuple[int, bytes]] = []
    bad: list[BadRegion] = []
    offset = 0
    while offset < used:
        end, reason = _frame_at(data, offset, size)
        if end:
            frames.append((offset, data[offset + HEADER.size : end]))
            offset = end
            continue
        following = next(
            (
                candidate
                for candidate in range(offset + 1, used)
                if _frame_at(data, candidate, size)[0]
            ),
            None,
        )
        if following is None:
            return Scan(frames, bad, BadRegion(offset, used, reason), used)
        bad.append(BadRegion(offset, following, reason))
        offset = following
    return Scan(frames, bad, None, max(offset, 0))


class Quarantined(msgspec.Struct, frozen=True, kw_only=True):
    """One line of ``quarantine.ndjson``: a record that failed its checks."""

    segment: str
    offset: int
    length: int
    reason: str
    event_id: str | None
    """The id, when the bytes still decode as an event (then unverified)."""
    raw: str
    """The record's bytes, base64."""


_quarantine_encoder: Final = msgspec.json.Encoder()
_quarantine_decoder: Final = msgspec.json.Decoder(Quarantined)


def quarantine_lines(
    segment: str, data: bytes, regions: Iterable[BadRegion], base: int = 0
) -> bytes:
    """Return the quarantine lines of ``regions`` of a segment, ``data`` being its
    bytes from offset ``base`` on."""
    lines = []
    for region in regions:
        raw = data[region.start - base : region.stop - base]
        lines.append(
            _quarantine_encoder.encode(
                Quarantined(
                    segment=segment,
                    offset=region.start,
                    length=len(raw),
                    reason=region.reason,
                    event_id=_salvage_id(raw),
                    raw=base64.b64encode(raw).decode(),
                )
            )
            + b"\n"
        )
    return b"".join(lines)


def read_quarantine(directory: Path) -> list[Quarantined]:
    """Return every quarantined record under ``directory`` (empty when none)."""
    path = directory / QUARANTINE_NAME
    if not path.exists():
        return []
    return [_quarantine_decoder.decode(line) for line in path.read_bytes().splitlines() if line]


def _salvage_id(raw: bytes) -> str | None:
    """The event id in a bad record, when its payload still decodes."""
    for start in (HEADER.size, 0):
        try:
            return str(decode_payload(raw[start:]).id)
        except (msgspec.DecodeError, ValueError):
            continue
    return None


def iter_events(frames: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, Event | str]]:
    """Decode frames; yield ``(offset, event)`` or ``(offset, why it does not decode)``."""
    for offset, payload in frames:
        try:
            yield offset, decode_payload(payload)
        except (msgspec.DecodeError, ValueError) as exc:
            yield offset, f"valid frame, but not an event: {exc}"


def new_segment_stem() -> str:
    """A segment name without suffix: creation time in ns, then 8 random hex digits."""
    return f"{time.time_ns():020d}-{os.urandom(4).hex()}"


def segment_created_at(name: str) -> float:
    """The creation time (seconds since the epoch) in a segment's file name."""
    try:
        return int(name.split("-", 1)[0]) / 1e9
    except ValueError:
        return time.time()


def sync_directory(directory: Path) -> None:
    """fsync ``directory`` so a create, rename or unlink in it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
