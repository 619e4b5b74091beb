-- acquire.lua: take every slot a run needs, or none of them (all-or-nothing admission).
--
-- KEYS, seven per slot j = 1..n, in this order (b = 7j - 7):
--   KEYS[b+1]  holders   ZSET  owner -> lease expiry (ms, server time)
--   KEYS[b+2]  meta      HASH  owner -> holder JSON; "?"..owner -> deferral JSON (first and last
--                              deferral, count, the full slot's holders key, one holder of it);
--                              "#f" -> last fence
--   KEYS[b+3]  deferred  ZSET  owner -> time of its last deferral (ms)
--   KEYS[b+4]  resuming  ZSET  owner -> when it asked to resume (ms); resuming runs go first
--   KEYS[b+5]  parked    ZSET  owner -> when it was first deferred (ms): handoff's line, FIFO
--   KEYS[b+6]  woken     ZSET  owner -> when it was woken (ms): popped from the line, its message
--                              re-published, its place reserved until it arrives
--   KEYS[b+7]  messages  HASH  owner -> the parked or woken run's message (JSON); "#l" -> the
--                              slot's limit when a run last parked (for the sweeper);
--                              "~"..owner -> when a woken run claimed its place (cleared by its
--                              normal release; lets a redelivery of a copy that died go ahead)
-- then the conf HASHes that specs point at (KEYS[7n+1..]).
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
-- ARGV[7]  who asks: "fresh" (a run that has not started), "resume" (back from wait_for: it
--          waits only for runs that resumed earlier) or "woken" (a parked run the handoff woke:
--          it waits for resuming runs and runs woken before it, never for fresh ones; if it is
--          no longer listed as woken, and no claim of it survives a copy that died, it is a
--          duplicate copy and is turned away)
-- ARGV[8]  the run's message (JSON) to park when it is blocked (handoff), or "" to not park
-- ARGV[9]  when the run was first deferred (ms), its place in the parked line
--
-- Fresh runs never pass runs that are parked or woken on a slot: when such a slot has room
-- (a wake was lost, or a holder's lease ran out), the fresh run wakes the oldest parked run
-- instead of taking the room, and stands in line itself.
--
-- Returns {1, fence, "j1,j2,..."}         every slot was taken; fence only ever grows per primary
--                                         slot; the string lists the slots actually taken
--         {0, j, holder, limit, parked, wake...}
--                                         slot j is full; holder is one owner in it ("" when it is
--                                         reserved); parked is 1 when the run now waits in slot j's
--                                         line, 2 when it started that line (the caller lists it
--                                         for the sweeper); each wake is a woken run's message
--         {2}                             a woken run that is no longer woken: a duplicate copy

local owner = ARGV[1]
local lease = tonumber(ARGV[2])
local holder_json = ARGV[3]
local specs = cjson.decode(ARGV[4])
local primary = tonumber(ARGV[5])
local memory = tonumber(ARGV[6])
local mode = ARGV[7]
local message = ARGV[8]
local first_deferred = tonumber(ARGV[9]) or 0

local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function key(j, i)
  return KEYS[7 * j - 7 + i]
end

local function extend(k, ms)
  if redis.call("PTTL", k) < ms then
    redis.call("PEXPIRE", k, ms)
  end
end

-- Drop expired holders; returns whether the slot has reservations or a line (resuming,
-- parked or woken runs). Most slots have none, and then one EXISTS answers for all three.
local function prune(j)
  local h, m = key(j, 1), key(j, 2)
  if redis.call("ZCOUNT", h, "-inf", now) > 0 then
    local expired = redis.call("ZRANGEBYSCORE", h, "-inf", now)
    redis.call("ZREMRANGEBYSCORE", h, "-inf", now)
    redis.call("HDEL", m, unpack(expired))
  end
  if redis.call("EXISTS", key(j, 4), key(j, 5), key(j, 6)) == 0 then
    return false
  end
  -- a resuming run that vanished must not hold its reservation for ever
  redis.call("ZREMRANGEBYSCORE", key(j, 4), "-inf", now - lease)
  -- a woken run that never arrived (its message lost, and no sweeper for a whole lease)
  -- goes back in line at its old place: parked runs are never dropped
  local gone = redis.call("ZRANGEBYSCORE", key(j, 6), "-inf", now - lease)
  for _, who in ipairs(gone) do
    redis.call("ZREM", key(j, 6), who)
    local msg = redis.call("HGET", key(j, 7), who)
    local first = now
    if msg then
      first = tonumber(cjson.decode(msg)["first"]) or now
    end
    redis.call("ZADD", key(j, 5), "NX", first, who)
  end
  return true
end

-- Pop the oldest parked run of slot j into the woken set; returns its message or nil.
local function wake_one(j)
  local head = redis.call("ZPOPMIN", key(j, 5))
  if #head == 0 then
    return nil
  end
  local who = head[1]
  redis.call("ZADD", key(j, 6), now, who)
  return redis.call("HGET", key(j, 7), who)
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

-- A woken run must still be listed as woken on some slot it needs; else it is a duplicate.
-- A woken run may also come back after the copy that claimed its place died mid-body
-- (Celery redelivers it): the claim ("~"..owner in messages) stays until a normal release,
-- so that copy may go ahead as long as nobody holds the slots in its name.
if mode == "woken" then
  local listed, claimed, running = false, false, false
  for _, j in ipairs(used) do
    if redis.call("ZSCORE", key(j, 6), owner) then
      listed = true
    end
    if redis.call("HEXISTS", key(j, 7), "~" .. owner) == 1 then
      claimed = true
    end
    if redis.call("ZSCORE", key(j, 1), owner) then
      running = true
    end
  end
  if not listed and (running or not claimed) then
    return {2}
  end
end

-- Check every slot before taking any.
local queued = {}
for _, j in ipairs(used) do
  queued[j] = prune(j)
  local h, r, p, v = key(j, 1), key(j, 4), key(j, 5), key(j, 6)
  local count = redis.call("ZCARD", h)
  local mine = redis.call("ZSCORE", h, owner)
  local ahead = 0
  local line = 0
  if mode ~= "resume" and not queued[j] then
    -- nobody resuming, parked or woken here: only the holders count
  elseif mode == "resume" then
    redis.call("ZADD", r, "NX", now, owner)
    extend(r, lease)
    ahead = redis.call("ZCOUNT", r, "-inf", "(" .. redis.call("ZSCORE", r, owner))
  elseif mode == "woken" then
    ahead = redis.call("ZCARD", r)
    local since = redis.call("ZSCORE", v, owner)
    if since then
      ahead = ahead + redis.call("ZCOUNT", v, "-inf", "(" .. since)
    else
      ahead = ahead + redis.call("ZCARD", v)
    end
  else
    ahead = redis.call("ZCARD", r) + redis.call("ZCARD", v)
    line = redis.call("ZCARD", p)
    if redis.call("ZSCORE", p, owner) then
      line = line - 1  -- a redelivered copy of a parked run does not wait behind itself
    end
  end
  if mine or count + ahead >= limits[j] or line > 0 then
    local wakes = {}
    if not mine and line > 0 and count + ahead < limits[j] then
      -- room that nobody in line was woken for: wake the oldest instead of passing it
      local woke = wake_one(j)
      if woke then
        wakes[#wakes + 1] = woke
      end
    end
    local holder = mine and owner or (redis.call("ZRANGE", h, 0, 0)[1] or "")
    local parked = 0
    if message ~= "" and not mine then
      -- handoff: wait in this slot's line (keeping an earlier place), in Redis, not a worker
      for _, k in ipairs(used) do
        local off = redis.call("ZREM", key(k, 6), owner)
        if k ~= j then
          off = off + redis.call("ZREM", key(k, 5), owner)
          if off > 0 then
            redis.call("HDEL", key(k, 7), owner)
          end
        end
      end
      -- no expiry: Redis drops an empty line by itself, and a parked run must never vanish
      local fresh_line = redis.call("EXISTS", p) == 0
      redis.call("ZADD", p, "NX", first_deferred > 0 and first_deferred or now, owner)
      redis.call("HSET", key(j, 7), owner, message, "#l", limits[j])
      parked = fresh_line and 2 or 1
      -- status lists it in the line; it is not also a countdown deferral
      if primary > 0 and redis.call("ZREM", key(primary, 3), owner) == 1 then
        redis.call("HDEL", key(primary, 2), "?" .. owner)
      end
    elseif primary > 0 then
      -- a countdown deferral: remember it on the primary slot, for status and explain
      local pm, pd = key(primary, 2), key(primary, 3)
      local rec = redis.call("HGET", pm, "?" .. owner)
      local first, times = now, 0
      if rec then
        local old = cjson.decode(rec)
        first, times = old["first"], old["n"]
      end
      redis.call("ZREMRANGEBYSCORE", pd, "-inf", now - memory)
      redis.call("ZADD", pd, now, owner)
      redis.call("HSET", pm, "?" .. owner, cjson.encode({
        first = first, at = now, n = times + 1, blocked = h, holder = holder, limit = limits[j],
        info = holder_json,
      }))
      extend(pd, memory)
      extend(pm, memory)
    end
    local reply = {0, j, holder, limits[j], parked}
    for _, w in ipairs(wakes) do
      reply[#reply + 1] = w
    end
    return reply
  end
end

-- Take them all.
local taken = {}
for _, j in ipairs(used) do
  local h, m = key(j, 1), key(j, 2)
  redis.call("ZADD", h, now + lease, owner)
  redis.call("HSET", m, owner, holder_json)
  if redis.call("ZREM", key(j, 3), owner) == 1 then
    redis.call("HDEL", m, "?" .. owner)
  end
  if mode == "resume" then
    redis.call("ZREM", key(j, 4), owner)
  end
  if queued[j] or mode ~= "fresh" then
    -- no longer woken or parked anywhere (also drops a stale copy's place in line)
    local off = redis.call("ZREM", key(j, 6), owner) + redis.call("ZREM", key(j, 5), owner)
    if off > 0 then
      redis.call("HDEL", key(j, 7), owner)
    end
    if mode == "woken" then
      -- the claim: a redelivery of this woken run may still come if this copy dies
      redis.call("HSET", key(j, 7), "~" .. owner, now)
    end
  end
  extend(h, lease)
  extend(m, lease)
  taken[#taken + 1] = tostring(j)
end

-- The fence lives on the primary slot (else the last slot taken): it only ever grows
-- there, and falls back to server time when the slot's state has expired.
local fence = 0
local fj = primary
if fj == 0 or limits[fj] == nil then
  fj = used[#used]
end
if fj ~= nil then
  local m = key(fj, 2)
  fence = math.max((tonumber(redis.call("HGET", m, "#f")) or 0) + 1, now)
  redis.call("HSET", m, "#f", fence)
end

return {1, fence, table.concat(taken, ",")}
