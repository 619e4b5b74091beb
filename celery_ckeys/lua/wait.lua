-- wait.lua: a run steps out of its units to wait for a child, and is told when to resume.
-- docs/protocol.md section 6.3.
--
-- KEYS  as acquire.lua (ten role keys per slot, n memo keys, conf keys, sweep index).
-- ARGV  1 "enter": the run gives back every unit it holds with hold token ARGV[3] and is
--         listed as waiting with wait token ARGV[4] (one call: nothing can reorder the two)
--         "ready": its child reached a final state; a run still waiting with wait token
--         ARGV[4] joins the resume order, and gets a reserved unit at once where there
--         is room and nobody resumes before it
--       2 task id   3 hold token (enter)   4 wait token
--       5 lease ms   6 claim window ms   7 countdown ms   8 unused   9 index key position
--       10 n   11.. one limit spec per slot
-- Returns {changed, wakes}: the slots whose state changed, then the wakes to publish.

local op, who, token, wait_token = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local lease, window, countdown = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local idx = ARGV[9] ~= "0" and KEYS[tonumber(ARGV[9])] or ""
N = tonumber(ARGV[10])
local SPECS = 11
local changed = 0

now_ms()
resolve_all(N, SPECS, false)

for j = 1, N do
  load(j)
  local lim = refill_limit(j)
  prune(j, lim, window, idx)
  if op == "enter" then
    if redis.call("HGET", key(j, I), who) == token then
      give_back(j, who, lim, window, idx)
      redis.call("ZADD", key(j, H), -1, WAITER .. who)
      redis.call("ZADD", key(j, W), NOW + lease, who)
      redis.call("HSET", key(j, V), who, wait_token)
      extend(key(j, W), lease)
      extend(key(j, V), lease)
      changed = changed + 1
    end
  elseif redis.call("HGET", key(j, V), who) == wait_token
      and redis.call("HEXISTS", key(j, I), who) == 0 then
    local r = key(j, R)
    if redis.call("EXISTS", r) == 0 and (not lim or units(j) < lim) then
      reserve_resume(j, who)
    else
      redis.call("ZADD", r, "NX", NOW, who)
      index(idx, j, NOW + countdown) -- the sweeper drops it there if its waiter dies
    end
    changed = changed + 1
  end
end
settle_all(lease)
return {changed, OUT}
