"""The ``demo``: synthetic traffic through the whole pipeline, counted back.

Events are spread over many projects, profiles and sessions with a
realistic mix of names (mostly screen views and clicks, a few signups and
purchases), paths, referrers and properties; sessions end with a
session_end, so screen views get their durations. Each run tags its project ids
with a run id, so counting back reads only this run's rows, as ClickHouse
reports them, not as the pipeline believes.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Final, TextIO

import anyio
import anyio.lowlevel
import msgspec

from ._client import AnalyticsBuffer
from ._event import Event, new_event_id
from ._settings import Settings

__all__ = ("DemoSummary", "run_demo", "synthetic_events")

_NAMES: Final = (
    ("screen_view", 50),
    ("click", 30),
    ("scroll", 10),
    ("signup", 4),
    ("add_to_cart", 4),
    ("purchase", 2),
)
_PATHS: Final = ("/", "/pricing", "/docs", "/docs/start", "/blog", "/signup", "/cart", "/checkout")
_REFERRERS: Final = ("", "", "https://www.google.com/", "https://news.ycombinator.com/", "")


class DemoSummary(msgspec.Struct, frozen=True, kw_only=True):
    """What the demo measured; ``written`` is counted back from ClickHouse."""

    engine: str
    accepted: int
    written: int
    distinct_written: int
    dropped: int
    rejected: int
    dead_lettered: int
    flushes: int
    retries: int
    seconds: float
    events_per_s: float
    sessions_ended: int
    """session_end rows in ClickHouse."""
    screen_views_with_duration: int
    """screen_view rows in ClickHouse with a duration above 0."""
    active_visitors: int
    """Live visitors of the demo's projects at the end, summed over projects."""
    counted_events: int
    """The counters of the demo's events summed over projects, names and days
    (read back with ``count``): equals ``accepted``."""


def synthetic_events(count: int, run_id: str, *, seed: int = 7) -> Iterator[Event]:
    """Yield ``count`` events of a plausible mix: 2,000 sessions open at a time.

    Visitors of 50 projects (20k profiles) view pages, click and scroll; a few
    sign up or buy; each session closes with a session_end after a few dozen
    events, and every session still open at the end is closed too, so nothing
    is left pending.
    """
    rng = random.Random(seed)
    names = [name for name, _ in _NAMES]
    weights = [weight for _, weight in _NAMES]
    # Events are ~2 ms apart: the last ones are a few seconds old, so they count as live.
    clock = datetime.now(UTC).replace(microsecond=0) - timedelta(milliseconds=2 * count + 5000)
    open_sessions = [_new_session(rng, run_id, n) for n in range(max(1, min(2000, count // 20)))]
    started = len(open_sessions)
    for produced in range(count):
        clock += timedelta(milliseconds=rng.randrange(1, 4))
        if count - produced <= len(open_sessions):
            # Only room left to close every open session.
            yield open_sessions.pop().event("session_end", clock, "")
            continue
        slot = rng.randrange(len(open_sessions))
        session = open_sessions[slot]
        if session.remaining == 0:
            yield session.event("session_end", clock, "")
            open_sessions[slot] = _new_session(rng, run_id, started)
            started += 1
        else:
            name = rng.choices(names, weights)[0]
            yield session.event(name, clock, rng.choice(_PATHS) if name == "screen_view" else "")
            session.remaining -= 1


class _Visit:
    """One simulated session."""

    def __init__(self, project: str, profile: str, session: str, length: int) -> None:
        self.project, self.profile, self.session = project, profile, session
        self.remaining = length
        self.referrer = ""

    def event(self, name: str, created_at: datetime, path: str) -> Event:
        return Event(
            name=name,
            project_id=self.project,
            profile_id=self.profile,
            session_id=self.session,
            created_at=created_at,
            path=path,
            origin="https://example.com" if path else "",
            referrer=self.referrer if name == "screen_view" else "",
            properties={"plan": "pro", "value": 42} if name in ("purchase", "add_to_cart") else {},
        )


def _new_session(rng: random.Random, run_id: str, number: int) -> _Visit:
    profile = f"u{rng.randrange(20_000)}"
    visit = _Visit(f"demo-{run_id}-p{rng.randrange(50)}", profile, f"{profile}-{number}", 0)
    visit.remaining = rng.randrange(5, 60)
    visit.referrer = rng.choice(_REFERRERS)
    return visit


class _Progress:
    """A one-line progress bar on a terminal; a few plain lines elsewhere."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self._total = max(total, 1)
        self._stream = stream
        self._tty = stream.isatty()
        self._shown = -1

    def update(self, done: int, written: int) -> None:
        percent = done * 100 // self._total
        step = 1 if self._tty else 25
        if percent // step == self._shown // step and done < self._total:
            return
        self._shown = percent
        bar = "#" * (percent // 4) + "." * (25 - percent // 4)
        line = f"[{bar}] {percent:3d}%  tracked {done}/{self._total}  written {written}"
        self._stream.write(("\r" + line) if self._tty else line + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


async def run_demo(
    settings: Settings, events: int, *, progress: TextIO | None = sys.stderr
) -> DemoSummary:
    """Track ``events`` synthetic events, flush, and count them back."""
    run_id = new_event_id().hex[:8]
    bar = _Progress(events, progress) if progress is not None else None
    projects: set[str] = set()
    days: set[date] = set()
    async with AnalyticsBuffer(settings) as buffer:
        start = anyio.current_time()
        for done, event in enumerate(synthetic_events(events, run_id), 1):
            projects.add(event.project_id)
            days.add(event.created_at.date())
            # put waits for room instead of dropping when the writer is behind.
            await buffer.put(event)
            if done % 1000 == 0:
                # A service yields between requests; so does this producer.
                await anyio.lowlevel.checkpoint()
                if bar is not None:
                    bar.update(done, buffer.stats().written)
        await buffer.flush()
        seconds = anyio.current_time() - start
        stats = buffer.stats()
        if bar is not None:
            bar.update(events, stats.written)
            bar.close()
        active = 0
        counted = 0
        for project in sorted(projects):
            active += await buffer.active_visitors(project)
            for name in (*(name for name, _ in _NAMES), "session_end"):
                for day in sorted(days):
                    counted += await buffer.count(project, name, day)
    written, distinct, ended, with_duration = await _count_back(settings, run_id)
    return DemoSummary(
        engine="clickhouse" if settings.clickhouse_url else "embedded (chdb)",
        accepted=stats.accepted,
        written=written,
        distinct_written=distinct,
        dropped=stats.dropped,
        rejected=stats.rejected,
        dead_lettered=stats.dead_lettered,
        flushes=stats.flushes,
        retries=stats.retries,
        seconds=round(seconds, 3),
        events_per_s=round(stats.accepted / seconds, 1) if seconds > 0 else 0.0,
        sessions_ended=ended,
        screen_views_with_duration=with_duration,
        active_visitors=active,
        counted_events=counted,
    )


async def _count_back(settings: Settings, run_id: str) -> tuple[int, int, int, int]:
    from ._engines import create_sink

    sink = create_sink(settings)
    await sink.open()
    try:
        rows = await sink.query(
            "SELECT count(), uniqExact(id), countIf(name = 'session_end'), "
            "countIf(name = 'screen_view' AND duration > 0) "
            f"FROM {settings.table} "
            f"WHERE startsWith(project_id, 'demo-{run_id}-')"
        )
    finally:
        await sink.aclose()
    written, distinct, ended, with_duration = (int(value) for value in rows[0])
    return written, distinct, ended, with_duration


def format_summary(summary: DemoSummary) -> str:
    """Render the summary for people."""
    lines = [
        f"engine          {summary.engine}",
        f"accepted        {summary.accepted}",
        f"written         {summary.written} (counted back, {summary.distinct_written} distinct)",
        f"dropped         {summary.dropped}",
        f"rejected        {summary.rejected}",
        f"dead-lettered   {summary.dead_lettered}",
        f"flushes         {summary.flushes}",
        f"retries         {summary.retries}",
        f"seconds         {summary.seconds}",
        f"events/s        {summary.events_per_s}",
        f"sessions ended  {summary.sessions_ended}",
        f"screen views    {summary.screen_views_with_duration} with a duration",
        f"live visitors   {summary.active_visitors}",
        f"counted events  {summary.counted_events} (counters read back)",
    ]
    return "\n".join(lines)
