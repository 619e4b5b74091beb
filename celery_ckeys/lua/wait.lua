-- wait.lua: a run steps out of its slots to wait for a child, and back in line to resume.
--
-- KEYS, four per slot j = 1..n (b = 4j - 4):
--   KEYS[b+1]  holders   ZSET  owner -> lease expiry (ms)
--   KEYS[b+2]  waiting   ZSET  owner -> lease expiry of a run blocked in wait_for
--   KEYS[b+3]  resuming  ZSET  owner -> when it became ready to resume (ms); these go first
--   KEYS[b+4]  meta      HASH  owner -> holder JSON
-- ARGV[1]  "enter"     the owner is listed as waiting on these slots; wait_for sends this in
--                      the same pipeline as release.lua, which gives the slots back (and
--                      wakes a parked run for each), so other runs, its child among them, can
--                      start while it waits
--          "ready"     the child finished: a waiting owner moves to the resuming set, so
--                      that from now on it goes ahead of runs that have not started
--          "leave"     the owner stops waiting and resuming altogether
-- ARGV[2]  owner: the waiting run's task id
-- ARGV[3]  lease, ms (how long a waiting entry lives unless renewed)
--
-- Returns {changed}: the number of slots whose state changed.

local op, owner, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local changed = 0

for j = 1, #KEYS / 4 do
  local b = 4 * j - 4
  local h, w, r, m = KEYS[b + 1], KEYS[b + 2], KEYS[b + 3], KEYS[b + 4]
  if op == "enter" then
    if redis.call("ZSCORE", h, owner) then
      redis.call("ZADD", w, now + lease, owner)
      if redis.call("PTTL", w) < lease then
        redis.call("PEXPIRE", w, lease)
      end
      changed = changed + 1
    end
  elseif op == "ready" then
    if redis.call("ZREM", w, owner) == 1 then
      redis.call("ZADD", r, "NX", now, owner)
      if redis.call("PTTL", r) < lease then
        redis.call("PEXPIRE", r, lease)
      end
      changed = changed + 1
    end
  elseif op == "leave" then
    changed = changed + redis.call("ZREM", w, owner) + redis.call("ZREM", r, owner)
    if redis.call("ZSCORE", h, owner) == false then
      redis.call("HDEL", m, owner)
    end
  end
end

return {changed}
