"""The pure counting logic: counter fields, the in-memory tally, day fields."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analytics_buffer import Event
from analytics_buffer._counters import (
    DAY,
    HOUR,
    Bucket,
    Tally,
    day_fields,
    day_start,
    field_of,
    parse_field,
)

T0 = datetime(2024, 5, 1, 23, 59, 59, 999000, tzinfo=UTC)


def event(
    name: str = "signup", *, at: datetime = T0, profile: str = "u1", project: str = "p1"
) -> Event:
    return Event(name=name, project_id=project, profile_id=profile, created_at=at)


@given(
    project=st.text(min_size=1),
    name=st.text(min_size=1),
    period=st.sampled_from(["hour", "day"]),
    start=st.integers(0, 2**32),
)
def test_a_field_names_its_counter_unambiguously(
    project: str, name: str, period: str, start: int
) -> None:
    bucket = Bucket(project, name, period, start)  # type: ignore[arg-type]
    assert parse_field(field_of(bucket)) == bucket


@pytest.mark.parametrize("text", ["", "x", "h12", "h12|3:ab|c", "q1|1:a|b", "h1|2:a|b"])
def test_a_string_that_is_no_field_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="field"):
        parse_field(text)


def test_an_event_counts_in_its_utc_hour_and_day() -> None:
    tally = Tally()
    local = T0.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Paris"))
    tally.add([event(at=local), event(at=T0 + timedelta(milliseconds=1))])
    day = day_start(date(2024, 5, 1))
    assert tally.increments() == {
        field_of(Bucket("p1", "signup", "hour", day + 23 * HOUR)): 1,
        field_of(Bucket("p1", "signup", "day", day)): 1,
        field_of(Bucket("p1", "signup", "hour", day + DAY)): 1,
        field_of(Bucket("p1", "signup", "day", day + DAY)): 1,
    }
    assert tally.events == 2


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["p1", "p2"]),
            st.sampled_from(["signup", "click"]),
            st.integers(0, 3 * DAY * 1000),
            st.sampled_from(["", "u1", "u2"]),
        ),
        max_size=60,
    ),
    st.integers(0, 60),
)
def test_a_tally_counts_every_event_once_and_days_are_the_sum_of_their_hours(
    specs: list[tuple[str, str, int, str]], split: int
) -> None:
    events = [
        event(
            name,
            at=datetime(2024, 5, 1, tzinfo=UTC) + timedelta(milliseconds=ms),
            profile=profile,
            project=project,
        )
        for project, name, ms, profile in specs
    ]
    whole, first, second = Tally(), Tally(), Tally()
    whole.add(events)
    first.add(events[:split])
    second.add(events[split:])
    first.merge(second)
    assert first.increments() == whole.increments()
    assert first.seen() == whole.seen()
    increments = whole.increments()
    hours = {parse_field(f): n for f, n in increments.items() if f.startswith("h")}
    days = {parse_field(f): n for f, n in increments.items() if f.startswith("d")}
    assert sum(hours.values()) == sum(days.values()) == len(events)
    for day, count in days.items():
        assert count == sum(
            n
            for hour, n in hours.items()
            if hour[:2] == day[:2] and day.start <= hour.start < day.start + DAY
        )
    for project, profiles in whole.seen().items():
        for profile, at in profiles.items():
            assert at == max(
                e.created_at.timestamp()
                for e in events
                if (e.project_id, e.profile_id) == (project, profile)
            )


def test_visitors_outside_the_window_are_forgotten_at_the_edge() -> None:
    tally = Tally()
    tally.add([event(profile="old", at=T0), event(profile="new", at=T0 + timedelta(seconds=1))])
    tally.forget_visitors_before(T0.timestamp())
    assert tally.seen() == {"p1": {"new": T0.timestamp() + 1}}
    tally.forget_visitors_before(T0.timestamp() + 1)
    assert tally.seen() == {}
    assert tally.keys_held() == 2  # the two hours stay


def test_day_fields_are_the_day_then_its_24_hours() -> None:
    fields = [parse_field(f) for f in day_fields("p1", "signup", date(2024, 5, 1))]
    start = day_start(date(2024, 5, 1))
    assert start == 1714521600
    assert fields[0] == Bucket("p1", "signup", "day", start)
    assert [f.start for f in fields[1:]] == [start + h * HOUR for h in range(24)]
    assert {f.period for f in fields[1:]} == {"hour"}
