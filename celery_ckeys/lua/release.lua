-- release.lua: give back what one run holds. docs/protocol.md section 6.2. The run's own end
-- goes through unlock.lua (a simple slot) or give.lua (full slots, no ticket) first.
--
-- KEYS  as acquire.lua: ten role keys per slot, the n memo keys, the conf keys the specs
--       name, the sweep index (its position is in ARGV[5]; 0 under Cluster).
-- ARGV  1 mode: "normal" (the run's own end), "lost" (its pool process is gone),
--         "forfeit" (Celery discarded this copy: revoked, expired, unknown task), "unclaim"
--         (Redis Cluster: a copy gives back the unit woken for its ticket on a slot it does
--         not need, or whose stay already ran), "unreserve" (Redis Cluster: a resuming run,
--         wait token ARGV[3], leaves this slot's resume order for now), or "keep"
--         (Redis Cluster: a copy that took this unit, then found a later slot of its plan
--         full, keeps it as "@h" while it waits there; see acquire.lua), or "unmemo" (the
--         pool process of this copy died and Celery puts its message back: the memo
--         "done:"..ticket it may have left, its body ended but its result not stored, goes)
--       2 task id
--       3 normal: the hold token; lost: the token prefix [task id, host, pid, naming the
--         dead process; forfeit: unused
--       4 ticket: normal and forfeit write the memo "done:"..ticket when it is not "";
--         unmemo deletes that memo
--       5 "lease ms,claim window ms,memo life ms,index position" (the memo lives as long as
--         a copy of a woken run may: ckeys_handoff_copy_ttl)
--       6 n   7.. one limit spec per slot (to refill with the limit resolved now)
-- Returns {released, wakes}: how many units were freed (a lease that had run out frees
-- nothing, so releasing twice frees nothing the second time), then the wakes to publish.

local mode, who, token, ticket = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local lease, window, memo, at = string.match(ARGV[5], "^(%d+),(%d+),(%d+),(%d+)$")
lease, window, memo = tonumber(lease), tonumber(window), tonumber(memo)
local idx = at ~= "0" and KEYS[tonumber(at)] or ""
N = tonumber(ARGV[6])
local SPECS = 7
local released = 0

now_ms()
resolve_all(N, SPECS, false)

for j = 1, N do
  load(j)
  local lim = refill_limit(j)
  prune(j, lim, window, idx)
  local i = key(j, I)
  local info = redis.call("HGET", i, who)
  if mode == "normal" then
    if info == token then
      released = released + 1
      give_back(j, who, lim, window, idx)
    end
  elseif mode == "unclaim" then
    unclaim(j, who, ticket, lim, window, idx)
  elseif mode == "unreserve" then
    -- Redis Cluster: a resuming run blocked on an earlier slot leaves this one's order and
    -- gives back what was reserved here for its wait (token): the ordering rule
    redis.call("ZREM", key(j, R), who)
    if info == "@r" .. token then
      give_back(j, who, lim, window, idx)
    end
  elseif mode == "keep" then
    if info == token then
      redis.call("ZADD", key(j, H), NOW + lease, who)
      redis.call("HSET", key(j, I), who, "@h" .. ticket)
      rate_unstart(j, who) -- not started after all: pending again, until it claims for good
    end
  elseif mode == "lost" then
    if info and starts_with(info, token) then
      released = released + 1
      give_back(j, who, lim, window, idx)
    end
    local waiting = redis.call("HGET", key(j, V), who)
    if waiting and starts_with(waiting, token) then
      drop_wait(j, who)
      refill(j, lim, window, idx)
    end
  elseif mode == "unmemo" then
    if redis.call("GET", memo_key(j)) == "done:" .. ticket then
      redis.call("DEL", memo_key(j))
    end
  else -- forfeit
    if info and (starts_with(info, "@w") or starts_with(info, "@h")) then
      redis.call("HDEL", key(j, M), who)
      give_back(j, who, lim, window, idx)
    end
    if redis.call("ZREM", key(j, P), who) == 1 then
      redis.call("HDEL", key(j, M), who)
      fair_leave(j, who, nil)
    end
    redis.call("HDEL", key(j, F), who)
  end
  if ticket ~= "" and (mode == "normal" or mode == "forfeit") then
    redis.call("PSETEX", memo_key(j), memo, "done:" .. ticket)
  end
end
settle_all(lease)
return {released, OUT}
