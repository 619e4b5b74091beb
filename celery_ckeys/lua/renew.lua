-- renew.lua: extend the lease of every slot one run still holds.
--
-- KEYS, two per slot j = 1..n:
--   KEYS[2j-1]  holders  ZSET  owner -> lease expiry (ms)
--   KEYS[2j]    meta     HASH  owner -> holder JSON
-- ARGV[1]  owner: the run's task id
-- ARGV[2]  new lease, ms from now (server time)
--
-- Returns the number of slots renewed. A slot the owner no longer holds (its lease ran out
-- and someone else may have it) is never taken back: fewer than n means the lease was lost.

local owner = ARGV[1]
local lease = tonumber(ARGV[2])
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local renewed = 0

for j = 1, #KEYS / 2 do
  local h, m = KEYS[2 * j - 1], KEYS[2 * j]
  local score = redis.call("ZSCORE", h, owner)
  if score and tonumber(score) > now then
    redis.call("ZADD", h, "XX", now + lease, owner)
    if redis.call("PTTL", h) < lease then
      redis.call("PEXPIRE", h, lease)
    end
    if redis.call("PTTL", m) < lease then
      redis.call("PEXPIRE", m, lease)
    end
    renewed = renewed + 1
  end
end

return renewed
