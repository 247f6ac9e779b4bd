"""Counting, without I/O: what a batch of events adds to the counters and live visitors.

Every accepted event increments two counters of its ``(project_id, name)``:
the UTC hour and the UTC day of its ``created_at``. Every event with a
``profile_id`` marks the profile as seen by its project at ``created_at``.

A counter is named by a :class:`Bucket` and travels as a *field* string
(:func:`field_of`), the same in memory, in Redis and in a rollup's rows.
:class:`Tally` coalesces events in memory: a tick hands the store one
increment per counter and one last-seen time per visitor, whatever the
number of events behind them.

Times are Unix seconds. UTC hours and days are whole multiples of 3600 and
86400 seconds since the epoch (Unix time has no leap seconds), so bucketing
is one floor division (done once per hour of events, see :meth:`Tally.add`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Final, Literal, NamedTuple, final

from ._event import Event

__all__ = (
    "DAY",
    "HOUR",
    "Bucket",
    "Period",
    "Tally",
    "add_counts",
    "day_fields",
    "day_start",
    "field_of",
    "parse_field",
)

HOUR: Final = 3600
_ONE_HOUR: Final = timedelta(hours=1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
DAY: Final = 86400

Period = Literal["hour", "day"]
_CODE: Final = {"hour": "h", "day": "d"}
_PERIOD: Final[dict[str, Period]] = {"h": "hour", "d": "day"}


class Bucket(NamedTuple):
    """One counter: a project's event name in one UTC hour or day."""

    project_id: str
    name: str
    period: Period
    start: int
    """Unix seconds of the hour's or the day's first second."""


def field_of(bucket: Bucket) -> str:
    """The counter's name as a string: ``<h|d><start>|<len(project)>:<project>|<name>``.

    Unambiguous whatever the ids contain (the project's length is spelled out).
    """
    project_id, name, period, start = bucket
    return f"{_CODE[period]}{start}|{len(project_id)}:{project_id}|{name}"


def parse_field(field: str) -> Bucket:
    """The inverse of :func:`field_of`.

    :raises ValueError: when ``field`` was not made by :func:`field_of`
    """
    head, _, rest = field.partition("|")
    length, _, rest = rest.partition(":")
    size = int(length) if length.isdigit() else -1
    if head[:1] not in _PERIOD or not head[1:].isdigit() or rest[size : size + 1] != "|":
        raise ValueError(f"not a counter field: {field!r}")
    return Bucket(rest[:size], rest[size + 1 :], _PERIOD[head[0]], int(head[1:]))


def day_start(day: date) -> int:
    """Unix seconds of the first second of UTC ``day``."""
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


def day_fields(project_id: str, name: str, day: date) -> list[str]:
    """The fields a read of ``day`` needs: the day's counter, then its 24 hours in order."""
    start = day_start(day)
    fields = [field_of(Bucket(project_id, name, "day", start))]
    fields += [field_of(Bucket(project_id, name, "hour", start + h * HOUR)) for h in range(24)]
    return fields


@final
class Tally:
    """Increments and last-seen times gathered in memory, not yet in the store.

    ``hours`` counts events per ``(project_id, name, hour)``; the daily
    counters are derived from it when the tally is taken, so each event
    costs one dictionary update. ``last_seen`` keeps, per project, each
    profile's latest ``created_at`` (:meth:`seen` gives them in Unix seconds).
    """

    __slots__ = ("events", "hours", "last_seen")

    def __init__(self) -> None:
        self.hours: dict[tuple[str, str, int], int] = {}
        self.last_seen: dict[str, dict[str, datetime]] = {}
        self.events = 0

    def __bool__(self) -> bool:
        return bool(self.hours or self.last_seen)

    def add(self, events: Iterable[Event]) -> None:
        """Count ``events`` (any order; duplicates count as many times as given)."""
        hours = self.hours
        last_seen = self.last_seen
        # The hour of the previous event, as a range: events come mostly in time
        # order, and two comparisons cost less than a timestamp() each.
        start = end = _EPOCH
        hour = 0
        counted = 0
        for event in events:
            at = event.created_at
            if not start <= at < end:
                hour = int(at.timestamp() // HOUR)
                start = datetime.fromtimestamp(hour * HOUR, UTC)
                end = start + _ONE_HOUR
            key = (event.project_id, event.name, hour)
            hours[key] = hours.get(key, 0) + 1
            profile = event.profile_id
            if profile:
                visitors = last_seen.get(event.project_id)
                if visitors is None:
                    visitors = last_seen[event.project_id] = {}
                latest = visitors.get(profile)
                if latest is None or latest < at:
                    visitors[profile] = at
            counted += 1
        self.events += counted

    def seen(self) -> dict[str, dict[str, float]]:
        """Each project's profiles, with their latest ``created_at`` in Unix seconds."""
        return {
            project_id: {profile: at.timestamp() for profile, at in visitors.items()}
            for project_id, visitors in self.last_seen.items()
        }

    def increments(self) -> dict[str, int]:
        """Every counter this tally adds to, by field: hours and their days."""
        found: dict[str, int] = {}
        for (project_id, name, hour), count in self.hours.items():
            start = hour * HOUR
            found[field_of(Bucket(project_id, name, "hour", start))] = count
            day = field_of(Bucket(project_id, name, "day", start - start % DAY))
            found[day] = found.get(day, 0) + count
        return found

    def merge(self, other: Tally) -> None:
        """Add ``other`` into this tally."""
        hours = self.hours
        for key, count in other.hours.items():
            hours[key] = hours.get(key, 0) + count
        for project_id, visitors in other.last_seen.items():
            mine = self.last_seen.setdefault(project_id, {})
            for profile, at in visitors.items():
                latest = mine.get(profile)
                if latest is None or latest < at:
                    mine[profile] = at
        self.events += other.events

    def forget_visitors_before(self, cutoff: float) -> None:
        """Drop visitors last seen at or before ``cutoff``: they no longer count as live."""
        edge = datetime.fromtimestamp(cutoff, UTC)
        for project_id in list(self.last_seen):
            visitors = self.last_seen[project_id]
            for profile in [p for p, at in visitors.items() if at <= edge]:
                del visitors[profile]
            if not visitors:
                del self.last_seen[project_id]

    def keys_held(self) -> int:
        """How many counters and visitors this tally holds (what its memory grows with)."""
        return len(self.hours) + sum(len(visitors) for visitors in self.last_seen.values())


def add_counts(into: dict[str, int], counts: Mapping[str, int]) -> None:
    """Add ``counts`` into ``into``, field by field."""
    for field, count in counts.items():
        into[field] = into.get(field, 0) + count
