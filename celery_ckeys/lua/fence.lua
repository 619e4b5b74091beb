-- fence.lua: the fencing token of a run that still holds its primary slot.
-- docs/protocol.md section 6.6.
--
-- KEYS  the ten role keys of the slot.
-- ARGV  1 task id   2 hold token
-- Returns the fence, or -1 when the run no longer holds the slot. Fences of one slot only
-- ever grow: holds of one unit never overlap, the server clock (µs) moves on between them,
-- and while the slot has state its last fence is kept ("#f") so that runs holding units of
-- it at once get distinct, growing fences too.

local who, token = ARGV[1], ARGV[2]
N = 1
local h, i = key(1, H), key(1, I)
local now = now_us()
if redis.call("TYPE", h)["ok"] == "string" then
  if redis.call("GET", h) == token then
    return now
  end
  return -1
end
if redis.call("HGET", i, who) ~= token then
  return -1
end
local fence = math.max(tonumber(redis.call("HGET", i, "#f") or "0") + 1, now)
redis.call("HSET", i, "#f", string.format("%d", fence))
return fence
