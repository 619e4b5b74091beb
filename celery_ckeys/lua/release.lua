-- release.lua: give back what one run holds. docs/protocol.md section 6.2.
--
-- KEYS  as acquire.lua: nine role keys per slot, the n memo keys, the conf keys the specs
--       name, the sweep index (ARGV[9] gives its position; 0 under Cluster).
-- ARGV  1 mode: "normal" (the run's own end), "lost" (its pool process is gone),
--         "forfeit" (Celery discarded this copy: revoked, expired, unknown task), "unclaim"
--         (Redis Cluster: a copy gives back the unit woken for its ticket on a slot it does
--         not need, or whose stay already ran), "unreserve" (Redis Cluster: a resuming run,
--         wait token ARGV[3], leaves this slot's resume order for now), or "keep"
--         (Redis Cluster: a copy that took this unit, then found a later slot of its plan
--         full, keeps it as "@h" while it waits there; see acquire.lua)
--       2 task id
--       3 normal: the hold token; lost: the token prefix [task id, host, pid, naming the
--         dead process; forfeit: unused
--       4 ticket: normal and forfeit write the memo "done:"..ticket when it is not ""
--       5 lease ms   6 claim window ms   7 memo life ms (how long a copy of a woken run
--       may live: ckeys_handoff_copy_ttl)   8 unused   9 index key position
--       10 n   11.. one limit spec per slot (to refill with the limit resolved now)
-- Returns {released, wakes}: how many units were freed (a lease that had run out frees
-- nothing, so releasing twice frees nothing the second time), then the wakes to publish.

local mode, who, token, ticket = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local lease, window, memo = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local idx = ARGV[9] ~= "0" and KEYS[tonumber(ARGV[9])] or ""
N = tonumber(ARGV[10])
local SPECS = 11
local released = 0

-- Fast path: the run's own end on a simple slot.
if mode == "normal" and N == 1 then
  local v = redis.pcall("GETDEL", key(1, H))
  if v == token then
    if ticket ~= "" then
      redis.call("SET", memo_key(1), "done:" .. ticket, "PX", memo)
    end
    return {1, {}}
  end
  if type(v) == "string" then
    -- not ours (our lease ran out and another run took it): put it back untouched
    redis.call("SET", key(1, H), v, "PX", lease)
    v = false
  end
  if v == false then
    if ticket ~= "" then
      redis.call("SET", memo_key(1), "done:" .. ticket, "PX", memo)
    end
    return {0, {}}
  end
  -- a WRONGTYPE error: the slot is full; go the long way
end

now_ms()
resolve_all(N, SPECS, false)

for j = 1, N do
  load(j)
  local lim = LIM[j] or false
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
  else -- forfeit
    if info and (starts_with(info, "@w") or starts_with(info, "@h")) then
      redis.call("HDEL", key(j, M), who)
      give_back(j, who, lim, window, idx)
    end
    if redis.call("ZREM", key(j, P), who) == 1 then
      redis.call("HDEL", key(j, M), who)
    end
    redis.call("HDEL", key(j, F), who)
  end
  if ticket ~= "" and (mode == "normal" or mode == "forfeit") then
    redis.call("SET", memo_key(j), "done:" .. ticket, "PX", memo)
  end
end
settle_all(lease)
return {released, OUT}
