"""``RedisCounterStore``: counters and live visitors shared by many instances, on Redis.

It behaves as :class:`~analytics_buffer._counter_store.MemoryCounterStore`
does. Every key carries the one hash tag ``{<prefix>:counters}``, so the
scripts below, which touch several keys, run on one slot (Redis Cluster
included):

===========================================  ======  ======================================
key                                          type    holds
===========================================  ======  ======================================
``{ab:counters}:live``                       HASH    live counters: field -> count
``{ab:counters}:staged``                     HASH    the staged rollup's counters
``{ab:counters}:staged_id``                  STRING  the staged rollup's identity
``{ab:counters}:epoch``                      STRING  how many times counters were staged
``{ab:counters}:applied``                    HASH    writer -> the last ``seq`` applied
``{ab:counters}:visitors:<len>:<project>``   ZSET    profiles scored by last seen (s)
===========================================  ======  ======================================

Counters are the fields of one hash rather than one string key each, so
that staging them is a single ``RENAME`` (constant time, atomic, whatever
their number) instead of a script walking thousands of keys. An apply is
still one ``HINCRBY`` per counter, never one per event.

* ``apply`` is one round trip: one ``EVALSHA`` (the ``HINCRBY`` of every
  counter, skipped entirely when ``(writer, seq)`` was applied already, so
  a retried apply whose first attempt got through counts once) and, per
  project, one ``ZADD GT`` with all the profiles seen, one
  ``ZREMRANGEBYSCORE`` that forgets those outside the window and one
  ``PEXPIRE``.
* ``stage`` is one script: hand out the staged rollup if one is left, or
  ``RENAME`` live to staged, record the identity and increment the epoch.
* ``unstage`` deletes the staged rollup only if it still has the given
  identity (fencing: a slower instance never clears a newer rollup).

Every key has a TTL, renewed by every write: ``retention`` for counters (an
outage of the rollups longer than that loses counts: keep it well above
it), the live window for visitor sets. Redis errors leave as
:class:`~analytics_buffer.StoreUnavailable`; redis-py's own retries are
off, so the CounterActor decides when to retry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, final

import msgspec
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from ._counter_store import Snapshot, Staged
from ._redis import connect, map_exceptions

__all__ = ("RedisCounterStore",)

_APPLY: Final = r"""#!lua
-- KEYS: live, applied. ARGV: writer, seq, ttl_ms, increments (msgpack [field, n, ...])
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '-1')
if last >= tonumber(ARGV[2]) then return 0 end
local flat = cmsgpack.unpack(ARGV[4])
for i = 1, #flat, 2 do
  redis.call('HINCRBY', KEYS[1], flat[i], flat[i + 1])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if #flat > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

_STAGE: Final = r"""#!lua
-- KEYS: live, staged, staged_id, epoch. ARGV: rollup_id, ttl_ms
local id = redis.call('GET', KEYS[3])
if id and redis.call('EXISTS', KEYS[2]) == 1 then
  return {id, redis.call('HGETALL', KEYS[2])}
end
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('INCR', KEYS[4])
redis.call('PEXPIRE', KEYS[4], ARGV[2])
return {ARGV[1], redis.call('HGETALL', KEYS[2])}
"""

_UNSTAGE: Final = r"""#!lua
-- KEYS: staged, staged_id. ARGV: rollup_id
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

_Call = tuple[AsyncScript, Sequence[str], Sequence[str | bytes]]


@final
class RedisCounterStore:
    """The :class:`~analytics_buffer._counter_store.CounterStore` on Redis.

    :param url: a ``redis://`` URL
    :param prefix: the first part of every key's hash tag
    :param retention: seconds counter keys live after their last write
    :param socket_timeout: seconds to wait for a connection or a reply
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "ab",
        retention: float = 604_800.0,
        socket_timeout: float = 5.0,
    ) -> None:
        if retention <= 0:
            raise ValueError(f"retention must be positive, got {retention}")
        self._redis: Redis = connect(url, socket_timeout)
        tag = f"{{{prefix}:counters}}:"
        self._tag = tag
        self._live, self._staged, self._staged_id = tag + "live", tag + "staged", tag + "staged_id"
        self._epoch, self._applied = tag + "epoch", tag + "applied"
        self._ttl_ms = str(max(1, round(retention * 1000)))
        self._encoder = msgspec.msgpack.Encoder()
        self._apply = self._redis.register_script(_APPLY)
        self._stage = self._redis.register_script(_STAGE)
        self._unstage = self._redis.register_script(_UNSTAGE)

    def visitors_key(self, project_id: str) -> str:
        """The key of a project's live visitors."""
        return f"{self._tag}visitors:{len(project_id)}:{project_id}"

    def keys(self) -> dict[str, str]:
        """The fixed keys by role (for tests and operators)."""
        return {
            "live": self._live,
            "staged": self._staged,
            "staged_id": self._staged_id,
            "epoch": self._epoch,
            "applied": self._applied,
        }

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
        """One round trip, whatever the number of counters and visitors.

        :raises StoreUnavailable: Redis cannot be reached; retrying is safe
        """
        flat: list[str | int] = []
        for field, count in increments.items():
            flat += (field, count)
        apply_args: list[str | bytes] = [writer, str(seq), self._ttl_ms, self._encoder.encode(flat)]
        cutoff = now - window
        with map_exceptions("counter apply"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.evalsha(self._apply.sha, 2, self._live, self._applied, *apply_args)
                for project_id, profiles in seen.items():
                    if not profiles:
                        continue
                    key = self.visitors_key(project_id)
                    latest = max(profiles.values())
                    ttl_ms = max(1, round((window + max(0.0, latest - now)) * 1000))
                    pipe.zadd(key, dict(profiles), gt=True)
                    pipe.zremrangebyscore(key, "-inf", repr(cutoff))
                    pipe.pexpire(key, ttl_ms)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
            if isinstance(replies[0], redis_errors.NoScriptError):
                self._apply.sha = await self._redis.script_load(_APPLY)
                replies[0] = await self._redis.evalsha(
                    self._apply.sha, 2, self._live, self._applied, *apply_args
                )
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply

    async def active_visitors(self, project_id: str, since: float, until: float) -> int:
        """One ``ZCOUNT``.

        :raises StoreUnavailable: Redis cannot be reached
        """
        key = self.visitors_key(project_id)
        with map_exceptions("active visitors"):
            count = await self._redis.zcount(key, f"({since!r}", repr(until))
        return int(count)

    async def stage(self, rollup_id: str) -> Staged | None:
        """:raises StoreUnavailable: Redis cannot be reached; retrying is safe"""
        keys = [self._live, self._staged, self._staged_id, self._epoch]
        with map_exceptions("counter stage"):
            reply = await self._script(self._stage, _STAGE, keys, [rollup_id, self._ttl_ms])
        return _staged(reply[0], reply[1]) if reply else None

    async def staged(self) -> Staged | None:
        """:raises StoreUnavailable: Redis cannot be reached"""
        with map_exceptions("counter staged"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(self._staged_id)
                pipe.hgetall(self._staged)
                staged_id, counts = await pipe.execute()
        if staged_id is None or not counts:
            return None
        return Staged(id=staged_id.decode(), counts=_counts(counts.items()))

    async def unstage(self, rollup_id: str) -> bool:
        """:raises StoreUnavailable: Redis cannot be reached; retrying is safe"""
        keys = [self._staged, self._staged_id]
        with map_exceptions("counter unstage"):
            cleared = await self._script(self._unstage, _UNSTAGE, keys, [rollup_id])
        return bool(cleared)

    async def snapshot(self, fields: Sequence[str]) -> Snapshot:
        """One ``MULTI``: live and staged counts, staged identity, epoch.

        :raises StoreUnavailable: Redis cannot be reached
        """
        with map_exceptions("counter snapshot"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hmget(self._live, list(fields))
                pipe.hmget(self._staged, list(fields))
                pipe.get(self._staged_id)
                pipe.get(self._epoch)
                live, staged, staged_id, epoch = await pipe.execute()
        counts: dict[str, int] = {}
        for field, in_live, in_staged in zip(fields, live, staged, strict=True):
            count = int(in_live or 0) + (int(in_staged or 0) if staged_id is not None else 0)
            if count:
                counts[field] = count
        return Snapshot(counts, None if staged_id is None else staged_id.decode(), int(epoch or 0))

    async def epoch(self) -> int:
        """:raises StoreUnavailable: Redis cannot be reached"""
        with map_exceptions("counter epoch"):
            value = await self._redis.get(self._epoch)
        return int(value or 0)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._redis.aclose()

    async def _script(
        self, script: AsyncScript, source: str, keys: Sequence[str], args: Sequence[str]
    ) -> Any:
        try:
            return await self._redis.evalsha(script.sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            script.sha = await self._redis.script_load(source)
            return await self._redis.evalsha(script.sha, len(keys), *keys, *args)


def _counts(pairs: Any) -> dict[str, int]:
    return {field.decode(): int(count) for field, count in pairs}


def _staged(raw_id: bytes, flat: list[bytes]) -> Staged:
    pairs = zip(flat[::2], flat[1::2], strict=True)
    return Staged(id=raw_id.decode(), counts=_counts(pairs))
