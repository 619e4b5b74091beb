-- give.lua: lite release, a run's own end on full slots when nobody waits on any of them.
-- docs/protocol.md section 6.2. It names only core.lua's give_own, so it is loaded with that.
--
-- KEYS  per slot j = 1..n, six keys (KEYS[6j-5..6j]): its units (H), info (I), line (P),
--       messages (M), resume order (R) and wait tokens (V)
-- ARGV  1 task id   2 the hold token
-- Returns the units freed, or -1: nothing was changed and release.lua must do it (somebody
-- is in line, woken, resuming or in wait_for on a slot; a slot is simple; or a slot that
-- has units does not hold this run's token: its lease ran out).

local who, token = ARGV[1], ARGV[2]
local n = #KEYS / 6
local waiting = {}
for j = 1, n do
  for role = 3, 6 do
    waiting[#waiting + 1] = KEYS[6 * j - 6 + role]
  end
end
if redis.call("EXISTS", unpack(waiting)) > 0 then
  return -1
end
-- a slot of the plan the run did not need holds nothing of it (and then has no units
-- key at all, or it would be somebody else's: the long way)
local mine = {}
for j = 1, n do
  local h, i = KEYS[6 * j - 5], KEYS[6 * j - 4]
  if redis.call("HGET", i, who) == token then
    mine[#mine + 1] = j
  elseif redis.call("EXISTS", h) == 1 then
    return -1
  end
end
for _, j in ipairs(mine) do
  give_own(KEYS[6 * j - 5], KEYS[6 * j - 4], who)
end
return #mine
