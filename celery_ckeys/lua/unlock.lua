-- unlock.lua: the run's own end on a simple slot, the hot path's release.
-- docs/protocol.md section 6.2. It names only core.lua's give_own and now_ms, so it is
-- loaded with those.
--
-- KEYS  1..6 the slot's units (H), info (I), line (P), messages (M), resume order (R) and
--       wait tokens (V), as give.lua takes them   7 the run's memo key on that slot
-- ARGV  1 the hold token   2 ticket ("" none)   3 memo life ms   4 task id
-- Returns 1 freed; 0 nothing of the run's was held (its lease ran out, and maybe another
-- run took the slot since: that hold is left untouched, its own lease too); -1
-- release.lua must do it, nothing was changed: somebody is in line, woken, resuming or in
-- wait_for on the slot, its sorted set does not hold this run's token, or a unit there ran
-- out (release.lua prunes it, and what a lapsed reservation counted for a rate).
--
-- The slot is full (a sorted set) once any other run was admitted, deferred or parked on it
-- during this hold, even if nobody waits any more. That end is freed here too, not left to
-- release.lua: the gate may read this reply only after Celery stored the result, and a
-- client that has the result may enqueue the key's next run at once (protocol.md 6.2).

local token, who = ARGV[1], ARGV[4]
local v = redis.pcall("GET", KEYS[1])
local freed = 0
if type(v) == "table" and v.err then -- WRONGTYPE: a sorted set
  if redis.call("EXISTS", KEYS[3], KEYS[4], KEYS[5], KEYS[6]) > 0
      or redis.call("HGET", KEYS[2], who) ~= token
      or redis.call("ZCOUNT", KEYS[1], 0, now_ms()) > 0 then
    return -1
  end
  give_own(KEYS[1], KEYS[2], who)
  freed = 1
elseif v == token then
  redis.call("DEL", KEYS[1])
  freed = 1
end
if ARGV[2] ~= "" then
  redis.call("PSETEX", KEYS[7], ARGV[3], "done:" .. ARGV[2])
end
return freed
