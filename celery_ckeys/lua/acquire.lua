-- acquire.lua: admit a run (take a unit of every slot it needs) or not, in one call.
-- docs/protocol.md sections 5 and 6.1.
--
-- KEYS  per slot j = 1..n: the ten role keys of lib.lua; then the n memo keys
--       ("ckeys:{tag}:x:<task id>"); then the queue conf HASHes the specs name (and the one
--       that may record the run's weight, ARGV 8); then, on
--       one Redis, the sweep index (its position is in ARGV[9]; 0 under Cluster).
-- ARGV  1 task id
--       2 the hold token it will hold with
--       3 lease ms
--       4 mode: "run"      a delivery of the run
--               "claimed"  the same, under Cluster, after it claimed its woken reservation on
--                          an earlier slot: it was first in line, so lines do not hold it back
--               "resume"   back from wait_for: claims the units reserved for it
--               "reserve"  under Cluster, resume's first pass: only makes sure a unit of each
--                          slot is reserved for it, converts nothing
--       5 run: the ticket the copy carries ("" none); resume, reserve: its wait token
--       6 ticket to park under when it carries none
--       7 message to park when blocked: "" never park (countdown), "?" ask for it
--       8 its place in a line, "order|priority|kept|replace|weight|conf|fair|key": order, its
--         first deferral (ms; 0: now); priority (higher first); kept 1 when, under Cluster, it
--         keeps a unit of an earlier slot; replace 1 (keep_latest): blocked on slot 1, the
--         other runs of its task waiting there (parked, or deferral records) go, and are
--         returned; the weight its code declares for its key ("": 1);
--         the position of the conf HASH that may record "weight:"..key (0: none); the fair
--         slots ("j.j": a total, the environment; "" none); its key (last: any character)
--       9 "claim window ms,countdown ms,deferral memory ms,primary slot,index position"
--         (primary slot negative: a look that records no deferral, but admitted clears the
--         run's record there; 0: neither)
--       10 n   11.. one limit spec per slot (lib.lua resolve_limit)
-- The uncontended cases rarely get here: the store takes an idle simple slot with a bare SET
-- NX PX (docs/protocol.md section 3, invariant I1) and free units of full slots with
-- take.lua, and calls this script only when those fail.
-- Returns, the last element always the wakes {j, "ticket\nmessage", ...} to publish:
--   {1, "j1,j2", claimed, wakes}        admitted; the slots taken; 1 if it claimed a woken
--                                       reservation (it was first in line), else 0
--   {0, j, holder, limit, parked, replaced, rate_wait, wakes}
--                                       slot j blocks; parked is 1 when the run now waits
--                                       in its line (handoff); replaced: the task ids that
--                                       stopped waiting for it (replace); rate_wait: ms
--                                       until slot j's rate (or throttle) lets a run start
--                                       (0: neither)
--   {2, "dup" | "parked", wakes}        a copy that must not run (protocol.md section 5)
--   {3, wakes}                          blocked, and the message to park was not given
--   {4, wakes}                          reserve: a unit of every slot is reserved for it

local who, token, lease, mode = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local ticket, new_ticket, message = ARGV[5], ARGV[6], ARGV[7]
local order, priority, kept_elsewhere, replacing, weight, weight_at, fair, fkey = string.match(
  ARGV[8], "^(%d+)|(%-?%d+)|([01])|([01])|(%d*)|(%d+)|([%d.]*)|(.*)$")
order, priority = tonumber(order), tonumber(priority)
local window, countdown, memory, primary, at = string.match(ARGV[9],
  "^(%d+),(%d+),(%d+),(%-?%d+),(%d+)$")
window, countdown, memory, primary = tonumber(window), tonumber(countdown), tonumber(memory),
  tonumber(primary)
local idx = at ~= "0" and KEYS[tonumber(at)] or ""
N = tonumber(ARGV[10])
local SPECS = 11
local resuming = mode == "resume" or mode == "reserve"

now_ms()
resolve_all(N, SPECS, not resuming)

-- What this run finds on each slot it needs.
local C = {}
local claimed = mode == "claimed"
for j = 1, N do
  if USED[j] then
    load(j)
    prune(j, LIM[j], window, idx)
    if resuming then
      local info = redis.call("HGET", key(j, I), who)
      if info == token then
        C[j] = "mine" -- this resume, sent again after its reply was lost
      elseif info == "@r" .. ticket then
        C[j] = "claim"
      else
        -- not reserved yet (or its wait ended without its child): in the resume order
        join_wait(j, who, ticket, lease)
        redis.call("ZADD", key(j, R), "NX", NOW, who)
        index(idx, j, NOW + countdown) -- the sweeper drops it there if its waiter dies
        C[j] = "resume"
      end
    else
      local found = classify(j, who, ticket, token)
      if found == "dup" or found == "parked" then
        if found == "dup" then
          -- its stay ran (or runs): a unit still woken for it anywhere is stale
          for k = 1, N do
            load(k)
            unclaim(k, who, ticket, refill_limit(k), window, idx)
          end
        end
        settle_all(lease)
        return {2, found, OUT}
      end
      C[j] = found
      claimed = claimed or found == "claim"
    end
  end
end

-- A unit woken for this copy on a slot its plan no longer needs goes back at once: it is
-- admitted, parked or deferred from here on without it.
if not resuming then
  for j = 1, N do
    if not USED[j] then
      load(j)
      unclaim(j, who, ticket, refill_limit(j), window, idx)
    end
  end
end

-- Check every slot before taking any.
local blocked = nil
for j = 1, N do
  if USED[j] then
    local c, ok = C[j], false
    if c == "mine" then
      ok = true -- this call, sent again: the unit is its own already
    elseif c == "claim" then
      ok = LIM[j] ~= 0 -- woken before a pause: it waits again, in line, for the resume
    elseif c == "resume" then
      ok = redis.call("ZRANGE", key(j, R), 0, 0)[1] == who
        and units(j) < LIM[j]
    elseif c == "fresh" then
      ok = units(j) < LIM[j] and redis.call("EXISTS", key(j, R)) == 0
        and (claimed or redis.call("EXISTS", key(j, P)) == 0) and rate_room(j) > 0
    end
    if not ok then
      blocked = j
      break
    end
  end
end

if blocked == nil then
  if mode == "reserve" then
    for j = 1, N do
      if USED[j] and C[j] == "resume" then
        redis.call("ZREM", key(j, R), who)
        reserve_resume(j, who)
      end
    end
    settle_all(lease)
    return {4, OUT}
  end
  local taken = {}
  for j = 1, N do
    if USED[j] then
      redis.call("ZADD", key(j, H), NOW + lease, who)
      redis.call("HSET", key(j, I), who, token, remember(j))
      if resuming then
        redis.call("ZREM", key(j, R), who)
        redis.call("ZREM", key(j, W), who)
        redis.call("HDEL", key(j, V), who)
        redis.call("ZREM", key(j, H), WAITER .. who)
      elseif C[j] == "claim" then
        redis.call("HDEL", key(j, M), who)
        redis.call("HDEL", key(j, I), "n:" .. who)
        rate_claimed(j, who) -- its start is now
      elseif C[j] ~= "mine" then
        rate_start(j, who)
      end
      taken[#taken + 1] = tostring(j)
    end
  end
  if resuming then
    -- a slot it waited on that it no longer needs (its limit was cleared meanwhile)
    for j = 1, N do
      if not USED[j] and redis.call("HEXISTS", key(j, V), who) == 1 then
        load(j)
        drop_wait(j, who)
        -- the unit reserved for it there goes to the line now: idle, the slot would go
        -- to a fresh run on the fast path ahead of those waiting (I1)
        refill(j, LIM[j], window, idx)
      end
    end
  end
  if primary ~= 0 then
    redis.call("HDEL", key(math.abs(primary), F), who)
  end
  settle_all(lease)
  return {1, table.concat(taken, ","), claimed and 1 or 0, OUT}
end

local b = blocked
local holder = some_holder(b)
if resuming then
  -- Keep the places it reached before slot b (first in the resume order with room becomes a
  -- reservation); after b it gives back what was reserved for it and leaves the order.
  -- Like a parked run (below), a waiting run keeps units only of slots earlier in its plan
  -- than the one it waits on, so no two runs ever wait on each other.
  for j = 1, N do
    if USED[j] and j < b and C[j] == "resume"
        and redis.call("ZRANGE", key(j, R), 0, 0)[1] == who and units(j) < LIM[j] then
      redis.call("ZREM", key(j, R), who)
      reserve_resume(j, who)
    elseif USED[j] and j > b then
      -- no priority there either until it gets past b: it joins that order again then
      redis.call("ZREM", key(j, R), who)
      if C[j] == "claim" then
        give_back(j, who, LIM[j], window, idx)
      end
    end
  end
  settle_all(lease)
  return {0, b, holder, LIM[b], 0, {}, 0, OUT}
end
if message == "?" and C[b] ~= "busy" then
  settle_all(lease)
  return {3, OUT}
end

-- What this copy claimed: the run now waits here (handoff) or in the broker (countdown).
-- Parking, it keeps ("@h") the units it claimed on slots *before* this one in its plan and
-- waits at the head of this line: plans always order slots partition, key, queue,
-- environment, so a run keeps units only of slots earlier than the one it waits on, and no
-- two runs can wait on each other (two woken runs that each claimed one of two slots both
-- need would otherwise hand them back and forth for ever). Everything else goes back.
local parking = message ~= "" and C[b] ~= "busy"
local kept = false
for j = 1, N do
  if USED[j] and C[j] == "claim" then
    redis.call("HDEL", key(j, M), who)
    if parking and j < b then
      local ticket_here = string.sub(redis.call("HGET", key(j, I), who), 3)
      redis.call("ZADD", key(j, H), NOW + lease, who)
      redis.call("HSET", key(j, I), who, "@h" .. ticket_here)
      kept = true
    else
      give_back(j, who, LIM[j], window, idx)
    end
  end
end

-- keep_latest: blocked on its own slot, this run replaces the runs of its task waiting there
local replaced = {}
if replacing == "1" and b == 1 and C[b] ~= "busy" then
  local task = cjson.decode(token)[6]
  for _, other in ipairs(redis.call("ZRANGE", key(b, P), 0, -1)) do
    local _, _, msg = string.find(redis.call("HGET", key(b, M), other) or "", "^[^\n]*\n(.*)$")
    local ok, parsed = pcall(cjson.decode, msg or "")
    if other ~= who and ok and type(parsed) == "table" and parsed["task"] == task then
      redis.call("ZREM", key(b, P), other)
      redis.call("HDEL", key(b, M), other)
      fair_leave(b, other, nil)
      replaced[#replaced + 1] = other
    end
  end
  -- deferred with a countdown: their records (on the primary slot) name their task
  local f = key(primary > 0 and primary or b, F)
  local records = redis.call("HGETALL", f)
  for n = 1, #records, 2 do
    local other = records[n]
    local ok, rec = pcall(cjson.decode, records[n + 1])
    local info = {}
    if ok and type(rec) == "table" and type(rec["info"]) == "string" then
      local fine, decoded = pcall(cjson.decode, rec["info"])
      info = fine and type(decoded) == "table" and decoded or {}
    end
    if other ~= who and redis.call("HEXISTS", key(b, I), other) == 1 then
      redis.call("HDEL", f, other) -- it runs (admitted on the fast path): a stale record
    elseif other ~= who and info[6] == task then
      redis.call("HDEL", f, other)
      replaced[#replaced + 1] = other
    end
  end
end

local parked = 0
if parking then
  -- (a copy of a run that executes right now waits in the broker instead: a run is never
  -- in a line of a slot it holds or waits on)
  -- a run that keeps units of earlier slots (here, or under Cluster in an earlier call)
  -- waits ahead of every run that keeps nothing, first come first served, unless the line
  -- is fair (protocol.md section 4.1)
  if redis.call("ZSCORE", key(b, P), who) == false then
    local is_fair = string.find("." .. fair .. ".", "." .. b .. ".", 1, true) ~= nil
    local w = 1
    if is_fair then
      local recorded = weight_at ~= "0" and redis.call("HGET", KEYS[tonumber(weight_at)],
        "weight:" .. fkey)
      w = tonumber(recorded or "") or tonumber(weight) or 1
    end
    redis.call("ZADD", key(b, P), line_score(b, who, order ~= 0 and order or NOW, priority,
      kept or kept_elsewhere == "1", is_fair, fkey, w), who)
  end
  redis.call("HSET", key(b, M), who, (ticket ~= "" and ticket or new_ticket) .. "\n" .. message)
  redis.call("HSET", key(b, I), remember(b))
  -- swept when it may go: once a throttle ends or the rate's window lets it start, else a
  -- countdown from now (a safety net)
  index(idx, b, math.min(THROTTLED[b] or RATE_DUE[b] or (NOW + countdown), NOW + countdown))
  if primary > 0 then
    redis.call("HDEL", key(primary, F), who)
  end
  parked = 1
elseif primary > 0 then
  -- a countdown deferral: remembered on the primary slot for status and explain
  local f = key(primary, F)
  local old = redis.call("HGET", f, who)
  local first, times = NOW, 0
  if old then
    local rec = cjson.decode(old)
    first, times = rec["first"], rec["n"]
  end
  redis.call("HSET", f, who, cjson.encode({first = first, at = NOW, n = times + 1,
    blocked = tag_of(b), holder = holder, limit = LIM[b], info = token}))
  extend(f, memory)
end
settle_all(lease)
local free_at = RATE_DUE[b] or THROTTLED[b] -- when its rate, or its throttle, lets it start
return {0, b, holder, LIM[b], parked, replaced, free_at and math.max(1, free_at - NOW) or 0, OUT}
