-- sweep.lua: the handoff's safety net for one slot. docs/protocol.md section 6.7.
-- Every worker's main process runs it each second on the slots the index says are due.
--
-- KEYS  the ten role keys of the slot, its memo key (unused), the conf keys the spec
--       names, the sweep index (ARGV[5] gives its position; 0 under Cluster).
-- ARGV  1 claim window ms   2 countdown ms   3 lease ms   4 unused   5 index key position
--       6 "1"   7 the slot's limit spec ("#" as the declared part: the limit last resolved
--       on the slot)
-- Returns {next due (ms, server time; -1 when nothing waits here any more), wakes}.
--   * an expired woken reservation is woken again (its message published again, same
--     ticket, a new claim window); expired holds and waits go;
--   * room nobody was given (a holder's lease ran out, the limit was raised) goes to
--     resuming runs, then to the line;
--   * a slot still busy is looked at again after a claim window (it has reservations) or a
--     countdown (it only has a line); one with neither leaves the index.

local window, countdown, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local idx = ARGV[5] ~= "0" and KEYS[tonumber(ARGV[5])] or ""
N = 1
now_ms()
resolve_all(1, 7, false)
load(1)
prune(1, LIM[1] or false, window, idx)
refill(1, LIM[1] or false, window, idx)
settle_all(lease)

local due = -1
local line = redis.call("ZCARD", key(1, P))
local woken = redis.call("HLEN", key(1, M)) - line
if woken > 0 then
  due = NOW + window
elseif line > 0 or redis.call("EXISTS", key(1, R)) == 1 then
  due = math.min(THROTTLED[1] or RATE_DUE[1] or (NOW + countdown), NOW + countdown)
end
if idx ~= "" then
  if due < 0 then
    redis.call("ZREM", idx, tag_of(1))
  else
    redis.call("ZADD", idx, due, tag_of(1))
  end
end
return {due, OUT}
