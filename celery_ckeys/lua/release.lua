-- release.lua: give back the slots one run holds; compare-and-delete, never a bare DEL.
-- Each slot given back wakes the oldest run parked on it (handoff), unless runs back from
-- wait_for are waiting for it: they go first, and are woken through their wake list.
--
-- KEYS, seven per slot j = 1..n (b = 7j - 7):
--   KEYS[b+1]  holders   ZSET  owner -> lease expiry (ms)
--   KEYS[b+2]  meta      HASH  owner -> holder JSON
--   KEYS[b+3]  resuming  ZSET  runs back from wait_for, waiting for a slot here
--   KEYS[b+4]  wake      LIST  pushed to when runs wait to resume here, so they need not poll
--   KEYS[b+5]  parked    ZSET  owner -> first deferral (ms): the handoff line
--   KEYS[b+6]  woken     ZSET  owner -> when it was woken (ms)
--   KEYS[b+7]  messages  HASH  owner -> parked or woken run's message
-- ARGV[1]  owner: the run's task id
-- ARGV[2]  "" to release unconditionally (the run itself), or "<worker>\n<pid>": release only
--          the slots whose holder record names that worker and pool process. The worker's main
--          process uses this after a pool process died, so it can never free a slot that a
--          redelivered copy of the same task id has since taken elsewhere.
--
-- Returns {released, wake...}: the number of slots released (releasing twice releases nothing
-- the second time, and a lease that had already run out counts as nothing released), then the
-- message of each parked run woken, for the caller to publish.
-- Woken runs stay listed as woken (their place reserved) until they arrive.

local owner = ARGV[1]
local only = ARGV[2]
local released = 0
local reply = {0}
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

for j = 1, #KEYS / 7 do
  local b = 7 * j - 7
  local h, m, r, wake = KEYS[b + 1], KEYS[b + 2], KEYS[b + 3], KEYS[b + 4]
  local p, v, msgs = KEYS[b + 5], KEYS[b + 6], KEYS[b + 7]
  local ok = true
  if only ~= "" then
    local rec = redis.call("HGET", m, owner)
    ok = false
    if rec then
      local info = cjson.decode(rec)
      ok = (tostring(info["w"]) .. "\n" .. tostring(info["p"])) == only
    end
  end
  if only == "" then
    -- a normal end: a woken run's claim is settled (a worker-lost release keeps it, so the
    -- redelivered copy may go ahead)
    redis.call("HDEL", msgs, "~" .. owner)
  end
  local lease_end = ok and redis.call("ZSCORE", h, owner)
  if lease_end then
    redis.call("ZREM", h, owner)
    redis.call("HDEL", m, owner)
    if tonumber(lease_end) > now then
      released = released + 1  -- a lease that had already run out was not held any more
    end
    if redis.call("ZCARD", r) > 0 then
      redis.call("LPUSH", wake, owner)
      redis.call("LTRIM", wake, 0, 63)
      redis.call("PEXPIRE", wake, 60000)
    else
      local head = redis.call("ZPOPMIN", p)
      if #head > 0 then
        redis.call("ZADD", v, now, head[1])
        local msg = redis.call("HGET", msgs, head[1])
        if msg then
          reply[#reply + 1] = msg
        end
      end
    end
  end
end

reply[1] = released
return reply
