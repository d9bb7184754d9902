"""The Lua scripts behind the Redis counters: rate-limit acquire and release, budget reserve, settle and
sweep. Each runs atomically inside Redis, so every replica sees one count and a check and its write can
never be split by another client.

Owns: the scripts' text, the layout of their KEYS and ARGV, and `Script` (EVALSHA, loading the script
on first use). May import: core, redis. Never: knows what a limit or a budget is (`policy/ratelimit.py` and
`policy/budgets.py` build the arguments and read the replies).

Time is Redis's own clock (`TIME`), in microseconds, never the client's: replicas whose clocks disagree
still share one window. Scripts that compute key names inside (settle, sweep) need every key on one
server: standalone Redis or Sentinel, not Cluster.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import (
    BusyLoadingError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from somaagent.core.errors import Overloaded


class Script:
    """One Lua script, run by its SHA-1 (EVALSHA): the source crosses the network only when the server
    does not know it yet (first use, or after a restart or SCRIPT FLUSH)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def run(self, redis: Redis, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """The script's reply, for `keys` and `args` (one round trip unless the script must be loaded)."""
        try:
            try:
                return await redis.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                self.sha = await redis.script_load(self.source)
                return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except UNREACHABLE as exc:
            # Fail closed, with a clear 503: a call whose limits cannot be counted is not let through.
            raise counters_unreachable() from exc


# Redis down, not answering, or unable to write (a read-only replica, out of memory, still loading,
# refusing our credentials): the counters cannot be used. A script's own error (a duplicate lease id)
# is a bug and stays one.
UNREACHABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    OutOfMemoryError,
    BusyLoadingError,
    NoPermissionError,
)


def counters_unreachable() -> Overloaded:
    """The error for a request whose counters are in a Redis that does not answer."""
    return Overloaded(
        "the shared rate-limit and budget counters (Redis, SOMA_REDIS_URL) are not reachable; calls are "
        "refused until they are",
        retry_after=1.0,
    )


# The sliding window, per scope (tenant, user or key), in four keys:
#   log       ZSET  lease id -> when it was admitted (µs); the requests of the last window
#   cost      HASH  lease id -> tokens counted for it
#   sum       STRING  the tokens counted over the window (the sum of `cost`)
#   inflight  ZSET  lease id -> deadline (µs); the requests in flight
#
# Why a window log and not GCRA: with GCRA (a token bucket) whose burst is the per-minute limit, a client
# that spends its whole minute at once gets a fresh share continuously while that minute is still
# running, so up to 2 x limit fit in 60 s. An entry here frees its share exactly `window` after it was
# admitted, which gives both properties asked of these limits:
#   - a client may spend its whole minute at once (limit requests in one instant), and
#   - admitted requests (tokens) inside ANY window of `window` µs never exceed the limit.
# Proof: take any window and the last request admitted in it, at time t; every other request of that
# window was admitted earlier and is still inside (t - window, t], which the check at t counted. Refunds
# only lower counts. `now` never goes back (it is at least the newest entry), so a clock step backwards
# cannot re-open a window. The cost: one entry per admitted request of the last window, per scope.
#
# Concurrency: a lease is an entry in `inflight` scored by its deadline; entries past their deadline
# are dropped before counting, so a process that died mid-call frees its slots by itself.
#
# KEYS: per scope i (1-based) KEYS[4i-3..4i] = log, cost, sum, inflight.
# ARGV: lease id, tokens, window (µs), lease ttl (µs), then per scope i: rpm, tpm, concurrent (-1: none).
# Reply, admitted:  {1, now, per scope: requests_remaining, requests_reset, tokens_remaining, tokens_reset}
# Reply, refused:   {0, now, scope index, kind, retry (µs), used, per scope: the same four numbers}
# kind: 1 requests (rpm), 2 tokens (tpm), 3 concurrency, 4 a request larger than the tpm limit itself.
# -1 in the per-scope numbers means "not limited there"; resets are µs until the oldest request of the
# window leaves it (when `remaining` next grows).
RATE_ACQUIRE = """
local lease = ARGV[1]
local tokens = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local lease_ttl = tonumber(ARGV[4])
local n = (#ARGV - 4) / 3

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local function limit_of(i, field) return tonumber(ARGV[4 + 3 * (i - 1) + field]) end
local function key(i, part) return KEYS[4 * (i - 1) + part] end

-- A step of Redis's clock backwards must not re-open a window: never count from before the newest entry.
for i = 1, n do
  if limit_of(i, 1) >= 0 or limit_of(i, 2) >= 0 then
    local newest = redis.call('ZRANGE', key(i, 1), -1, -1, 'WITHSCORES')
    if newest[2] and tonumber(newest[2]) > now then now = tonumber(newest[2]) end
  end
end

-- Drop what left the window (admitted at or before now - window) and give back its tokens.
local function prune(log, cost, sum)
  local cutoff = now - window
  while true do
    local old = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff, 'LIMIT', 0, 256)
    if #old == 0 then return end
    local freed = 0
    for _, c in ipairs(redis.call('HMGET', cost, unpack(old))) do
      if c then freed = freed + tonumber(c) end
    end
    redis.call('HDEL', cost, unpack(old))
    redis.call('ZREM', log, unpack(old))
    if freed ~= 0 then redis.call('DECRBY', sum, freed) end
    if #old < 256 then return end
  end
end

-- When the oldest request of the window leaves it.
local function oldest_leaves(log)
  local oldest = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
  if oldest[2] then return tonumber(oldest[2]) + window - now end
  return 0
end

-- How long until `need` tokens have left the window: walk from the oldest request.
local function tokens_free_in(log, cost, need)
  local freed, start = 0, 0
  while true do
    local batch = redis.call('ZRANGE', log, start, start + 255, 'WITHSCORES')
    if #batch == 0 then return window end
    for j = 1, #batch, 2 do
      freed = freed + tonumber(redis.call('HGET', cost, batch[j]) or '0')
      if freed >= need then return tonumber(batch[j + 1]) + window - now end
    end
    start = start + 256
  end
end

local refused, kind, retry, used_at_refusal = 0, 0, -1, 0
local counts, sums = {}, {}
for i = 1, n do
  local rpm, tpm, concurrent = limit_of(i, 1), limit_of(i, 2), limit_of(i, 3)
  local log, cost, sum, inflight = key(i, 1), key(i, 2), key(i, 3), key(i, 4)
  local scope_kind, scope_retry, scope_used = 0, -1, 0
  if rpm >= 0 or tpm >= 0 then
    prune(log, cost, sum)
    if redis.call('ZSCORE', log, lease) then
      return redis.error_reply('duplicate lease id ' .. lease .. ': lease ids must be unique')
    end
    counts[i] = redis.call('ZCARD', log)
    sums[i] = tonumber(redis.call('GET', sum) or '0')
  end
  if rpm >= 0 and counts[i] + 1 > rpm then
    -- The (count + 1 - rpm)-th oldest request must leave before one more fits.
    local entry = redis.call('ZRANGE', log, counts[i] - rpm, counts[i] - rpm, 'WITHSCORES')
    scope_kind, scope_used = 1, counts[i]
    scope_retry = entry[2] and (tonumber(entry[2]) + window - now) or window
  end
  if tpm >= 0 then
    if tokens > tpm then
      scope_kind, scope_retry, scope_used = 4, window, sums[i]
    elseif sums[i] + tokens > tpm then
      local wait = tokens_free_in(log, cost, sums[i] + tokens - tpm)
      if wait > scope_retry then scope_kind, scope_retry, scope_used = 2, wait, sums[i] end
    end
  end
  if concurrent >= 0 then
    redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
    local busy = redis.call('ZCARD', inflight)
    if busy >= concurrent and scope_retry < 1000000 then
      scope_kind, scope_retry, scope_used = 3, 1000000, busy
    end
  end
  -- Report the scope the caller must wait for longest: it is the one that decides when a retry works.
  if scope_kind ~= 0 and scope_retry > retry then
    refused, kind, retry, used_at_refusal = i, scope_kind, scope_retry, scope_used
  end
end

local admitted = refused == 0
if admitted then
  for i = 1, n do
    local log, cost, sum, inflight = key(i, 1), key(i, 2), key(i, 3), key(i, 4)
    local keep_ms = math.floor(window / 1000) + 1000
    if limit_of(i, 1) >= 0 or limit_of(i, 2) >= 0 then
      redis.call('ZADD', log, now, lease)
      redis.call('HSET', cost, lease, tokens)
      redis.call('INCRBY', sum, tokens)
      -- Idle scopes vanish once their last request has left the window.
      redis.call('PEXPIRE', log, keep_ms)
      redis.call('PEXPIRE', cost, keep_ms)
      redis.call('PEXPIRE', sum, keep_ms)
      counts[i] = counts[i] + 1
      sums[i] = sums[i] + tokens
    end
    if limit_of(i, 3) >= 0 then
      redis.call('ZADD', inflight, now + lease_ttl, lease)
      redis.call('PEXPIRE', inflight, math.floor(lease_ttl / 1000) + 1000)
    end
  end
end

local reply
if admitted then reply = {1, now} else reply = {0, now, refused, kind, retry, used_at_refusal} end
for i = 1, n do
  local rpm, tpm = limit_of(i, 1), limit_of(i, 2)
  local reset = -1
  if rpm >= 0 or tpm >= 0 then reset = oldest_leaves(key(i, 1)) end
  if rpm >= 0 then
    table.insert(reply, math.max(0, rpm - counts[i]))
    table.insert(reply, reset)
  else
    table.insert(reply, -1)
    table.insert(reply, -1)
  end
  if tpm >= 0 then
    table.insert(reply, math.max(0, tpm - sums[i]))
    table.insert(reply, reset)
  else
    table.insert(reply, -1)
    table.insert(reply, -1)
  end
end
return reply
"""

# Release a lease: free its concurrency slots and count its actual tokens instead of those it reserved
# (a refund when fewer; more are counted too, so later requests see the real use). A request that has
# already left the window is not counted any more, so nothing is changed for it.
# KEYS: per scope the same four keys as RATE_ACQUIRE. ARGV: lease id, actual tokens.
RATE_RELEASE = """
local lease = ARGV[1]
local actual = tonumber(ARGV[2])
for i = 1, #KEYS, 4 do
  local counted = redis.call('HGET', KEYS[i + 1], lease)
  if counted then
    local delta = actual - tonumber(counted)
    if delta ~= 0 then
      redis.call('HSET', KEYS[i + 1], lease, actual)
      redis.call('INCRBY', KEYS[i + 2], delta)
    end
  end
  redis.call('ZREM', KEYS[i + 3], lease)
end
return 1
"""

# Budgets: a counter per (budget, period) is a HASH {spent, reserved}; a reservation is a HASH
# {tenant, holds} where `holds` is JSON [{"key": counter key, "budget_id", "amount"}] with amounts as
# decimal strings (no float rounding on the way); the `expiries` ZSET scores reservation ids by the
# time (ms) after which the sweeper charges them.
#
# Reserve: either every hold fits (spent + reserved + amount <= limit, for all) and all are taken, or
# nothing is. Reserving an id again changes nothing (a retried call is not held twice).
# KEYS: reservation, expiries, then one counter per hold.
# ARGV: reservation id, expires at (ms since the epoch), tenant id, holds JSON, then per hold: amount, limit.
# Reply: {1} reserved (or already was); {0, hold index (1-based), spent, reserved} refused.
BUDGET_RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {1} end
local n = #KEYS - 2
for i = 1, n do
  local amount, limit = tonumber(ARGV[3 + 2 * i]), tonumber(ARGV[4 + 2 * i])
  local counter = redis.call('HMGET', KEYS[2 + i], 'spent', 'reserved')
  local spent, reserved = tonumber(counter[1] or '0'), tonumber(counter[2] or '0')
  if spent + reserved + amount > limit then return {0, i, spent, reserved} end
end
for i = 1, n do
  redis.call('HINCRBY', KEYS[2 + i], 'reserved', ARGV[3 + 2 * i])
end
redis.call('HSET', KEYS[1], 'tenant', ARGV[3], 'holds', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return {1}
"""

# Shared by settle and sweep: move a reservation's holds from `reserved` to `spent` (by the actual
# amount when known, else by the reserved amount: never under-counted) and forget it. Returns whether it
# was still there, which is what makes settling twice (or settle racing the sweeper) charge once.
_CHARGE = """
local function charge(reservation, expiries, id, actual)
  local raw = redis.call('HGET', reservation, 'holds')
  if not raw then return 0 end
  for _, hold in ipairs(cjson.decode(raw)) do
    local spent = actual[hold.budget_id]
    if spent == nil then spent = hold.amount end
    redis.call('HINCRBY', hold.key, 'reserved', '-' .. hold.amount)
    redis.call('HINCRBY', hold.key, 'spent', tostring(spent))
  end
  redis.call('DEL', reservation)
  redis.call('ZREM', expiries, id)
  return 1
end
"""

# KEYS: reservation, expiries. ARGV: reservation id, actual JSON {budget id: amount as a decimal string}.
# Reply: 1 settled now, 0 nothing to settle (settled before, or swept).
BUDGET_SETTLE = (
    _CHARGE
    + """
return charge(KEYS[1], KEYS[2], ARGV[1], cjson.decode(ARGV[2]))
"""
)

# Charge reservations past their expiry at their reserved amount (their process died before settling).
# KEYS: expiries. ARGV: the reservation key prefix, how many at most. Reply: how many were charged.
BUDGET_SWEEP = (
    _CHARGE
    + """
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[2]))
local charged = 0
for _, id in ipairs(ids) do
  local done = charge(ARGV[1] .. id, KEYS[1], id, {})
  if done == 0 then redis.call('ZREM', KEYS[1], id) end
  charged = charged + done
end
return charged
"""
)
