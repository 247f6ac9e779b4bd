"""The Lua scripts of :class:`~analytics_buffer._redis_sessions.RedisSessionStore`.

Every script starts with a ``#!lua`` shebang (Redis 7.0 or later), with
which a cluster node refuses a script that touches keys of two slots (the
tests run them on one). ``KEYS`` name a shard's fixed keys; per-session
keys are built from the shard's key prefix ``{<prefix>:<shard>}:``, so they
share the tag and the slot.

The scripts do no per-event work and few calls per session: a session's
state is one opaque value in the shard's ``sessions`` hash, merged and
settled in Python by the claim holder. Bulk input comes as one msgpack
argument (``cmsgpack.unpack``): one string is far cheaper for redis-py to
send than thousands of arguments. Redis's cmsgpack has no ``bin`` type, so
byte strings travel with ``str`` headers. Scores travel as decimal strings
(Lua prints a double with 14 significant digits only).

A session value starts with one flag byte, ``p`` when it holds pending
events and ``-`` otherwise, so that ``CLEANUP`` need not decode it.
An inbox entry starts with ``<events>:<entry id>:``, so that ``CLAIM`` can
bound a claim without decoding it.
"""

from __future__ import annotations

from typing import Final

__all__ = ("ADD", "CLAIM", "CLEANUP", "COMPLETE", "LAST_SCREEN_VIEW", "SPILLED", "STATES")

_HEAD: Final = r"""#!lua
local call = redis.call
local function many(command, key, list, count)
  for first = 1, count, 4000 do
    call(command, key, unpack(list, first, math.min(first + 3999, count)))
  end
end
"""

ADD: Final = r"""#!lua
-- KEYS: inbox   ARGV: ttl_ms, entry...
-- Appends one add's entries for the shard: O(1) calls whatever their size.
redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

LAST_SCREEN_VIEW: Final = r"""#!lua
-- KEYS: the tag prefix {<prefix>:lsv}: (it routes the call; the keys share its slot)
-- ARGV: ttl_ms, views (msgpack): {{key suffix, '<created_ms, 13 digits>|<event>'}, ...}
-- Replaced only by a screen_view at least as recent (ties: the later arrival wins).
-- SET ... GET writes first and puts an older arrival back: one call in the usual case.
local call, prefix, ttl = redis.call, KEYS[1], ARGV[1]
for _, view in ipairs(cmsgpack.unpack(ARGV[2])) do
  local key, value = prefix .. view[1], view[2]
  local known = call('SET', key, value, 'GET', 'PX', ttl)
  if known and string.sub(known, 1, 13) > string.sub(value, 1, 13) then
    call('SET', key, known, 'PX', ttl)
  end
end
return 1
"""

CLAIM: Final = (
    _HEAD
    + r"""
-- KEYS: claim, inbox, index
-- ARGV: token, lease_ms, idle_before, limit, known entry ids (msgpack)
-- Returns false (no work, or held by another) or {entries, idle keys, inbox length}.
-- Entries are taken from the head of the inbox while their events fit in limit
-- (at least one); idle sessions (up to what is left of limit) only when the whole
-- inbox is taken (an entry left behind may hold their latest activity).
-- A known entry (the claimer still holds its events) comes back as its head alone.
local K_claim, K_inbox, K_index = KEYS[1], KEYS[2], KEYS[3]
local limit = tonumber(ARGV[4])
if call('EXISTS', K_claim) == 1 then return false end
local waiting = call('LLEN', K_inbox)
local taken, events = {}, 0
if waiting > 0 then
  local known = {}
  for _, id in ipairs(cmsgpack.unpack(ARGV[5])) do known[id] = true end
  for i, entry in ipairs(call('LRANGE', K_inbox, 0, limit - 1)) do
    local head, count, id = string.match(entry, '^((%d+):(%d+):)')
    count = tonumber(count)
    if i > 1 and events + count > limit then break end
    events = events + count
    taken[i] = known[id] and head or entry
  end
end
local idle = {}
if #taken == waiting and events < limit then
  idle = call('ZRANGEBYSCORE', K_index, '-inf', ARGV[3], 'LIMIT', 0, limit - events)
end
if #taken == 0 and #idle == 0 then return false end
call('SET', K_claim, ARGV[1], 'PX', ARGV[2])
return {taken, idle, waiting}
"""
)

STATES: Final = (
    _HEAD
    + r"""
-- KEYS: sessions   ARGV: session keys (msgpack)
-- Returns each session's value (nil when unknown).
local keys = cmsgpack.unpack(ARGV[1])
local out = {}
for first = 1, #keys, 4000 do
  local part = call('HMGET', KEYS[1], unpack(keys, first, math.min(first + 3999, #keys)))
  for j = 1, #part do out[#out + 1] = part[j] end
end
return out
"""
)

SPILLED: Final = r"""#!lua
-- KEYS: the shard's key prefix (it routes the call)   ARGV: {{session key, id...}, ...}
-- Returns, per session, SMISMEMBER of its ids in its written set.
local out = {}
for i, ask in ipairs(cmsgpack.unpack(ARGV[1])) do
  out[i] = redis.call('SMISMEMBER', KEYS[1] .. 'written:' .. ask[1], unpack(ask, 2))
end
return out
"""

COMPLETE: Final = (
    _HEAD
    + r"""
-- KEYS: claim, done, inbox, sessions, index, ended
-- ARGV: token, prefix, ttl_ms, consumed entries, changes (msgpack):
--   {{key, value, ...}, {score, key, ...} open, {score, key, ...} ended, {key...} unindex,
--    {{key, id...}, ...} spilled ids, {key...} forget}
-- Returns 1 when applied (now or by an earlier call with this token), 0 when the
-- claim is no longer ours: then nothing changes.
local K_claim, K_done, K_inbox, K_sessions, K_index, K_ended =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local token, prefix, ttl = ARGV[1], ARGV[2], ARGV[3]
if call('GET', K_claim) ~= token then
  if call('GET', K_done) == token then return 1 end
  return 0
end
local c = cmsgpack.unpack(ARGV[5])
many('HSET', K_sessions, c[1], #c[1])
many('ZADD', K_index, c[2], #c[2])
many('ZADD', K_ended, c[3], #c[3])
many('ZREM', K_index, c[4], #c[4])
for _, spill in ipairs(c[5]) do
  local set = prefix .. 'written:' .. spill[1]
  for first = 2, #spill, 4000 do
    call('SADD', set, unpack(spill, first, math.min(first + 3999, #spill)))
  end
  call('PEXPIRE', set, ttl)
end
many('HDEL', K_sessions, c[6], #c[6])
many('ZREM', K_index, c[6], #c[6])
local consumed = tonumber(ARGV[4])
if consumed > 0 then call('LTRIM', K_inbox, consumed, -1) end
for _, key in ipairs({K_sessions, K_index, K_ended}) do call('PEXPIRE', key, ttl) end
call('DEL', K_claim)
call('SET', K_done, token, 'PX', ttl)
return 1
"""
)

CLEANUP: Final = (
    _HEAD
    + r"""
-- KEYS: claim, inbox, sessions, index, ended
-- ARGV: prefix, cutoff (exclusive), offset, count
-- Returns {removed, examined}, or false when the shard is claimed (its holder may
-- write the sessions back). A session is kept while it holds pending events or an
-- inbox entry names it (the claimer has not merged it yet); kept ones stay in the
-- range, so the caller moves its offset past them.
local K_claim, K_inbox, K_sessions, K_index, K_ended = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5]
local prefix = ARGV[1]
if call('EXISTS', K_claim) == 1 then return false end
local keys = call('ZRANGEBYSCORE', K_ended, '-inf', '(' .. ARGV[2], 'LIMIT', ARGV[3], ARGV[4])
if #keys == 0 then return {0, 0} end
local inbox = call('LRANGE', K_inbox, 0, -1)
local values = call('HMGET', K_sessions, unpack(keys))
local removed = 0
for i, key in ipairs(keys) do
  local value = values[i]
  local keep = value and string.sub(value, 1, 1) == 'p'
  if not keep then
    -- An entry holds events, which carry the session_id: a plain search for it
    -- may find it elsewhere too, which only keeps a session longer.
    local digits = string.match(key, '^%d+')
    local session = string.sub(key, #digits + tonumber(digits) + 3)
    for _, entry in ipairs(inbox) do
      if string.find(entry, session, 1, true) then
        keep = true
        break
      end
    end
  end
  if not keep then
    removed = removed + 1
    call('HDEL', K_sessions, key)
    call('DEL', prefix .. 'written:' .. key)
    call('ZREM', K_ended, key)
    call('ZREM', K_index, key)
  end
end
return {removed, #keys}
"""
)
