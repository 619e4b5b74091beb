-- take.lua: lite admission, the uncontended case on full slots (a queue partition, the
-- environment, several slots at once). docs/protocol.md section 6.1. It names the limit
-- rule of core.lua and none of the line's helpers, so it is loaded with that rule alone.
--
-- KEYS  as acquire.lua (ten role keys per slot, the memo keys, the conf keys the specs name,
--       the sweep index), of which it reads or writes only H, I, P, M, R, V, F and the conf
-- ARGV  1 task id   2 the hold token   3 lease ms   4 primary slot (its deferral record goes;
--       negative as in acquire.lua; 0: a run never deferred, which has no record)
--       5 n   6.. one limit spec per slot (core.lua resolve_limit)
-- Returns "j1,j2,..." the slots taken (every one the run needs), or 0: nothing was taken,
-- acquire.lua must decide (somebody is in line, woken, resuming or in wait_for on a slot;
-- the run is there already; a slot is simple; or no room counting expired units too).

local who, token, lease, primary = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
N = tonumber(ARGV[5])
resolve_all(N, 6, true)

-- A unit whose time ran out still counts here: that errs only towards the long way, which
-- prunes it (S1 is never at risk; L1 holds because the run it blocks goes the long way).
local waiting = {}
for j = 1, N do
  if USED[j] then
    local n = redis.pcall("ZCOUNT", key(j, H), 0, "+inf") -- an error: a simple slot
    if type(n) ~= "number" or n >= LIM[j] or RATE[j]
        or redis.call("HEXISTS", key(j, I), who) == 1 then
      return 0 -- (a rate-limited slot logs its starts: the long way)
    end
    waiting[#waiting + 1] = key(j, P)
    waiting[#waiting + 1] = key(j, R)
    waiting[#waiting + 1] = key(j, M)
    waiting[#waiting + 1] = key(j, V)
  end
end
if #waiting == 0 or redis.call("EXISTS", unpack(waiting)) > 0 then
  return 0
end

now_ms()
local taken = {}
for j = 1, N do
  if USED[j] then
    redis.call("ZADD", key(j, H), NOW + lease, who)
    redis.call("HSET", key(j, I), who, token, remember(j))
    redis.call("PEXPIRE", key(j, H), lease)
    redis.call("PEXPIRE", key(j, I), lease)
    taken[#taken + 1] = tostring(j)
  end
end
if primary ~= 0 then -- (negative: a look, which clears the record too)
  redis.call("HDEL", key(math.abs(primary), F), who)
end
return table.concat(taken, ",")
