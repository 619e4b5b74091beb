-- acquire.lua: take every slot a run needs, or none of them (all-or-nothing admission).
--
-- KEYS, four per slot j = 1..n, in this order:
--   KEYS[4j-3]  holders   ZSET  owner -> lease expiry (ms, server time)
--   KEYS[4j-2]  meta      HASH  owner -> holder JSON; "?"..owner -> deferral JSON (first and last
--                                deferral, count, the full slot's holders key, one holder of it);
--                                "#f" -> last fence
--   KEYS[4j-1]  deferred  ZSET  owner -> time of its last deferral (ms)
--   KEYS[4j]    resuming  ZSET  owner -> when it asked to resume (ms); resuming runs go first
-- then the conf HASHes that specs point at (KEYS[4n+1..]).
--
-- ARGV[1]  owner: the run's task id
-- ARGV[2]  lease, ms
-- ARGV[3]  holder JSON, stored as given (task name, worker, pid, tags) for status and for
--          the worker main process's release-by-pid
-- ARGV[4]  slot specs, a JSON array with one object per slot:
--            {"l": N}   fixed limit N
--            {"c": i, "s": S, "d": D, "x": X, "a": j2}
--                       a queue's limit: S (a trigger-time limit, written to field "limit" of
--                       KEYS[i] first), else that recorded field, else D (declared in code),
--                       capped by X (the environment's base limit; also the default when the
--                       rest gives nothing). No limit at all means the slot is unlimited: slot j2
--                       (the namespace-wide key mutex, limit 1) is used instead when "a" is set,
--                       otherwise nothing is taken for it.
--            {"alt": true, "l": 1}   only used as some slot's "a"; skipped otherwise
-- ARGV[5]  index of the primary slot, where a deferral is recorded; 0 for none
-- ARGV[6]  how long deferral records live, ms
-- ARGV[7]  "1" when the run resumes from wait_for: it only waits for runs that resumed earlier,
--          and it holds its place in each slot's resuming set while it is blocked
--
-- Returns {1, fence, "j1,j2,..."}  every slot was taken; fence only ever grows per primary slot;
--                                   the string lists the slots actually taken
--         {0, j, holder, limit}      slot j is full; holder is one owner in it ("" when only
--                                   resuming runs fill it); limit is its resolved limit

local owner = ARGV[1]
local lease = tonumber(ARGV[2])
local holder_json = ARGV[3]
local specs = cjson.decode(ARGV[4])
local primary = tonumber(ARGV[5])
local memory = tonumber(ARGV[6])
local resume = ARGV[7] == "1"

local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function extend(key, ms)
  local left = redis.call("PTTL", key)
  if left < ms then
    redis.call("PEXPIRE", key, ms)
  end
end

local function prune(h, m, r)
  local expired = redis.call("ZRANGEBYSCORE", h, "-inf", now)
  if #expired > 0 then
    redis.call("ZREMRANGEBYSCORE", h, "-inf", now)
    redis.call("HDEL", m, unpack(expired))
  end
  -- a resuming run that vanished must not hold its reservation for ever
  redis.call("ZREMRANGEBYSCORE", r, "-inf", now - lease)
end

local n = #specs
local limits = {}
local used = {}

-- Resolve limits and decide which slots are needed.
for j = 1, n do
  local s = specs[j]
  if s["alt"] then
    -- taken only when a queue slot falls back to it
  elseif s["l"] then
    limits[j] = s["l"]
    used[#used + 1] = j
  else
    local conf = KEYS[s["c"]]
    local lim = nil
    if s["s"] then
      redis.call("HSET", conf, "limit", s["s"])
      lim = s["s"]
    else
      lim = tonumber(redis.call("HGET", conf, "limit")) or s["d"]
    end
    if lim == nil then
      lim = s["x"]
    elseif s["x"] and s["x"] < lim then
      lim = s["x"]
    end
    if lim ~= nil then
      limits[j] = lim
      used[#used + 1] = j
    elseif s["a"] then
      limits[s["a"]] = 1
      used[#used + 1] = s["a"]
    end
  end
end

if primary > 0 and limits[primary] == nil and specs[primary]["a"] then
  primary = specs[primary]["a"]
end

-- Check every slot before taking any.
for _, j in ipairs(used) do
  local h, m, r = KEYS[4 * j - 3], KEYS[4 * j - 2], KEYS[4 * j]
  prune(h, m, r)
  local count = redis.call("ZCARD", h)
  local mine = redis.call("ZSCORE", h, owner)
  local ahead
  if resume then
    redis.call("ZADD", r, "NX", now, owner)
    extend(r, lease)
    local since = redis.call("ZSCORE", r, owner)
    ahead = redis.call("ZCOUNT", r, "-inf", "(" .. since)
  else
    ahead = redis.call("ZCARD", r)
  end
  if mine or count + ahead >= limits[j] then
    -- blocked: remember the deferral on the primary slot, for status and explain
    if primary > 0 then
      local pm, pd = KEYS[4 * primary - 2], KEYS[4 * primary - 1]
      local rec = redis.call("HGET", pm, "?" .. owner)
      local first, times = now, 0
      if rec then
        local old = cjson.decode(rec)
        first, times = old["first"], old["n"]
      end
      local holder = mine and owner or (redis.call("ZRANGE", h, 0, 0)[1] or "")
      redis.call("ZREMRANGEBYSCORE", pd, "-inf", now - memory)
      redis.call("ZADD", pd, now, owner)
      redis.call("HSET", pm, "?" .. owner, cjson.encode({
        first = first, at = now, n = times + 1, blocked = h, holder = holder, limit = limits[j],
        info = holder_json,
      }))
      extend(pd, memory)
      extend(pm, memory)
    end
    local holder = mine and owner or (redis.call("ZRANGE", h, 0, 0)[1] or "")
    return {0, j, holder, limits[j]}
  end
end

-- Take them all.
local fence = 0
local taken = {}
for _, j in ipairs(used) do
  local h, m, d, r = KEYS[4 * j - 3], KEYS[4 * j - 2], KEYS[4 * j - 1], KEYS[4 * j]
  redis.call("ZADD", h, now + lease, owner)
  redis.call("HSET", m, owner, holder_json)
  if redis.call("ZREM", d, owner) == 1 then
    redis.call("HDEL", m, "?" .. owner)
  end
  if resume then
    redis.call("ZREM", r, owner)
  end
  extend(h, lease)
  extend(m, lease)
  taken[#taken + 1] = tostring(j)
end

-- The fence lives on the primary slot (else the last slot taken): it only ever grows
-- there, and falls back to server time when the slot's state has expired.
local fj = primary
if fj == 0 or limits[fj] == nil then
  fj = used[#used]
end
if fj ~= nil then
  local m = KEYS[4 * fj - 2]
  fence = math.max((tonumber(redis.call("HGET", m, "#f")) or 0) + 1, now)
  redis.call("HSET", m, "#f", fence)
end

return {1, fence, table.concat(taken, ",")}
