-- unlock.lua: the run's own end on a simple slot, the hot path's release.
-- docs/protocol.md section 6.2. It names nothing of the library, so it is loaded alone.
--
-- KEYS  1 the slot's units key (h)   2 the run's memo key on that slot
-- ARGV  1 the hold token   2 ticket ("" none)   3 memo life ms   4 lease ms
-- Returns 1 freed; 0 nothing of the run's was held (its lease ran out, or another run took
-- the slot since: that hold is put back untouched); -1 the slot is full (h is a sorted set,
-- somebody waits there): release.lua must do it, nothing was changed.

local v = redis.pcall("GETDEL", KEYS[1])
if type(v) == "table" and v.err then
  return -1 -- WRONGTYPE
end
local freed = 0
if v == ARGV[1] then
  freed = 1
elseif v then
  redis.call("PSETEX", KEYS[1], ARGV[4], v)
end
if ARGV[2] ~= "" then
  redis.call("PSETEX", KEYS[2], ARGV[3], "done:" .. ARGV[2])
end
return freed
