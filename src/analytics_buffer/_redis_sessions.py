"""``RedisSessionStore``: the session store shared by many instances, on Redis.

It behaves as :class:`~analytics_buffer._session_store.MemorySessionStore`
does, with claims made exclusive by a lease, so several service instances
share the sessions. It needs Redis 7.0 or later (the scripts' ``#!lua``
flags, ``SMISMEMBER``, ``ZADD GT``).

Key layout. A session's key string is ``<len(project_id)>:<project_id>:<session_id>``
(unambiguous whatever the ids contain), and its shard is
:func:`~analytics_buffer._session_store.shard_of`. All keys of shard ``k``
carry the hash tag ``{<prefix>:<k>}``, so each script touches one slot and
the layout fits Redis Cluster (the client here is a plain
``redis.asyncio.Redis``: one server, or a proxy in front of a cluster):

=====================================  ======  ==============================================
key                                    type    holds
=====================================  ======  ==============================================
``{ab:k}:state:<session>``             HASH    the session's state, and its events by id:
                                               pending ones, and empty fields for the
                                               written ones (see :mod:`._redis_scripts`)
``{ab:k}:history:<session>``           ZSET    msgpack ScreenViewMarks by ``created_ms``,
                                               the latest ``MAX_HISTORY``
``{ab:k}:written:<session>``           SET     ids written, moved out of a long session's
                                               state hash (past ``COMPACT_AT`` fields)
``{ab:k}:index``                       ZSET    open sessions, scored by ``last_seen`` (s)
``{ab:k}:ended``                       ZSET    ended sessions, scored by ``last_seen``
``{ab:k}:dirty``                       SET     sessions with new pending events
``{ab:k}:inflight``                    SET     the dirty sessions handed to the live claim
``{ab:k}:claim``                       STRING  the claim's token, with the lease as ``PX``
``{ab:k}:done``                        STRING  the token of the last completed claim
``{ab:lsv}:<len>:<project>:<profile>`` STRING  the profile's last screen_view:
                                               ``<created_ms, 13 digits>|<msgpack Event>``
=====================================  ======  ==============================================

The state is a hash of plain fields, merged by the scripts (min, max, first
non-empty) without decoding anything. Pending events and written ids live
in the same hash (ids as their 16 bytes) because each call a script makes
to Redis costs more than the Lua around it: one ``HMGET`` reads the state
and tells, for each new id, whether it is pending already or written; one
``HSET`` stores it all. Every key expires ``retention`` seconds after it was
last written; a session's keys are renewed together, by an add, at most
every ``retention / 100`` seconds (so they expire together). All
last-screen-view keys share one slot, so one call per
:meth:`~RedisSessionStore.add` updates them.

Scripts (:mod:`._redis_scripts`), registered once and run by ``EVALSHA``;
a script the server lost (restart, ``SCRIPT FLUSH``) is loaded and only the
calls that missed it are sent again:

* ``add``: one call per touched shard (split to bound its run time), all in
  one pipeline with the last-screen-view update: one round trip per
  :meth:`~RedisSessionStore.add`. Running it twice changes nothing more, so
  a caller may retry it.
* ``claim``: takes the shard (``SET claim PX`` after checking it is free,
  atomically, and only when the shard has work), up to ``claim_size`` dirty
  sessions (moved to ``inflight``) and idle ones, with their pending events.
  The sessions of a claim whose lease ran out before ``complete`` are dirty
  again for the next one.
* ``complete``: fenced by the token; applies the outcomes, releases the
  claim and records the token in ``done``, so a retried complete whose first
  attempt got through still answers ``True``.
* ``cleanup``: removes ended, stale sessions that have nothing pending.

Pending events come back in arrival order (the first arrival of an id keeps
its place), as from the in-memory store. Redis errors leave as
:class:`~analytics_buffer.StoreUnavailable` (:func:`map_exceptions`);
redis-py's own retries are off, so the caller decides when to retry.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, cast, final

import msgspec
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from . import _redis_scripts as scripts
from ._event import Event
from ._exceptions import StoreUnavailable
from ._session_store import Claim, SessionKey, SessionOutcome, SessionWork, shard_of
from ._sessions import (
    MAX_HISTORY,
    SCREEN_VIEW,
    SESSION_END,
    ScreenViewMark,
    SessionState,
    epoch_ms,
)

__all__ = ("RedisSessionStore", "map_exceptions", "session_key")

_SCRIPT_EVENTS: Final = 2048
"""Sessions plus events per ``add`` script call: bounds how long one call blocks Redis."""
_CLEANUP_BATCH: Final = 1000
_SESSION_EVENTS: Final = frozenset((SCREEN_VIEW, SESSION_END))
_STR8: Final = [b"\xd9" + bytes((size,)) for size in range(256)]
_ID_HEAD: Final = _STR8[16]
_Call = tuple[AsyncScript, Sequence[str], Sequence[str | bytes]]


@contextmanager
def map_exceptions(action: str) -> Iterator[None]:
    """Turn redis-py's errors into :class:`~analytics_buffer.StoreUnavailable`.

    Connection failures, timeouts, a server still loading its data
    (``BusyLoadingError``) are what the name says. Other server errors (a
    full memory, a read-only replica, a key of the wrong type) are wrapped
    too, so no driver error leaves the adapter; the message says which.

    :param action: what was being done, for the message
    """
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        raise StoreUnavailable(f"redis unreachable during {action}: {exc}") from exc
    except redis_errors.RedisError as exc:
        raise StoreUnavailable(f"redis refused {action}: {exc}") from exc


def session_key(key: SessionKey) -> str:
    """The string that names a session inside its shard's keys."""
    project_id, session_id = key
    return f"{len(project_id)}:{project_id}:{session_id}"


def _parse_session_key(raw: bytes) -> SessionKey:
    length, _, rest = raw.decode().partition(":")
    size = int(length)
    return rest[:size], rest[size + 1 :]


def _lua_str(data: bytes) -> msgspec.Raw:
    """``data`` as a msgpack ``str``: the cmsgpack in Redis cannot read ``bin``."""
    size = len(data)
    if size < 256:
        return msgspec.Raw(_STR8[size] + data)
    if size < 65536:
        return msgspec.Raw(b"\xda" + size.to_bytes(2) + data)
    return msgspec.Raw(b"\xdb" + size.to_bytes(4) + data)


def _id_bytes(event_id: str) -> bytes:
    # Outcomes carry str(uuid); fields hold the 16 bytes.
    return bytes.fromhex(event_id.replace("-", ""))


@final
class RedisSessionStore:
    """The :class:`~analytics_buffer._session_store.SessionStore` on Redis.

    :param url: a ``redis://`` URL
    :param prefix: the first part of every key's hash tag
    :param shards: how many shards sessions are spread over: the unit of
        claims (every instance must use the same number)
    :param retention: seconds every key lives after it was last written
    :param socket_timeout: seconds to wait for a connection or a reply
    :param claim_size: at most this many sessions per claim; the rest of a
        shard's work stays for the next claim
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "ab",
        shards: int = 16,
        retention: float = 86400.0,
        socket_timeout: float = 5.0,
        claim_size: int = 1000,
    ) -> None:
        if shards < 1 or claim_size < 1 or retention <= 0:
            raise ValueError("shards and claim_size must be >= 1, retention > 0")
        self._redis: Redis = Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._shards = shards
        self._ttl_ms = str(max(1, round(retention * 1000)))
        self._renew = repr(retention / 100)
        self._claim_size = str(claim_size)
        self._tags = [f"{{{prefix}:{shard}}}:" for shard in range(shards)]
        self._lsv_tag = f"{{{prefix}:lsv}}:"
        self._encoder = msgspec.msgpack.Encoder()
        self._event_decoder = msgspec.msgpack.Decoder(Event)
        self._mark_decoder = msgspec.msgpack.Decoder(ScreenViewMark)
        self._add = self._redis.register_script(scripts.ADD)
        self._last_screen_view = self._redis.register_script(scripts.LAST_SCREEN_VIEW)
        self._claim = self._redis.register_script(scripts.CLAIM)
        self._complete = self._redis.register_script(scripts.COMPLETE)
        self._cleanup = self._redis.register_script(scripts.CLEANUP)
        self._rotation = int.from_bytes(os.urandom(2))

    def shard_keys(self, shard: int) -> dict[str, str]:
        """The fixed keys of ``shard`` by role (for tests and operators)."""
        tag = self._tags[shard]
        roles = ("index", "ended", "dirty", "inflight", "claim", "done")
        return {role: tag + role for role in roles}

    def session_keys(self, key: SessionKey) -> dict[str, str]:
        """The keys of one session by role (for tests and operators)."""
        tag, name = self._tags[shard_of(key, self._shards)], session_key(key)
        return {role: f"{tag}{role}:{name}" for role in ("state", "history", "written")}

    def last_screen_view_key(self, project_id: str, profile_id: str) -> str:
        """The key of a profile's last screen_view."""
        return f"{self._lsv_tag}{len(project_id)}:{project_id}:{profile_id}"

    async def add(self, events: Sequence[Event], now: float) -> None:
        """Record events that carry a session_id, arrived at wall-clock ``now``.

        One round trip whatever the number of events.

        :raises StoreUnavailable: Redis cannot be reached; retrying is safe
        """
        if not events:
            return
        # Coalesce per session: [first_ms, last_ms, profile_id, {id: (event, created_ms)}]
        sessions: dict[SessionKey, list[Any]] = {}
        latest: dict[tuple[str, str], tuple[int, bytes]] = {}
        for event in events:
            key = (event.project_id, event.session_id)
            created = epoch_ms(event.created_at)
            batch = sessions.get(key)
            if batch is None:
                batch = sessions[key] = [created, created, event.profile_id, {}]
            else:
                if created < batch[0]:
                    batch[0] = created
                elif created > batch[1]:
                    batch[1] = created
                if not batch[2]:
                    batch[2] = event.profile_id
            name = event.name
            if key[1] and name in _SESSION_EVENTS:
                event_id = event.id.bytes
                batch[3][event_id] = (event, created)
                if name == SCREEN_VIEW:
                    profile = (key[0], event.profile_id)
                    known = latest.get(profile)
                    if known is None or known[0] <= created:
                        latest[profile] = (created, event_id)
        payloads: dict[bytes, bytes] = {}
        calls = self._add_calls(sessions, repr(float(now)), payloads)
        if latest:
            views = [
                (
                    f"{len(project_id)}:{project_id}:{profile_id}",
                    _lua_str(b"%013d|" % created + payloads[event_id]),
                )
                for (project_id, profile_id), (created, event_id) in latest.items()
            ]
            args: list[str | bytes] = [self._ttl_ms, self._encoder.encode(views)]
            calls.append((self._last_screen_view, [self._lsv_tag], args))
        with map_exceptions("add"):
            await self._run(calls)

    def _add_calls(
        self, sessions: dict[SessionKey, list[Any]], now: str, payloads: dict[bytes, bytes]
    ) -> list[_Call]:
        """One ``add`` script call per shard (or part of one), filling ``payloads``."""
        encode = self._encoder.encode
        by_shard: dict[int, list[list[Any]]] = {}
        for key, (first, last, profile, pending) in sessions.items():
            record: list[Any] = [session_key(key), str(first), str(last), profile]
            for event_id, (event, created) in pending.items():
                payload = payloads[event_id] = encode(event)
                # Ids are 16 bytes: their msgpack str header is fixed.
                raw_id = msgspec.Raw(_ID_HEAD + event_id)
                if event.name == SCREEN_VIEW:
                    mark = encode((created, event.id, event.path, event.origin))
                    record += (raw_id, _lua_str(payload), str(created), _lua_str(mark))
                else:
                    record += (raw_id, _lua_str(payload), "", "")
            by_shard.setdefault(shard_of(key, self._shards), []).append(record)
        calls: list[_Call] = []
        for shard, records in by_shard.items():
            tag = self._tags[shard]
            keys = [tag + "index", tag + "dirty", tag + "ended"]
            head = [tag, now, self._ttl_ms, self._renew, str(MAX_HISTORY)]
            # Split so that one call does not block Redis for long.
            chunk: list[list[Any]] = []
            size = 0
            for record in records:
                chunk.append(record)
                size += len(record) // 4
                if size >= _SCRIPT_EVENTS:
                    calls.append((self._add, keys, [*head, encode(chunk)]))
                    chunk, size = [], 0
            if chunk:
                calls.append((self._add, keys, [*head, encode(chunk)]))
        return calls

    async def claim(
        self, owner: str, now: float, *, timeout: float, lease: float, limit: int
    ) -> list[Claim]:
        """Claim up to ``limit`` shards that have work, for ``lease`` seconds.

        A shard has work when it holds dirty sessions or open sessions last
        seen at or before ``now - timeout`` (returned with ``idle=True``).
        The lease runs on the Redis server's clock.

        :raises StoreUnavailable: Redis cannot be reached
        """
        if limit < 1:
            return []
        idle_before = now - timeout
        # Start at a rotating shard so that instances spread over the shards.
        start = self._rotation % self._shards
        self._rotation += 1
        shards = [(start + step) % self._shards for step in range(self._shards)]
        lease_ms = str(max(1, round(lease * 1000)))
        found: list[Claim] = []
        with map_exceptions("claim"):
            if limit < self._shards:
                shards = await self._shards_with_work(shards, idle_before)
            while shards and len(found) < limit:
                batch, shards = shards[: limit - len(found)], shards[limit - len(found) :]
                tokens = [f"{owner}:{os.urandom(8).hex()}" for _ in batch]
                calls: list[_Call] = []
                for shard, token in zip(batch, tokens, strict=True):
                    tag = self._tags[shard]
                    keys = [tag + "claim", tag + "dirty", tag + "index", tag + "inflight"]
                    args = [token, lease_ms, repr(idle_before), self._claim_size, tag, self._ttl_ms]
                    calls.append((self._claim, keys, args))
                replies = await self._run(calls)
                for shard, token, reply in zip(batch, tokens, replies, strict=True):
                    if reply:
                        sessions = [
                            self._work(reply[at], reply[at + 1], idle_before)
                            for at in range(0, len(reply), 2)
                        ]
                        found.append(Claim(shard=shard, token=token, sessions=sessions))
        found.sort(key=lambda claim: claim.shard)
        return found

    async def _shards_with_work(self, shards: list[int], idle_before: float) -> list[int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                tag = self._tags[shard]
                pipe.exists(tag + "claim")
                pipe.scard(tag + "dirty")
                pipe.scard(tag + "inflight")
                pipe.zcount(tag + "index", "-inf", repr(idle_before))
            replies = await pipe.execute()
        return [
            shard
            for at, shard in enumerate(shards)
            if not replies[4 * at] and any(replies[4 * at + 1 : 4 * at + 4])
        ]

    def _work(self, raw_key: bytes, flat: list[bytes], idle_before: float) -> SessionWork:
        project_id, session_id = _parse_session_key(raw_key)
        fields: dict[bytes, bytes] = {}
        ordered: list[tuple[int, bytes]] = []
        for at in range(0, len(flat), 2):
            name, value = flat[at], flat[at + 1]
            if len(name) == 1:
                fields[name] = value
            elif value:  # pending; an empty value marks a written id
                order, _, payload = value.partition(b"|")
                ordered.append((int(order), payload))
        ordered.sort(key=lambda pair: pair[0])
        state = SessionState(
            project_id=project_id,
            session_id=session_id,
            profile_id=fields[b"p"].decode(),
            first_ms=int(fields[b"f"]),
            last_activity_ms=int(fields[b"l"]),
            last_seen=float(fields[b"s"]),
            screen_views=int(fields[b"v"]),
            ended=fields[b"e"] == b"1",
        )
        decode = self._event_decoder.decode
        return SessionWork(
            key=(project_id, session_id),
            state=state,
            pending=[decode(payload) for _, payload in ordered],
            idle=not state.ended and state.last_seen <= idle_before,
        )

    async def complete(self, claim: Claim, outcomes: Sequence[SessionOutcome]) -> bool:
        """Apply ``outcomes`` and release ``claim``; ``False`` if the claim had expired.

        Fenced by the claim's token: when another claimer holds the shard now,
        nothing is applied. It stores what settling decides (``screen_views``,
        ``ended``, the written ids); the activity fields (first and last
        activity, last seen, profile) are kept by :meth:`add`, so what other
        instances added meanwhile is never overwritten. A session never
        returns from ended.

        :raises ValueError: an outcome's session is not in the claim's shard
        :raises StoreUnavailable: Redis cannot be reached; retrying is safe
        """
        records = []
        for outcome in outcomes:
            if shard_of(outcome.key, self._shards) != claim.shard:
                raise ValueError(f"session {outcome.key!r} is not in shard {claim.shard}")
            state = outcome.state
            records.append(
                [
                    session_key(outcome.key),
                    str(state.screen_views),
                    state.ended,
                    *(msgspec.Raw(_ID_HEAD + _id_bytes(event_id)) for event_id in outcome.written),
                ]
            )
        tag = self._tags[claim.shard]
        keys = [tag + role for role in ("claim", "index", "ended", "inflight", "done")]
        args: list[str | bytes] = [claim.token, tag, self._ttl_ms, self._encoder.encode(records)]
        with map_exceptions("complete"):
            (applied,) = await self._run([(self._complete, keys, args)])
        return bool(applied)

    async def history(self, keys: Sequence[SessionKey]) -> dict[SessionKey, list[ScreenViewMark]]:
        """The screen_view history of each session that exists, oldest first.

        :raises StoreUnavailable: Redis cannot be reached
        """
        if not keys:
            return {}
        with map_exceptions("history"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    tag, name = self._tags[shard_of(key, self._shards)], session_key(key)
                    pipe.exists(f"{tag}state:{name}")
                    pipe.zrange(f"{tag}history:{name}", 0, -1)
                replies = await pipe.execute()
        decode = self._mark_decoder.decode
        return {
            key: [decode(member) for member in replies[2 * at + 1]]
            for at, key in enumerate(keys)
            if replies[2 * at]
        }

    async def last_screen_view(self, project_id: str, profile_id: str) -> Event | None:
        """The latest screen_view (by ``created_at``) of a profile.

        :raises StoreUnavailable: Redis cannot be reached
        """
        with map_exceptions("last_screen_view"):
            # decode_responses is off: replies are bytes.
            raw = cast(
                "bytes | None",
                await self._redis.get(self.last_screen_view_key(project_id, profile_id)),
            )
        return None if raw is None else self._event_decoder.decode(memoryview(raw)[14:])

    async def cleanup(self, now: float, retention: float) -> int:
        """Forget ended sessions last seen before ``now - retention``; return how many.

        Sessions that still hold pending events are kept.

        :raises StoreUnavailable: Redis cannot be reached
        """
        cutoff = repr(float(now - retention))
        offsets = dict.fromkeys(range(self._shards), 0)
        removed = 0
        with map_exceptions("cleanup"):
            while offsets:
                calls: list[_Call] = []
                for shard, offset in offsets.items():
                    tag = self._tags[shard]
                    keys = [tag + "ended", tag + "index", tag + "dirty"]
                    args = [tag, cutoff, str(offset), str(_CLEANUP_BATCH)]
                    calls.append((self._cleanup, keys, args))
                replies = await self._run(calls)
                for (shard, offset), (gone, examined) in zip(
                    list(offsets.items()), replies, strict=True
                ):
                    removed += gone
                    if examined < _CLEANUP_BATCH:
                        del offsets[shard]
                    else:
                        offsets[shard] = offset + examined - gone
        return removed

    async def aclose(self) -> None:
        """Close the connections."""
        await self._redis.aclose()

    async def _run(self, calls: Sequence[_Call]) -> list[Any]:
        """Run script calls in one pipeline; load and resend those the server lacked."""
        replies = await self._pipeline(calls)
        missing = [
            at for at, reply in enumerate(replies) if isinstance(reply, redis_errors.NoScriptError)
        ]
        if missing:
            for script in {id(calls[at][0]): calls[at][0] for at in missing}.values():
                script.sha = await self._redis.script_load(script.script)
            again = await self._pipeline([calls[at] for at in missing])
            for at, reply in zip(missing, again, strict=True):
                replies[at] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _pipeline(self, calls: Sequence[_Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for script, keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies
