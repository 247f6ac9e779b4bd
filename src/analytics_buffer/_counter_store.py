"""Where counters and live visitors live: the store interface and the in-memory store.

A store holds three things:

* **live counters**: field (:func:`~analytics_buffer._counters.field_of`)
  -> count, grown by :meth:`CounterStore.apply`;
* **the staged rollup**: at most one, with its identity. :meth:`CounterStore.stage`
  moves every live counter into it in one atomic step (increments that
  arrive afterwards go to fresh live counters, for the next rollup); the
  rollup writes it to ClickHouse under its identity and then
  :meth:`CounterStore.unstage` clears it. A staged rollup left behind by a
  crash is handed out again by the next ``stage``, so whoever comes next
  finishes it, under the same identity;
* **live visitors**: per project, each profile's latest ``created_at``.

``apply`` is idempotent per ``(writer, seq)``: a writer that does not know
whether its last apply got through sends it again with the same sequence
number, and it counts once.

A read takes a :class:`Snapshot`: live plus staged counts of some fields,
the staged rollup's identity (ClickHouse rows of that rollup must not be
added to it) and the *epoch*, which :meth:`~CounterStore.stage` increments
each time it moves counters. A reader that sees the same epoch after
reading ClickHouse knows no rollup moved counters in between.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol, final

import msgspec

__all__ = ("CounterStore", "MemoryCounterStore", "Snapshot", "Staged")


class Staged(msgspec.Struct, frozen=True, kw_only=True):
    """A rollup moved out of the live counters: its identity and its counts by field."""

    id: str
    counts: dict[str, int]


class Snapshot(NamedTuple):
    """Live plus staged counts of some fields, taken at one instant."""

    counts: dict[str, int]
    """Fields with no count are absent."""
    staged_id: str | None
    epoch: int


class CounterStore(Protocol):
    """Counters and live visitors shared by the CounterActors of one or many instances."""

    async def apply(
        self,
        increments: Mapping[str, int],
        seen: Mapping[str, Mapping[str, float]],
        *,
        writer: str,
        seq: int,
        now: float,
        window: float,
    ) -> None:
        """Add ``increments`` to the live counters and record ``seen`` visitors.

        ``seen`` maps project -> profile -> last seen (Unix seconds); a
        profile's time only moves forward. Visitors last seen at or before
        ``now - window`` may be forgotten. Once applied, the same
        ``(writer, seq)`` (or a lower ``seq``) changes nothing.
        """

    async def active_visitors(self, project_id: str, since: float, until: float) -> int:
        """Profiles of ``project_id`` last seen after ``since`` and at or before ``until``.

        A profile whose latest event is dated after ``until`` (a client clock
        running ahead) counts once its time has come.
        """

    async def stage(self, rollup_id: str) -> Staged | None:
        """Return the staged rollup, staging the live counters as ``rollup_id`` if none is.

        ``None`` when nothing is staged and there is nothing live to stage.
        """

    async def staged(self) -> Staged | None:
        """Return the staged rollup, if any, without staging anything."""

    async def unstage(self, rollup_id: str) -> bool:
        """Clear the staged rollup if it is ``rollup_id``; ``False`` if it was not."""

    async def snapshot(self, fields: Sequence[str]) -> Snapshot:
        """Live plus staged counts of ``fields``, the staged identity and the epoch, atomically."""

    async def epoch(self) -> int:
        """How many times counters have been staged."""

    async def aclose(self) -> None:
        """Release connections."""


@final
class MemoryCounterStore:
    """The single-process store: dictionaries. The embedded default.

    Its counters die with the process, so the CounterActor rolls them up
    into ClickHouse when the buffer stops.
    """

    def __init__(self) -> None:
        self._live: dict[str, int] = {}
        self._staged: Staged | None = None
        self._epoch = 0
        self._applied: dict[str, int] = {}
        self._visitors: dict[str, dict[str, float]] = {}

    async def apply(
        self,
        increments: Mapping[str, int],
        seen: Mapping[str, Mapping[str, float]],
        *,
        writer: str,
        seq: int,
        now: float,
        window: float,
    ) -> None:
        if self._applied.get(writer, -1) >= seq:
            return
        self._applied[writer] = seq
        live = self._live
        for field, count in increments.items():
            live[field] = live.get(field, 0) + count
        cutoff = now - window
        for project_id, profiles in seen.items():
            visitors = self._visitors.setdefault(project_id, {})
            for profile, at in profiles.items():
                if visitors.get(profile, -1.0) < at:
                    visitors[profile] = at
            for profile in [p for p, at in visitors.items() if at <= cutoff]:
                del visitors[profile]

    async def active_visitors(self, project_id: str, since: float, until: float) -> int:
        visitors = self._visitors.get(project_id, {})
        return sum(1 for at in visitors.values() if since < at <= until)

    async def stage(self, rollup_id: str) -> Staged | None:
        if self._staged is None and self._live:
            self._staged = Staged(id=rollup_id, counts=self._live)
            self._live = {}
            self._epoch += 1
        return self._staged

    async def staged(self) -> Staged | None:
        return self._staged

    async def unstage(self, rollup_id: str) -> bool:
        if self._staged is None or self._staged.id != rollup_id:
            return False
        self._staged = None
        return True

    async def snapshot(self, fields: Sequence[str]) -> Snapshot:
        staged = self._staged.counts if self._staged is not None else {}
        counts = {}
        for field in fields:
            count = self._live.get(field, 0) + staged.get(field, 0)
            if count:
                counts[field] = count
        return Snapshot(counts, None if self._staged is None else self._staged.id, self._epoch)

    async def epoch(self) -> int:
        return self._epoch

    async def aclose(self) -> None:
        pass
