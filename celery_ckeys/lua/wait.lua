-- wait.lua: a run steps out of its slots to wait for a child, and back in line to resume.
--
-- KEYS, eight per slot j = 1..n (b = 8j - 8):
--   KEYS[b+1]  holders   ZSET  owner -> lease expiry (ms)
--   KEYS[b+2]  waiting   ZSET  owner -> lease expiry of a run blocked in wait_for
--   KEYS[b+3]  resuming  ZSET  owner -> when it became ready to resume (ms); these go first
--   KEYS[b+4]  wake      LIST  pushed to when a slot frees while runs wait to resume
--   KEYS[b+5]  meta      HASH  owner -> holder JSON
--   KEYS[b+6]  parked    ZSET  the handoff line (see acquire.lua)
--   KEYS[b+7]  woken     ZSET  parked runs woken, on their way
--   KEYS[b+8]  messages  HASH  parked or woken runs' messages
-- ARGV[1]  "step-out"  the owner gives its slots back and is listed as waiting (it holds
--                      nothing, so other runs, its child among them, can start); like a
--                      release, each slot given back wakes its oldest parked run
--          "ready"     the child finished: a waiting owner moves to the resuming set, so
--                      that from now on it goes ahead of runs that have not started
--          "leave"     the owner stops waiting and resuming altogether
-- ARGV[2]  owner: the waiting run's task id
-- ARGV[3]  lease, ms (how long a waiting entry lives unless renewed)
--
-- Returns {changed, wake...}: the number of slots whose state changed, then the messages of
-- parked runs woken (step-out only), for the caller to publish.

local op, owner, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local reply = {0}
local changed = 0

for j = 1, #KEYS / 8 do
  local b = 8 * j - 8
  local h, w, r, wake, m = KEYS[b + 1], KEYS[b + 2], KEYS[b + 3], KEYS[b + 4], KEYS[b + 5]
  local p, v, msgs = KEYS[b + 6], KEYS[b + 7], KEYS[b + 8]
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

reply[1] = changed
return reply
