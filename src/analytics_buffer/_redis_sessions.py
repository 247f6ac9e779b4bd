"""``RedisSessionStore``: the session store shared by many instances, on Redis.

It behaves as :class:`~analytics_buffer._session_store.MemorySessionStore`
does, with claims made exclusive by a lease, so several service instances
share the sessions. It needs Redis 7.0 or later (the scripts' ``#!lua``
flags, ``SMISMEMBER``).

Key layout. A session's key string is ``<len(project_id)>:<project_id>:<session_id>``
(unambiguous whatever the ids contain), and its shard is
:func:`~analytics_buffer._session_store.shard_of`. All keys of shard ``k``
carry the hash tag ``{<prefix>:<k>}``, so each script touches one slot and
the layout fits Redis Cluster (the client here is a plain
``redis.asyncio.Redis``: one server, or a proxy in front of a cluster):

=====================================  ======  ==============================================
key                                    type    holds
=====================================  ======  ==============================================
``{ab:k}:inbox``                       LIST    what adds brought and no claim merged yet:
                                               one entry per add (and shard), the add's
                                               events grouped by session
``{ab:k}:sessions``                    HASH    one packed value per session: its state,
                                               pending events, written ids (the latest
                                               ``INLINE_WRITTEN``) and screen_view history
``{ab:k}:written:<session>``           SET     older written ids of a long session
``{ab:k}:index``                       ZSET    open sessions, scored by ``last_seen`` (s)
``{ab:k}:ended``                       ZSET    ended sessions, scored by ``last_seen``
``{ab:k}:claim``                       STRING  the claim's token, with the lease as ``PX``
``{ab:k}:done``                        STRING  the token of the last completed claim
``{ab:lsv}:<len>:<project>:<profile>`` STRING  the profile's last screen_view:
                                               ``<created_ms, 13 digits>|<msgpack Event>``
=====================================  ======  ==============================================

Why this shape: Redis runs one command at a time on one core, and every
command (from a pipeline or from Lua) costs about a microsecond, more than
copying a few hundred bytes. So an add costs O(1) commands per shard
(``RPUSH`` of one packed entry), whatever its number of events and sessions,
and the claim holder does the merging (min/max of the bounds, dedup by id,
arrival order, history) in Python, where it reads and writes each touched
session's value once per claim (one ``HMGET`` and one ``HSET`` per shard).
Only the holder of a shard's claim writes its ``sessions`` hash and trims
its inbox, so the merge needs no lock beyond the claim.

Scripts (:mod:`._redis_scripts`), registered once and run by ``EVALSHA``;
a script the server lost (restart, ``SCRIPT FLUSH``) is loaded and only the
calls that missed it are sent again:

* ``add``: per shard, ``RPUSH`` of the add's entries, in one pipeline with
  the last-screen-view update: one round trip per
  :meth:`~RedisSessionStore.add`. Running it twice changes nothing more
  (ids already pending or written are recognised at the merge), so a caller
  may retry it.
* ``claim``: takes the shard (``SET claim PX`` after checking it is free,
  atomically, and only when the shard has work) and returns inbox entries
  from its head (up to ``claim_size`` events; those this store added and
  still holds decoded come back as their heads alone) and, when the whole
  inbox is taken, idle sessions. Nothing is removed: a claim whose lease runs out
  before ``complete`` leaves everything for the next one.
* ``complete``: fenced by the token; writes the merged, settled sessions,
  trims the entries the claim merged, releases the claim and records the
  token in ``done``, so a retried complete whose first attempt got through
  still answers ``True``.
* ``cleanup``: removes ended, stale sessions that have nothing pending
  (skipping a claimed shard, whose holder may write them back).

Every key expires ``retention`` seconds after it was last written (the
``sessions`` hash, index and inbox are renewed by every add or complete);
stale sessions inside them are removed by ``cleanup``.

Redis errors leave as :class:`~analytics_buffer.StoreUnavailable`
(:func:`map_exceptions`); redis-py's own retries are off, so the caller
decides when to retry.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from typing import Any, Final, cast, final

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from . import _redis_scripts as scripts
from ._event import Event
from ._redis import connect, map_exceptions
from ._redis_merge import (
    ENCODER,
    ENTRY_DECODER,
    EVENT_DECODER,
    INLINE_WRITTEN,
    STORED_DECODER,
    Entry,
    Held,
    Merged,
    changes,
    decode_history,
    last_screen_views,
    load,
    lua_str,
    merge_groups,
)
from ._session_store import Claim, SessionKey, SessionOutcome, shard_of
from ._sessions import (
    MAX_HISTORY,
    SCREEN_VIEW,
    ScreenViewMark,
    epoch_ms,
)

__all__ = ("INLINE_WRITTEN", "RedisSessionStore", "session_key")

_CLEANUP_BATCH: Final = 1000
_SENT_EVENTS: Final = 200_000
"""Events of this store's own inbox entries kept decoded, so its claims need not
decode them again; past this the oldest are dropped (and decoded if claimed).
As many as the buffer holds by default (``max_buffered_events``)."""
_Call = tuple[AsyncScript, Sequence[str], Sequence[str | bytes]]


def session_key(key: SessionKey) -> str:
    """The string that names a session inside its shard's keys."""
    project_id, session_id = key
    return f"{len(project_id)}:{project_id}:{session_id}"


def _parse_session_key(name: str) -> SessionKey:
    length, _, rest = name.partition(":")
    size = int(length)
    return rest[:size], rest[size + 1 :]


@final
class RedisSessionStore:
    """The :class:`~analytics_buffer._session_store.SessionStore` on Redis.

    :param url: a ``redis://`` URL
    :param prefix: the first part of every key's hash tag
    :param shards: how many shards sessions are spread over: the unit of
        claims (every instance must use the same number)
    :param retention: seconds every key lives after it was last written
    :param socket_timeout: seconds to wait for a connection or a reply
    :param claim_size: at most this many events (and idle sessions) per
        claim; adds are split into inbox entries of at most this many events,
        and a claim takes whole entries (at least one); the rest of a shard's
        work stays for the next claim
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "ab",
        shards: int = 16,
        retention: float = 86400.0,
        socket_timeout: float = 5.0,
        claim_size: int = 20_000,
    ) -> None:
        if shards < 1 or claim_size < 1 or retention <= 0:
            raise ValueError("shards and claim_size must be >= 1, retention > 0")
        self._redis: Redis = connect(url, socket_timeout)
        self._shards = shards
        self._ttl_ms = str(max(1, round(retention * 1000)))
        self._claim_size = claim_size
        self._tags = [f"{{{prefix}:{shard}}}:" for shard in range(shards)]
        self._lsv_tag = f"{{{prefix}:lsv}}:"
        self._add = self._redis.register_script(scripts.ADD)
        self._last_screen_view = self._redis.register_script(scripts.LAST_SCREEN_VIEW)
        self._claim = self._redis.register_script(scripts.CLAIM)
        self._states = self._redis.register_script(scripts.STATES)
        self._spilled = self._redis.register_script(scripts.SPILLED)
        self._complete = self._redis.register_script(scripts.COMPLETE)
        self._cleanup = self._redis.register_script(scripts.CLEANUP)
        self._rotation = int.from_bytes(os.urandom(2))
        # Entry ids: unique across instances, so a claim knows its own entries.
        self._entry_prefix = int.from_bytes(os.urandom(6)) << 32
        self._entries = 0
        self._sent: dict[int, tuple[int, Entry]] = {}
        self._sent_events = 0
        self._names: dict[SessionKey, tuple[str, int]] = {}
        self._held: dict[str, Held] = {}

    def shard_keys(self, shard: int) -> dict[str, str]:
        """The fixed keys of ``shard`` by role (for tests and operators)."""
        tag = self._tags[shard]
        roles = ("inbox", "sessions", "index", "ended", "claim", "done")
        return {role: tag + role for role in roles}

    def session_keys(self, key: SessionKey) -> dict[str, str]:
        """The keys of one session by role (for tests and operators)."""
        tag, name = self._tags[shard_of(key, self._shards)], session_key(key)
        return {"written": f"{tag}written:{name}"}

    def last_screen_view_key(self, project_id: str, profile_id: str) -> str:
        """The key of a profile's last screen_view."""
        return f"{self._lsv_tag}{len(project_id)}:{project_id}:{profile_id}"

    def _name(self, key: SessionKey) -> tuple[str, int]:
        known = self._names.get(key)
        if known is None:
            if len(self._names) >= 100_000:
                self._names.clear()
            known = self._names[key] = (session_key(key), shard_of(key, self._shards))
        return known

    def _session_name(self, key: SessionKey) -> str:
        return self._name(key)[0]

    async def add(self, events: Sequence[Event], now: float) -> None:
        """Record events that carry a session_id, arrived at wall-clock ``now``.

        One round trip whatever the number of events: each shard's events go
        to its inbox as they are (the claimer groups and merges them).

        :raises StoreUnavailable: Redis cannot be reached; retrying is safe
        """
        if not events:
            return
        names = self._names
        by_shard: dict[int, list[Event]] = {}
        for event in events:
            key = (event.project_id, event.session_id)
            known = names.get(key) or self._name(key)
            shard_events = by_shard.get(known[1])
            if shard_events is None:
                by_shard[known[1]] = [event]
            else:
                shard_events.append(event)
        encode = ENCODER.encode
        size = self._claim_size
        calls: list[_Call] = []
        for shard, shard_events in by_shard.items():
            entries: list[str | bytes] = [self._ttl_ms]
            for start in range(0, len(shard_events), size):
                entry = Entry(now, shard_events[start : start + size])
                self._entries += 1
                entry_id = self._entry_prefix | (self._entries & 0xFFFFFFFF)
                self._remember_sent(entry_id, shard, entry)
                entries.append(b"%d:%d:" % (len(entry.events), entry_id) + encode(entry))
            calls.append((self._add, [self._tags[shard] + "inbox"], entries))
        with map_exceptions("add"):
            await self._run(calls)

    def _remember_sent(self, entry_id: int, shard: int, entry: Entry) -> None:
        self._sent[entry_id] = (shard, entry)
        self._sent_events += len(entry.events)
        while self._sent_events > _SENT_EVENTS and self._sent:
            self._forget_sent(next(iter(self._sent)))

    def _forget_consumed(self, shard: int, present: set[int]) -> None:
        """Forget this store's entries of ``shard`` missing from its whole inbox.

        Another instance's claim merged them (or the server lost them); only
        this store's own claims forget entries otherwise. Forgetting one too
        many only costs a decode.
        """
        gone = [
            entry_id
            for entry_id, (entry_shard, _) in self._sent.items()
            if entry_shard == shard and entry_id not in present
        ]
        for entry_id in gone:
            self._forget_sent(entry_id)

    def _forget_sent(self, entry_id: int) -> None:
        sent = self._sent.pop(entry_id, None)
        if sent is not None:
            self._sent_events -= len(sent[1].events)

    async def claim(
        self, owner: str, now: float, *, timeout: float, lease: float, limit: int
    ) -> list[Claim]:
        """Claim up to ``limit`` shards that have work, for ``lease`` seconds.

        A shard has work when its inbox holds entries or open sessions were
        last seen at or before ``now - timeout`` (returned with ``idle=True``).
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
                known = self._known_entries(batch)
                calls: list[_Call] = []
                for shard, token in zip(batch, tokens, strict=True):
                    tag = self._tags[shard]
                    keys = [tag + "claim", tag + "inbox", tag + "index"]
                    ids = ENCODER.encode([str(entry_id) for entry_id in known[shard]])
                    args: list[str | bytes] = [
                        token,
                        lease_ms,
                        repr(idle_before),
                        str(self._claim_size),
                        ids,
                    ]
                    calls.append((self._claim, keys, args))
                replies = await self._run(calls)
                granted = [
                    (shard, token, reply, known[shard])
                    for shard, token, reply in zip(batch, tokens, replies, strict=True)
                    if reply
                ]
                if granted:
                    found += await self._merge(granted, idle_before)
        found.sort(key=lambda claim: claim.shard)
        return found

    async def _shards_with_work(self, shards: list[int], idle_before: float) -> list[int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                tag = self._tags[shard]
                pipe.exists(tag + "claim")
                pipe.llen(tag + "inbox")
                pipe.zcount(tag + "index", "-inf", repr(idle_before))
            replies = await pipe.execute()
        return [
            shard
            for at, shard in enumerate(shards)
            if not replies[3 * at] and (replies[3 * at + 1] or replies[3 * at + 2])
        ]

    def _known_entries(self, shards: list[int]) -> dict[int, dict[int, Entry]]:
        """This store's entries of each shard that it still holds decoded.

        Their claim replies carry their heads alone; the entries are taken
        from here, as the claim was sent (an add meanwhile changes nothing).
        """
        known: dict[int, dict[int, Entry]] = {shard: {} for shard in shards}
        for entry_id, (shard, entry) in self._sent.items():
            of_shard = known.get(shard)
            if of_shard is not None:
                of_shard[entry_id] = entry
        return known

    async def _merge(
        self, granted: list[tuple[int, str, list[Any], dict[int, Entry]]], idle_before: float
    ) -> list[Claim]:
        """Read the granted shards' sessions, merge their inbox entries in, hand out work."""
        plans = []
        for shard, token, (raw_entries, idle, waiting), known in granted:
            present: set[int] = set()
            own: list[int] = []
            # Each session's events in arrival order, and its latest arrival time.
            groups: dict[SessionKey, tuple[list[float], list[Event]]] = {}
            for raw in raw_entries:
                _, _, rest = raw.partition(b":")
                head, _, body = rest.partition(b":")
                entry_id = int(head)
                present.add(entry_id)
                known_entry = known.get(entry_id)
                if known_entry is not None:
                    entry = known_entry
                    own.append(entry_id)
                else:
                    entry = ENTRY_DECODER.decode(body)
                now = entry.now
                for event in entry.events:
                    key = (event.project_id, event.session_id)
                    group = groups.get(key)
                    if group is None:
                        groups[key] = ([now], [event])
                    else:
                        group[1].append(event)
                        if now > group[0][0]:
                            group[0][0] = now
            if len(raw_entries) == waiting:
                self._forget_consumed(shard, present)
            keys = list(groups)
            keys += (
                key
                for key in (_parse_session_key(name.decode()) for name in idle)
                if key not in groups
            )
            plans.append((shard, token, len(raw_entries), groups, own, keys))
        # The sessions' stored values: one call per shard, all in one round trip with
        # the profiles' last screen views (facts, recorded before the entries go).
        calls: list[_Call] = [
            (
                self._states,
                [self._tags[shard] + "sessions"],
                [ENCODER.encode([self._name(key)[0] for key in keys])],
            )
            for shard, _, _, _, _, keys in plans
        ]
        views = last_screen_views(groups for _, _, _, groups, _, _ in plans)
        if views:
            args: list[str | bytes] = [self._ttl_ms, ENCODER.encode(views)]
            calls.append((self._last_screen_view, [self._lsv_tag], args))
        values = (await self._run(calls))[: len(plans)]
        merges = []
        for (shard, token, consumed, groups, own, keys), stored in zip(plans, values, strict=True):
            merged = {
                key: load(key, self._name(key)[0], value)
                for key, value in zip(keys, stored, strict=True)
            }
            merges.append((shard, token, consumed, groups, own, merged))
        already = await self._written_long_ago(merges)
        claims = []
        for shard, token, consumed, groups, own, merged in merges:
            work = merge_groups(groups, merged, already, idle_before, self._session_name)
            self._held = {
                held_token: held for held_token, held in self._held.items() if held.shard != shard
            }
            self._held[token] = Held(shard, consumed, merged, own)
            claims.append(Claim(shard=shard, token=token, sessions=work))
        return claims

    async def _written_long_ago(
        self,
        merges: list[
            tuple[
                int,
                str,
                int,
                dict[SessionKey, tuple[list[float], list[Event]]],
                list[int],
                dict[SessionKey, Merged | None],
            ]
        ],
    ) -> set[int]:
        """Ids of the entries' events found in the written sets of long sessions."""
        calls: list[_Call] = []
        asked: list[list[Event]] = []
        for shard, _, _, groups, _, merged in merges:
            asks: dict[str, list[Event]] = {}
            for key, (_, events) in groups.items():
                session = merged.get(key)
                if session is not None and session.spilled:
                    asks[session.name] = events
            if asks:
                payload = [
                    [name, *(lua_str(event.id.bytes) for event in events)]
                    for name, events in asks.items()
                ]
                calls.append((self._spilled, [self._tags[shard]], [ENCODER.encode(payload)]))
                asked += asks.values()
        if not calls:
            return set()
        already: set[int] = set()
        replies = await self._run(calls)
        flags = [flag for reply in replies for flag in reply]
        for events, found in zip(asked, flags, strict=True):
            already.update(event.id.int for event, hit in zip(events, found, strict=True) if hit)
        return already

    async def complete(self, claim: Claim, outcomes: Sequence[SessionOutcome]) -> bool:
        """Apply ``outcomes`` and release ``claim``; ``False`` if the claim had expired.

        Fenced by the claim's token: when another claimer holds the shard now,
        nothing is applied. It stores what settling decides (``screen_views``,
        ``ended``, the written ids) with what the claim merged; the activity
        that adds brought meanwhile waits in the inbox for the next claim. A
        session never returns from ended.

        :raises ValueError: an outcome's session is not in the claim's shard
        :raises StoreUnavailable: Redis cannot be reached; retrying is safe
        """
        for outcome in outcomes:
            if shard_of(outcome.key, self._shards) != claim.shard:
                raise ValueError(f"session {outcome.key!r} is not in shard {claim.shard}")
        held = self._held.get(claim.token)
        tag = self._tags[claim.shard]
        keys = [tag + role for role in ("claim", "done", "inbox", "sessions", "index", "ended")]
        if held is None:
            # Completed already (or never ours): the fence answers.
            shard_changes: list[Any] = [[], [], [], [], [], []]
            consumed = 0
        else:
            shard_changes = changes(held, outcomes, self._session_name)
            consumed = held.consumed
        payload = ENCODER.encode(shard_changes)
        args: list[str | bytes] = [claim.token, tag, self._ttl_ms, str(consumed), payload]
        with map_exceptions("complete"):
            (applied,) = await self._run([(self._complete, keys, args)])
        if held is not None:
            del self._held[claim.token]
            for entry_id in held.own:
                self._forget_sent(entry_id)
        return bool(applied)

    async def _inbox_events(self, shards: Sequence[int]) -> list[list[Event]]:
        """The events waiting in each shard's inbox, in arrival order (for reads)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.lrange(self._tags[shard] + "inbox", 0, -1)
            inboxes: list[list[bytes]] = await pipe.execute()
        decode = ENTRY_DECODER.decode
        return [
            [event for raw in inbox for event in decode(raw.split(b":", 2)[2]).events]
            for inbox in inboxes
        ]

    async def history(self, keys: Sequence[SessionKey]) -> dict[SessionKey, list[ScreenViewMark]]:
        """The screen_view history of each session that exists, oldest first.

        It includes the screen_views still in the inbox (added, not merged yet).

        :raises StoreUnavailable: Redis cannot be reached
        """
        if not keys:
            return {}
        by_shard: dict[int, list[SessionKey]] = {}
        for key in keys:
            by_shard.setdefault(shard_of(key, self._shards), []).append(key)
        with map_exceptions("history"):
            calls: list[_Call] = []
            for shard, shard_keys in by_shard.items():
                names = [session_key(key) for key in shard_keys]
                calls.append(
                    (self._states, [self._tags[shard] + "sessions"], [ENCODER.encode(names)])
                )
            values = await self._run(calls)
            inboxes = await self._inbox_events(list(by_shard))
        found: dict[SessionKey, list[ScreenViewMark]] = {}
        for shard_keys, stored, inbox in zip(by_shard.values(), values, inboxes, strict=True):
            for key, value in zip(shard_keys, stored, strict=True):
                if value is not None:
                    kept = STORED_DECODER.decode(memoryview(value)[1:])
                    found[key] = decode_history(kept.history, kept.marks)
            wanted = set(shard_keys)
            for event in inbox:
                key = (event.project_id, event.session_id)
                if key in wanted:
                    marks = found.setdefault(key, [])
                    if event.name == SCREEN_VIEW:
                        marks.append(
                            ScreenViewMark(
                                epoch_ms(event.created_at), event.id, event.path, event.origin
                            )
                        )
        for key, marks in found.items():
            unique: dict[uuid.UUID, ScreenViewMark] = {}
            for mark in marks:
                unique.setdefault(mark.id, mark)
            ordered = sorted(unique.values(), key=lambda mark: mark.created_ms)
            found[key] = ordered[-MAX_HISTORY:]
        return found

    async def last_screen_view(self, project_id: str, profile_id: str) -> Event | None:
        """The latest screen_view (by ``created_at``) of a profile.

        Claims record it as they merge; screen_views still in the inboxes
        (added, not merged yet) are looked at too, and win ties.

        :raises StoreUnavailable: Redis cannot be reached
        """
        with map_exceptions("last_screen_view"):
            # decode_responses is off: replies are bytes.
            raw = cast(
                "bytes | None",
                await self._redis.get(self.last_screen_view_key(project_id, profile_id)),
            )
            inboxes = await self._inbox_events(range(self._shards))
        latest = None if raw is None else EVENT_DECODER.decode(memoryview(raw)[14:])
        for inbox in inboxes:
            for event in inbox:
                if (
                    event.name == SCREEN_VIEW
                    and event.session_id
                    and event.project_id == project_id
                    and event.profile_id == profile_id
                    and (latest is None or latest.created_at <= event.created_at)
                ):
                    latest = event
        return latest

    async def cleanup(self, now: float, retention: float) -> int:
        """Forget ended sessions last seen before ``now - retention``; return how many.

        Sessions that still hold pending events (or inbox entries) are kept;
        a shard that is claimed right now is skipped until the next clean-up.

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
                    roles = ("claim", "inbox", "sessions", "index", "ended")
                    keys = [tag + role for role in roles]
                    args = [tag, cutoff, str(offset), str(_CLEANUP_BATCH)]
                    calls.append((self._cleanup, keys, args))
                replies = await self._run(calls)
                for (shard, offset), reply in zip(list(offsets.items()), replies, strict=True):
                    if not reply:
                        del offsets[shard]
                        continue
                    gone, examined = reply
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
