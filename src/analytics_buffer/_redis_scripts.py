"""The Lua scripts of :class:`~analytics_buffer._redis_sessions.RedisSessionStore`.

Every script starts with a ``#!lua`` shebang (Redis 7.0 or later), with
which a cluster node refuses a script that touches keys of two slots (the
tests run them on one). ``KEYS`` name a shard's fixed keys (for the last
screen views: the tag prefix, which routes the call); per-session keys are
built from the shard's key prefix ``{<prefix>:<shard>}:``, so they share the
tag and the slot.

Bulk input comes as one msgpack argument (``cmsgpack.unpack``): one string
is far cheaper for redis-py to send than thousands of arguments. Redis's
cmsgpack has no ``bin`` type, so byte strings travel with ``str`` headers.
Numbers travel as decimal strings, are compared with ``tonumber`` and
stored as sent: Lua prints a double with 14 significant digits only.

A ``redis.call`` costs more than the Lua around it, so the scripts make few
per session: ``add`` one ``HMGET`` (the state, and for each id whether it is
pending or written), one ``HSET`` and, for screen_views, one ``ZADD``;
``claim`` one ``HGETALL``; ``complete`` ``EXISTS``, ``HSET`` and ``HLEN``.
A session's TTLs are renewed by ``add`` every ``renew_s`` seconds, not on
every call.

The state hash: ``f`` first_ms, ``l`` last_activity_ms, ``s`` last_seen,
``p`` profile_id, ``v`` screen_views, ``e`` ended (0/1), ``n`` arrival
counter, ``t`` last TTL renewal, ``h`` history size, ``w`` whether the
written set is in use; then one field per event id (16 bytes):
``<arrival>|<msgpack Event>`` while pending, empty once written. Past
:data:`COMPACT_AT` fields, ``complete`` moves the written ids to the
session's written set, so that claims of long sessions stay small.
"""

from __future__ import annotations

from typing import Final

__all__ = ("ADD", "CLAIM", "CLEANUP", "COMPACT_AT", "COMPLETE", "LAST_SCREEN_VIEW")

COMPACT_AT: Final = 512
"""Fields past which ``complete`` moves a state hash's written ids to the written set."""

_HEAD: Final = r"""#!lua
local call = redis.call
local function many(command, key, list, count)
  for first = 1, count, 4000 do
    call(command, key, unpack(list, first, math.min(first + 3999, count)))
  end
end
"""

ADD: Final = (
    _HEAD
    + r"""
-- KEYS: index, dirty, ended
-- ARGV: prefix, now, ttl_ms, renew_s, max_history, records (msgpack):
--   {{key, first_ms, last_ms, profile_id, [id, event, mark_ms or '', mark]...}, ...}
local K_index, K_dirty, K_ended = KEYS[1], KEYS[2], KEYS[3]
local prefix, now, ttl = ARGV[1], ARGV[2], ARGV[3]
local now_n, renew_s, max_history = tonumber(now), tonumber(ARGV[4]), tonumber(ARGV[5])
local sp, hp, wp = prefix .. 'state:', prefix .. 'history:', prefix .. 'written:'
local open_seen, ended_seen, touched = {}, {}, {}
local no, ne, nt = 0, 0, 0
local records = cmsgpack.unpack(ARGV[6])
for i = 1, #records do
  local r = records[i]
  local key, first, last, profile = r[1], r[2], r[3], r[4]
  local state = sp .. key
  local size = #r
  local cur
  if size == 4 then
    cur = call('HMGET', state, 'f', 'l', 's', 'p', 'e', 'n', 't', 'h', 'w')
  elseif size == 8 then
    cur = call('HMGET', state, 'f', 'l', 's', 'p', 'e', 'n', 't', 'h', 'w', r[5])
  else
    local ask = {'f', 'l', 's', 'p', 'e', 'n', 't', 'h', 'w'}
    for j = 5, size, 4 do ask[#ask + 1] = r[j] end
    cur = {}
    for from = 1, #ask, 4000 do
      local part = call('HMGET', state, unpack(ask, from, math.min(from + 3999, #ask)))
      for _, value in ipairs(part) do cur[#cur + 1] = value end
    end
  end
  local created = not cur[1]
  local update, u
  if created then
    update = {'f', first, 'l', last, 's', now, 'p', profile, 'v', '0', 'e', '0', 'w', '0'}
    u = 14
  else
    update, u = {}, 0
    if tonumber(first) < tonumber(cur[1]) then
      update[u + 1] = 'f'; update[u + 2] = first; u = u + 2
    end
    if tonumber(last) > tonumber(cur[2]) then
      update[u + 1] = 'l'; update[u + 2] = last; u = u + 2
    end
    if now_n > tonumber(cur[3]) then
      update[u + 1] = 's'; update[u + 2] = now; u = u + 2
    end
    if profile ~= '' and cur[4] == '' then
      update[u + 1] = 'p'; update[u + 2] = profile; u = u + 2
    end
  end
  local seq0 = tonumber(cur[6]) or 0
  local seq, had = seq0, tonumber(cur[8]) or 0
  local history_size = had
  if size > 4 then
    -- Ids written long ago live in the written set (see COMPLETE).
    local moved
    if cur[9] == '1' then
      local ids = {}
      for j = 5, size, 4 do ids[#ids + 1] = r[j] end
      moved = call('SMISMEMBER', wp .. key, unpack(ids))
    end
    local marks, m, dirty = {}, 0, false
    local k = 10
    for j = 5, size, 4 do
      local old = cur[k]
      if old ~= '' and not (moved and moved[k - 9] == 1) then
        local order
        if old then
          order = string.match(old, '^%d+')  -- pending already: keeps its place
        else
          seq = seq + 1
          order = seq
        end
        update[u + 1] = r[j]; update[u + 2] = order .. '|' .. r[j + 1]; u = u + 2
        dirty = true
        if r[j + 2] ~= '' then
          marks[m + 1] = r[j + 2]; marks[m + 2] = r[j + 3]; m = m + 2
        end
      end
      k = k + 1
    end
    if m > 0 then
      local history = hp .. key
      history_size = had + call('ZADD', history, unpack(marks))
      if history_size > max_history then
        call('ZREMRANGEBYRANK', history, 0, -max_history - 1)
        history_size = max_history
      end
    end
    if dirty then
      nt = nt + 1; touched[nt] = key
    end
  end
  if created or seq ~= seq0 then
    update[u + 1] = 'n'; update[u + 2] = seq; u = u + 2
  end
  if created or history_size ~= had then
    update[u + 1] = 'h'; update[u + 2] = history_size; u = u + 2
  end
  -- A session's keys are renewed together, every renew_s seconds: it saves calls.
  local renew = created or math.abs(now_n - (tonumber(cur[7]) or 0)) >= renew_s
  if renew then
    update[u + 1] = 't'; update[u + 2] = now; u = u + 2
  end
  if u > 0 then many('HSET', state, update, u) end
  if renew then
    call('PEXPIRE', state, ttl)
    if cur[9] == '1' then call('PEXPIRE', wp .. key, ttl) end
  end
  if history_size > 0 and (renew or had == 0) then call('PEXPIRE', hp .. key, ttl) end
  if cur[5] == '1' then
    ended_seen[ne + 1] = now; ended_seen[ne + 2] = key; ne = ne + 2
  else
    open_seen[no + 1] = now; open_seen[no + 2] = key; no = no + 2
  end
end
-- GT: another instance may have recorded a later arrival already.
for first = 1, no, 4000 do
  call('ZADD', K_index, 'GT', unpack(open_seen, first, math.min(first + 3999, no)))
end
for first = 1, ne, 4000 do
  call('ZADD', K_ended, 'GT', unpack(ended_seen, first, math.min(first + 3999, ne)))
end
many('SADD', K_dirty, touched, nt)
call('PEXPIRE', K_index, ttl)
call('PEXPIRE', K_dirty, ttl)
call('PEXPIRE', K_ended, ttl)
return 1
"""
)

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
-- KEYS: claim, dirty, index, inflight
-- ARGV: token, lease_ms, idle_before, max_sessions, prefix, ttl_ms
-- Returns nil (no work, or held by another) or {key, HGETALL of its state, key, ...}
local K_claim, K_dirty, K_index, K_inflight = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local idle_before, limit, prefix = ARGV[3], tonumber(ARGV[4]), ARGV[5]
if call('EXISTS', K_claim) == 1 then return false end
local held = call('SCARD', K_inflight)
if held == 0 and call('SCARD', K_dirty) == 0
    and #call('ZRANGEBYSCORE', K_index, '-inf', idle_before, 'LIMIT', 0, 1) == 0 then
  return false
end
-- The sessions of an expired claim were never completed: they are dirty again.
if held > 0 then
  call('SUNIONSTORE', K_dirty, K_dirty, K_inflight)
  call('DEL', K_inflight)
end
local picked = call('SPOP', K_dirty, limit)
local chosen, seen = {}, {}
for _, key in ipairs(picked) do
  seen[key] = true
  chosen[#chosen + 1] = key
end
if #chosen < limit then
  local idle = call('ZRANGEBYSCORE', K_index, '-inf', idle_before, 'LIMIT', 0, limit)
  for _, key in ipairs(idle) do
    if #chosen >= limit then break end
    if not seen[key] then
      seen[key] = true
      chosen[#chosen + 1] = key
    end
  end
end
local out = {}
for _, key in ipairs(chosen) do
  local state = call('HGETALL', prefix .. 'state:' .. key)
  if #state > 0 then
    out[#out + 1] = key
    out[#out + 1] = state
  else
    -- Its state expired (retention): forget what is left of it.
    call('ZREM', K_index, key)
    call('DEL', prefix .. 'history:' .. key, prefix .. 'written:' .. key)
  end
end
if #out == 0 then return false end
many('SADD', K_inflight, picked, #picked)
call('PEXPIRE', K_inflight, ARGV[6])
call('SET', K_claim, ARGV[1], 'PX', ARGV[2])
return out
"""
)

COMPLETE: Final = (
    _HEAD
    + f"""
-- KEYS: claim, index, ended, inflight, done
-- ARGV: token, prefix, ttl_ms, outcomes (msgpack):
--   {{{{key, screen_views, ended (bool), [written id]...}}, ...}}
-- Returns 1 when applied (now or by an earlier call with this token), 0 when the
-- claim is no longer ours: then nothing changes. It stores what settling decides:
-- screen_views, ended (never undone) and the written ids; the activity fields
-- (f l s p) are add's, so what other instances added meanwhile is kept.
local K_claim, K_index, K_ended, K_inflight, K_done = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5]
local token, prefix, ttl = ARGV[1], ARGV[2], ARGV[3]
if call('GET', K_claim) ~= token then
  if call('GET', K_done) == token then return 1 end
  return 0
end
for _, outcome in ipairs(cmsgpack.unpack(ARGV[4])) do
  local key = outcome[1]
  local state = prefix .. 'state:' .. key
  if call('EXISTS', state) == 1 then
    local update = {{'v', outcome[2]}}
    if outcome[3] then
      update[3] = 'e'; update[4] = '1'
    end
    -- A written id keeps an empty field, so that it is never pending again.
    for j = 4, #outcome do
      update[#update + 1] = outcome[j]; update[#update + 1] = ''
    end
    many('HSET', state, update, #update)
    if call('HLEN', state) > {COMPACT_AT} then
      -- A long session: its written ids move to the written set, so claims stay small.
      local fields, written = call('HGETALL', state), {{}}
      for j = 1, #fields, 2 do
        if fields[j + 1] == '' then written[#written + 1] = fields[j] end
      end
      if #written > 0 then
        local set = prefix .. 'written:' .. key
        many('SADD', set, written, #written)
        many('HDEL', state, written, #written)
        call('HSET', state, 'w', '1')
        call('PEXPIRE', set, ttl)
      end
    end
    -- No PEXPIRE of the state: add renews a session's keys together.
    if outcome[3] then
      local seen = call('ZSCORE', K_index, key) or call('HGET', state, 's')
      call('ZREM', K_index, key)
      call('ZADD', K_ended, seen, key)
    end
  end
end
call('PEXPIRE', K_ended, ttl)
call('DEL', K_inflight, K_claim)
call('SET', K_done, token, 'PX', ttl)
return 1
"""
)

CLEANUP: Final = (
    _HEAD
    + r"""
-- KEYS: ended, index, dirty
-- ARGV: prefix, cutoff (exclusive), offset, count
-- Returns {removed, examined}; sessions kept (still pending) stay in the range,
-- so the caller moves its offset past them.
local K_ended, K_index, K_dirty = KEYS[1], KEYS[2], KEYS[3]
local prefix = ARGV[1]
local keys = call('ZRANGEBYSCORE', K_ended, '-inf', '(' .. ARGV[2], 'LIMIT', ARGV[3], ARGV[4])
local removed = 0
for _, key in ipairs(keys) do
  local state = prefix .. 'state:' .. key
  local fields = call('HGETALL', state)
  local pending = false
  for j = 1, #fields, 2 do
    -- Event ids are 16 bytes; a non-empty value is a pending event.
    if #fields[j] == 16 and fields[j + 1] ~= '' then
      pending = true
      break
    end
  end
  if not pending then
    -- Its keys may have expired already: the session is forgotten either way.
    removed = removed + 1
    call('DEL', state, prefix .. 'written:' .. key, prefix .. 'history:' .. key)
    call('ZREM', K_ended, key)
    call('ZREM', K_index, key)
    call('SREM', K_dirty, key)
  end
end
return {removed, #keys}
"""
)
