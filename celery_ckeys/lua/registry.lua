-- registry.lua: which workers serve which broker queues, and which runs are blocked in
-- wait_for where (for WaitStarvation). All keys share the namespace's workers tag.
--
-- KEYS  1 registry HASH host -> JSON info (with "expires", ms server time)
--       2 blocked  ZSET run task id -> lease expiry (ms)
--       3 where    HASH run task id -> host
-- ARGV  1 op: "register" (2 host, 3 info JSON, 4 lifetime ms)
--             "block"    (2 task id, 3 host, 4 lease ms): listed, or renewed, as blocked
--             "unblock"  (2 task id)
--             "read"     returns {now ms, registry HGETALL, blocked ZRANGE WITHSCORES, where HGETALL}
-- Returns as above; nothing for the writes.

local op = ARGV[1]
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if op == "register" then
  local info = cjson.decode(ARGV[3])
  info["expires"] = now + tonumber(ARGV[4])
  redis.call("HSET", KEYS[1], ARGV[2], cjson.encode(info))
  redis.call("PEXPIRE", KEYS[1], ARGV[4])
elseif op == "block" then
  local lease = tonumber(ARGV[4])
  redis.call("ZADD", KEYS[2], now + lease, ARGV[2])
  redis.call("ZREMRANGEBYSCORE", KEYS[2], "-inf", now)
  redis.call("HSET", KEYS[3], ARGV[2], ARGV[3])
  redis.call("PEXPIRE", KEYS[2], lease)
  redis.call("PEXPIRE", KEYS[3], lease)
elseif op == "unblock" then
  redis.call("ZREM", KEYS[2], ARGV[2])
  redis.call("HDEL", KEYS[3], ARGV[2])
elseif op == "read" then
  return {now, redis.call("HGETALL", KEYS[1]), redis.call("ZRANGE", KEYS[2], 0, -1, "WITHSCORES"),
          redis.call("HGETALL", KEYS[3])}
end
return {}
