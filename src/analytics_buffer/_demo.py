"""The ``demo``: synthetic traffic through the whole pipeline, counted back.

Events are spread over many projects, profiles and sessions with a
realistic mix of names (mostly screen views and clicks, a few signups and
purchases), paths, referrers and properties. Each run tags its project ids
with a run id, so counting back reads only this run's rows, as ClickHouse
reports them, not as the pipeline believes.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
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


def synthetic_events(count: int, run_id: str, *, seed: int = 7) -> Iterator[Event]:
    """Yield ``count`` events of a plausible mix over 50 projects and 20k profiles."""
    rng = random.Random(seed)
    names = [name for name, _ in _NAMES]
    weights = [weight for _, weight in _NAMES]
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    for index in range(count):
        project = f"demo-{run_id}-p{rng.randrange(50)}"
        profile = f"u{rng.randrange(20_000)}"
        name = rng.choices(names, weights)[0]
        path = rng.choice(_PATHS)
        yield Event(
            name=name,
            project_id=project,
            profile_id=profile,
            session_id=f"{profile}-s{rng.randrange(3)}",
            created_at=start + timedelta(milliseconds=index * 3 + rng.randrange(3)),
            path=path,
            origin="https://example.com",
            referrer=rng.choice(_REFERRERS),
            properties={"plan": rng.choice(("free", "pro")), "value": rng.randrange(100)}
            if name in ("purchase", "add_to_cart")
            else {},
        )


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
    async with AnalyticsBuffer(settings) as buffer:
        start = anyio.current_time()
        for done, event in enumerate(synthetic_events(events, run_id), 1):
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
    written, distinct = await _count_back(settings, run_id)
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
    )


async def _count_back(settings: Settings, run_id: str) -> tuple[int, int]:
    from ._engines import create_sink

    sink = create_sink(settings)
    await sink.open()
    try:
        rows = await sink.query(
            f"SELECT count(), uniqExact(id) FROM {settings.table} "
            f"WHERE startsWith(project_id, 'demo-{run_id}-')"
        )
    finally:
        await sink.aclose()
    return int(rows[0][0]), int(rows[0][1])


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
    ]
    return "\n".join(lines)
