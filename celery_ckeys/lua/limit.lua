-- limit.lua: resolve limit specs without taking anything (the queue-limit rule of
-- lib.lua, for Redis Cluster, where a queue's conf lives on a hash tag of its own, and
-- for the property test that holds LimitSpec.resolve to the same rule).
--
-- KEYS  as acquire.lua for n slots (only the conf keys the specs name are read or written).
-- ARGV  1 "1" to record trigger-time limits, "0" to only read   2 n   3.. one spec per slot
-- Returns one entry per slot: its limit when the run needs the slot, else -1 (an unlimited
-- queue; a conditional key mutex whose queue has a limit).

N = tonumber(ARGV[2])
resolve_all(N, 3, ARGV[1] == "1")
local out = {}
for j = 1, N do
  out[j] = USED[j] and LIM[j] or -1
end
return out
