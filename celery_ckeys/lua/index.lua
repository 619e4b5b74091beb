-- index.lua: the handoff's sweep index under Redis Cluster, where it lives on a hash tag of
-- its own and the slot scripts cannot keep it (docs/protocol.md section 9).
--
-- KEYS  1 the index ZSET: slot tag -> when it is next due for a sweep (ms, server time)
-- ARGV  1 op: "note"   (2 tag, 3 ms): due in ms from now, set before a run may park there;
--                       it overwrites, so a sweeper's compare-and-delete that raced it fails
--             "soon"   (2 tag, 3 ms): due in ms from now unless due sooner already (after a
--                       run parked behind a rate or a throttle that ends before the countdown)
--             "settle" (2 tag, 3 due ms or -1, 4 the score the sweeper read): -1 removes the
--                       entry only if it still has the score read; else it is set to due
-- Returns nothing.

local op, tag = ARGV[1], ARGV[2]
if op == "note" or op == "soon" then
  local t = redis.call("TIME")
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if op == "note" then
    redis.call("ZADD", KEYS[1], now + tonumber(ARGV[3]), tag)
  else
    redis.call("ZADD", KEYS[1], "LT", now + tonumber(ARGV[3]), tag)
  end
else
  local due = tonumber(ARGV[3])
  if due < 0 then
    if tonumber(redis.call("ZSCORE", KEYS[1], tag) or "-1") == tonumber(ARGV[4]) then
      redis.call("ZREM", KEYS[1], tag)
    end
  else
    redis.call("ZADD", KEYS[1], "XX", due, tag)
  end
end
return {}
