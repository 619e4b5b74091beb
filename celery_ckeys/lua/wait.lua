-- wait.lua: a run steps out of its slots to wait for a child, and back in line to resume.
--
-- KEYS, five per slot j = 1..n:
--   KEYS[5j-4]  holders   ZSET  owner -> lease expiry (ms)
--   KEYS[5j-3]  waiting   ZSET  owner -> lease expiry of a run blocked in wait_for
--   KEYS[5j-2]  resuming  ZSET  owner -> when it became ready to resume (ms); these go first
--   KEYS[5j-1]  wake      LIST  pushed to when a slot frees while runs wait to resume
--   KEYS[5j]    meta      HASH  owner -> holder JSON
-- ARGV[1]  "step-out"  the owner gives its slots back and is listed as waiting (it holds
--                      nothing, so other runs, its child among them, can start)
--          "ready"     the child finished: a waiting owner moves to the resuming set, so
--                      that from now on it goes ahead of runs that have not started
--          "leave"     the owner stops waiting and resuming altogether
-- ARGV[2]  owner: the waiting run's task id
-- ARGV[3]  lease, ms (how long a waiting entry lives unless renewed)
--
-- Returns the number of slots whose state changed.

local op, owner, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local changed = 0

for j = 1, #KEYS / 5 do
  local h, w, r, wake, m = KEYS[5 * j - 4], KEYS[5 * j - 3], KEYS[5 * j - 2], KEYS[5 * j - 1], KEYS[5 * j]
  if op == "step-out" then
    if redis.call("ZREM", h, owner) == 1 then
      redis.call("ZADD", w, now + lease, owner)
      if redis.call("PTTL", w) < lease then
        redis.call("PEXPIRE", w, lease)
      end
      changed = changed + 1
      if redis.call("ZCARD", r) > 0 then
        redis.call("LPUSH", wake, owner)
        redis.call("LTRIM", wake, 0, 63)
        redis.call("PEXPIRE", wake, 60000)
      end
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

return changed
