-- lib.lua: the rest of the library: units, lines, waits and their TTLs, for every script
-- that works on a slot's line. store.py loads it after core.lua, which states the KEYS
-- layout and the key roles used here.

local OUT = {} -- {slot index, "ticket\nmessage"} of each run woken: the caller publishes them
local TOUCHED = {} -- full slots this call changed; settle_all() gives each its TTL policy

local function now_us()
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The slot's tag, for the sweep index (every key of slot j is "ckeys:{tag}:role").
local function tag_of(j)
  return string.match(key(j, H), "^ckeys:{(.*)}:[^:]*$")
end

-- The memo key of slot j: after the N*9 slot keys come the N memo keys.
local function memo_key(j)
  return KEYS[N * ROLES + j]
end

-- Make sure key k lives at least ms more (never shortens it). Only for keys that always
-- expire; the units and the line get their TTL policy from settle().
local function extend(k, ms)
  if redis.call("PTTL", k) < ms then
    redis.call("PEXPIRE", k, ms)
  end
end

local WAITER = "\1" -- prefix of a waiting run's marker in H
-- The marker (score -1, not a unit) that keeps H in existence for a line on a slot with no
-- unit at all: one paused or throttled (limit 0), where a run parks with nobody holding (I1)
local KEEPER = "\2"

-- A run's score in a line (docs/protocol.md section 4.1): class - priority * BAND + t, where
-- t in [0, BAND) is its first deferral (ms since EPOCH) or, in a fair line, its virtual
-- start. Every class and priority offset is a multiple of BAND, so score % BAND gives t
-- back, and all scores stay integers a double holds exactly (|score| < 2^53).
local BAND = 2 ^ 40 -- ms: 34 years of first deferrals, or 10^9 turns of a fair line
local EPOCH = 1.7e12 -- ms: November 2023
local KEPT = -2048 * BAND -- the class of a run that keeps units of earlier slots
local HEAD_OF_LINE = -4096 * BAND -- a woken run put back in line: before everybody
local TURN = 10000 -- virtual time one turn of a key of weight 1 takes (weights: 1..100)

-- Live units (holds and reservations) of a full slot; markers (score -1) are not units.
local function units(j)
  return redis.call("ZCOUNT", key(j, H), 0, "+inf")
end

-- One run holding a unit of slot j, for messages ("" when none).
local function some_holder(j)
  return redis.call("ZRANGEBYSCORE", key(j, H), 0, "+inf", "LIMIT", 0, 1)[1] or ""
end

-- Fair lines (the shared slots: a queue's total, the environment) order runs of one
-- priority p by start-time fair queuing: a run of key k starts at max(#v:p, #F:p:k), and k's
-- next run a turn (TURN / weight) later; #v:p is the start of the run of priority p last
-- woken. Keys are served round robin, a key of weight w w turns a round, and within a key
-- first come first served. #n:p:k counts k's runs waiting in the line (each notes its class
-- and key in #k:<task id>); when none is left the key's turns are forgotten, so a key that
-- starts waiting again gets the current turn and the state is bounded by the runs waiting.
local function fair_start(j, who, fkey, weight, priority)
  local i = key(j, I)
  local pk = priority .. ":" .. fkey
  local got = redis.call("HMGET", i, "#v:" .. priority, "#F:" .. pk)
  local start = math.max(tonumber(got[1] or "0"), tonumber(got[2] or "0"))
  start = math.min(start, BAND - 1) -- 10^8 turns without a pause: ties, never another class
  redis.call("HSET", i, "#fair", 1, "#F:" .. pk, start + math.max(1, math.floor(TURN / weight)),
    "#k:" .. who, pk)
  redis.call("HINCRBY", i, "#n:" .. pk, 1)
  return start
end

-- Where a parking run goes in slot j's line: its score (see BAND).
local function line_score(j, who, at, priority, kept, fair, fkey, weight)
  local t
  if fair then
    t = fair_start(j, who, fkey, weight, priority)
    kept = false -- in a fair line the turn decides, not what the run keeps elsewhere
  else
    t = math.max(0, math.min(at - EPOCH, BAND - 1))
  end
  return (kept and KEPT or 0) - priority * BAND + t
end

-- Run `who` leaves fair line j: woken (score: its score; virtual time moves to its start),
-- or dropped (nil). A no-op for a line that is not fair, or a run put back at its head.
local function fair_leave(j, who, score)
  local i = key(j, I)
  local pk = redis.call("HGET", i, "#k:" .. who)
  if not pk then
    return
  end
  redis.call("HDEL", i, "#k:" .. who)
  local p = string.match(pk, "^(%-?%d+):")
  if score then
    local t = tonumber(score) % BAND
    if t > tonumber(redis.call("HGET", i, "#v:" .. p) or "0") then
      redis.call("HSET", i, "#v:" .. p, t)
    end
  end
  if redis.call("HINCRBY", i, "#n:" .. pk, -1) <= 0 then
    redis.call("HDEL", i, "#n:" .. pk, "#F:" .. pk)
  end
end

-- A rate-limited slot (core.lua RATE[j]) logs each start in S; at most n starts fall in any
-- window of its length: a start is allowed only while fewer than n are in the window ending
-- now. Returns the starts still allowed now, and (none allowed) when the next one will be.
local RATE_DUE = {} -- slot j -> when a run waiting for the rate may start
-- A run woken from the line has a *pending* entry (member: its task id, score PENDING + the
-- time it was woken): it counts until its copy claims (the entry then gets the claim time:
-- its start) or its reservation goes (the entry goes too), so neither a slow claim nor a
-- re-wake lets more than n begin in a window.
local PENDING = 1e13

-- Rates are N/s, N/m or N/h (validation.py): no rate's window is longer than an hour.
local LONGEST_RATE_WINDOW = 3600000

-- Once its last pending entry went, the log lives a window past now (every start in it is
-- older). A call that sees no rate (cleared meanwhile, or a stale read under Cluster) gives
-- it the longest window any rate can have: bounded, and never shorter than a live rate needs.
local function rate_log_settle(j)
  local log = key(j, S)
  if redis.call("ZCOUNT", log, PENDING, "+inf") == 0 then
    local window = RATE[j] and RATE[j][2] or LONGEST_RATE_WINDOW
    redis.call("PEXPIRE", log, math.max(redis.call("PTTL", log), window))
  end
end

-- A pending entry counts while its run's unit (the reservation) lives. One whose unit ran out
-- where no script pruned it (a bare release, unlock.lua or give.lua, does not prune other
-- runs' units; an idle slot's units key expires with them) started nothing: it goes, or a
-- log that is never pending-free again would block the rate for good. Returns how many went.
local function rate_drop_lapsed(j, log)
  local dropped = 0
  for _, who in ipairs(redis.call("ZRANGEBYSCORE", log, PENDING, "+inf")) do
    local until_ = redis.pcall("ZSCORE", key(j, H), who)
    if not until_ or (type(until_) ~= "table" and tonumber(until_) <= NOW) then
      redis.call("ZREM", log, who)
      dropped = dropped + 1
    end
  end
  if dropped > 0 then
    rate_log_settle(j)
  end
  return dropped
end

local function rate_room(j)
  local r = RATE[j]
  if not r then
    return 1000000, nil
  end
  local log = key(j, S)
  redis.call("ZREMRANGEBYSCORE", log, "-inf", NOW - r[2])
  local n = redis.call("ZCARD", log)
  if n >= r[1] then
    n = n - rate_drop_lapsed(j, log)
  end
  if n < r[1] then
    return r[1] - n, nil
  end
  local oldest = tonumber(redis.call("ZRANGE", log, 0, 0, "WITHSCORES")[2])
  -- all of them pending: look again in a window (a claim, or a lapsed reservation, frees it)
  RATE_DUE[j] = oldest < PENDING and oldest + r[2] or NOW + r[2]
  return 0, RATE_DUE[j]
end

-- A fresh run starts on slot j now: logged for the rate.
local function rate_start(j, who)
  local r = RATE[j]
  if r then
    redis.call("ZADD", key(j, S), NOW, who .. "@" .. NOW)
    redis.call("PEXPIRE", key(j, S), math.max(redis.call("PTTL", key(j, S)), r[2]))
  end
end

-- A run of the line is woken on slot j (pending), claims (its start is now), or its woken
-- or kept unit goes back unused (its pending entry goes).
local function rate_woken(j, who)
  if RATE[j] then
    redis.call("ZADD", key(j, S), PENDING + NOW, who)
    redis.call("PERSIST", key(j, S)) -- a pending entry lives as long as the reservation
  end
end

-- A run woken under a rate starts when it claims, whether or not this call sees the rate.
-- Its start gets a member of its own (as a fresh start's): the bare task id is only ever a
-- pending entry, so a later stay of the same id (a retry) woken while this start is still in
-- the window adds an entry rather than overwriting the start (a rate overrun).
local function rate_claimed(j, who)
  if redis.call("ZREM", key(j, S), who) == 1 then
    redis.call("ZADD", key(j, S), NOW, who .. "@" .. NOW)
    rate_log_settle(j)
  end
end

local function rate_unused(j, who)
  local score = redis.call("ZSCORE", key(j, S), who)
  if score and tonumber(score) >= PENDING then
    redis.call("ZREM", key(j, S), who)
    rate_log_settle(j)
  end
end

local function starts_with(s, prefix)
  return string.sub(s, 1, #prefix) == prefix
end

-- Redis Cluster: a run that took or claimed slot j in one step, and is blocked on a later
-- one, keeps its unit without having started: its newest start here (member who@ms) goes
-- back to the pending entry, which counts until it claims for good or the unit goes.
-- A call that sees no rate (cleared, or a stale read) leaves the start counted.
local function rate_unstart(j, who)
  if not RATE[j] then
    return
  end
  local log = key(j, S)
  local prefix = who .. "@"
  for _, m in ipairs(redis.call("ZREVRANGEBYSCORE", log, PENDING - 1, "-inf")) do
    if starts_with(m, prefix) and string.match(string.sub(m, #prefix + 1), "^%d+$") then
      redis.call("ZREM", log, m)
      rate_woken(j, who)
      return
    end
  end
end

-- A slot that is still simple (one hold in a STRING) becomes full (a ZSET), keeping that
-- hold and its remaining lease. Every path but the fast one works on full slots.
local function load(j)
  TOUCHED[j] = true
  local h = key(j, H)
  if redis.call("TYPE", h)["ok"] ~= "string" then
    return
  end
  local token = redis.call("GET", h)
  local ttl = redis.call("PTTL", h)
  redis.call("DEL", h)
  if ttl <= 0 then
    return
  end
  local owner = cjson.decode(token)[1]
  redis.call("ZADD", h, NOW + ttl, owner)
  redis.call("HSET", key(j, I), owner, token)
  TOUCHED[j] = true
end

-- Units and the line keep their keys without a TTL while anybody waits on the slot
-- (invariant I1: a slot with a line, resuming runs or woken messages is never idle);
-- otherwise they expire with the longest lease they could hold.
local function settle(j, lease)
  TOUCHED[j] = nil
  local h, i = key(j, H), key(j, I)
  if redis.call("EXISTS", key(j, P), key(j, R), key(j, M)) > 0 then
    if redis.call("EXISTS", h) == 0 then
      redis.call("ZADD", h, -1, KEEPER) -- nobody holds (paused, throttled): I1 holds still
    end
    redis.call("PERSIST", h)
    redis.call("PERSIST", i)
    return
  end
  redis.call("ZREM", h, KEEPER) -- nobody waits: nothing to keep
  if redis.call("EXISTS", h) == 1 then
    redis.call("PEXPIRE", h, lease)
    redis.call("PEXPIRE", i, lease)
  else
    redis.call("DEL", i)
  end
end

-- The sweep index (single Redis only: under Cluster it lives on another hash tag and
-- ClusterStore keeps it). idx is its key, or "" for none.
local function index(idx, j, due)
  if idx ~= "" then
    redis.call("ZADD", idx, "LT", due, tag_of(j))
  end
end

-- A unit of slot j goes to the run first in its line: reserved ("@w" ticket) for the claim
-- window while its message is published again.
local function wake(j, who, window, idx)
  local msg = redis.call("HGET", key(j, M), who)
  if not msg then
    return false
  end
  if redis.call("HEXISTS", key(j, I), who) == 1 then
    return "busy" -- this run holds or has a unit reserved here already (another copy runs)
  end
  local ticket = string.match(msg, "^([^\n]*)\n")
  -- each wake of one stay in line waits twice as long for its claim (up to 64 windows): a
  -- run stuck behind a backlog is not published again and again
  local wakes = redis.call("HINCRBY", key(j, I), "n:" .. who, 1)
  local until_ = NOW + window * math.min(2 ^ (wakes - 1), 64)
  redis.call("ZADD", key(j, H), until_, who)
  redis.call("HSET", key(j, I), who, "@w" .. ticket)
  OUT[#OUT + 1] = j
  OUT[#OUT + 1] = msg
  index(idx, j, until_)
  return true
end

-- A unit of slot j goes to a run resuming from wait_for: reserved ("@r" wait token) for as
-- long as its wait lease lives, and the run is told through the wake list.
local function reserve_resume(j, who)
  local token = redis.call("HGET", key(j, V), who)
  local until_ = tonumber(redis.call("ZSCORE", key(j, W), who) or "0")
  if not token or until_ <= NOW or redis.call("HEXISTS", key(j, I), who) == 1 then
    return false
  end
  redis.call("ZADD", key(j, H), until_, who)
  redis.call("HSET", key(j, I), who, "@r" .. token)
  local q = key(j, Q)
  redis.call("LPUSH", q, who)
  redis.call("LTRIM", q, 0, 63)
  redis.call("PEXPIRE", q, 60000)
  return true
end

-- Hand free units of slot j (limit lim, false: unlimited) to resuming runs first, then to
-- the line, one unit each, never past the limit resolved now (invariant S1).
local function refill(j, lim, window, idx)
  if redis.call("EXISTS", key(j, R), key(j, P)) == 0 then
    return
  end
  local room = lim and (lim - units(j)) or 1000000
  local fair = redis.call("HEXISTS", key(j, I), "#fair") == 1
  local rate_left, free_at = nil, nil -- runs resuming started long ago: only the line waits
  while room > 0 do
    local first = redis.call("ZRANGE", key(j, R), 0, 0)[1]
    local given = false
    if first then
      redis.call("ZREM", key(j, R), first)
      given = reserve_resume(j, first)
    else
      if rate_left == nil then
        rate_left, free_at = rate_room(j)
      end
      if rate_left <= 0 then
        if free_at then
          index(idx, j, free_at) -- swept when the window lets the next one start
        end
        break
      end
      local head = redis.call("ZPOPMIN", key(j, P))
      if #head == 0 then
        break
      end
      given = wake(j, head[1], window, idx)
      if given == "busy" then
        -- it keeps its place; the unit it will give back refills the line then
        redis.call("ZADD", key(j, P), head[2], head[1])
        break
      end
      if fair then
        fair_leave(j, head[1], given and head[2] or nil) -- not given: it had no message
      end
      if given then
        rate_woken(j, head[1]) -- it counts from now, and starts when its copy claims
        rate_left = rate_left - 1
      end
    end
    if given then
      room = room - 1
    end
  end
end

-- A resuming run that needs slot j but did not wait on it (its plan grew: a limit came or
-- went meanwhile) is listed there as waiting too, so that units can be reserved for it.
local function join_wait(j, who, wait_token, lease)
  if redis.call("HEXISTS", key(j, V), who) == 0 then
    redis.call("HSET", key(j, V), who, wait_token)
    redis.call("ZADD", key(j, W), NOW + lease, who)
    redis.call("ZADD", key(j, H), -1, WAITER .. who)
    extend(key(j, V), lease)
    extend(key(j, W), lease)
  end
end

-- A run stops waiting on slot j (its wait lease ran out, or its process is gone).
local function drop_wait(j, who)
  redis.call("ZREM", key(j, W), who)
  redis.call("HDEL", key(j, V), who)
  redis.call("ZREM", key(j, R), who)
  redis.call("ZREM", key(j, H), WAITER .. who)
  local info = redis.call("HGET", key(j, I), who)
  if info and starts_with(info, "@r") then
    redis.call("ZREM", key(j, H), who)
    redis.call("HDEL", key(j, I), who)
  end
end

-- Units whose time ran out go: holds whose lease lapsed, kept units whose run waited too
-- long on a later slot, resume reservations whose waiter is gone, and woken reservations not
-- claimed in time. A woken run is woken again (same ticket, a longer claim window) while
-- there is room under the limit resolved now (lim), else it goes back to the head of its
-- line: a lost publish never strands it. Waits whose lease ran out go too. Whatever room
-- this makes is handed out at once (refill), so a slot with a line never looks idle (I1).
-- Called on full slots only.
local function prune(j, lim, window, idx)
  local h, i = key(j, H), key(j, I)
  local gone = redis.call("ZRANGEBYSCORE", h, 0, NOW)
  local changed = #gone > 0
  local again = {}
  for _, who in ipairs(gone) do
    local info = redis.call("HGET", i, who)
    redis.call("ZREM", h, who)
    redis.call("HDEL", i, who)
    if info and starts_with(info, "@") then
      rate_unused(j, who) -- a reservation that lapsed started nothing
    end
    if info and starts_with(info, "@w") then
      again[#again + 1] = who
    end
  end
  for _, who in ipairs(again) do
    local woken = (not lim or units(j) < lim) and rate_room(j) > 0 and wake(j, who, window, idx)
    if woken == true then
      rate_woken(j, who)
    end
    if woken ~= true and redis.call("HEXISTS", key(j, M), who) == 1 then
      redis.call("ZADD", key(j, P), HEAD_OF_LINE, who)
    end
  end
  local w = key(j, W)
  if redis.call("EXISTS", w) == 1 then
    for _, who in ipairs(redis.call("ZRANGEBYSCORE", w, "-inf", NOW)) do
      drop_wait(j, who)
      changed = true
    end
  end
  if changed then
    refill(j, lim, window, idx)
  end
end

-- Give back a unit of slot j held or reserved by `who` (if info matches), then refill.
local function give_back(j, who, lim, window, idx)
  rate_unused(j, who) -- a woken or kept unit given back unused started nothing
  redis.call("ZREM", key(j, H), who)
  redis.call("HDEL", key(j, I), who, "n:" .. who)
  refill(j, lim, window, idx)
end

-- A copy gives back a unit woken or kept for its own ticket on slot j: it does not need the
-- slot any more (its plan changed), or its stay in line already ran (a duplicate).
local function unclaim(j, who, ticket, lim, window, idx)
  if ticket == "" then
    return
  end
  local info = redis.call("HGET", key(j, I), who)
  if info == "@w" .. ticket or info == "@h" .. ticket then
    redis.call("HDEL", key(j, M), who)
    give_back(j, who, lim, window, idx)
  end
end

-- What a copy of `who`, carrying `ticket` ("" for none), with hold token `token`, finds on
-- slot j (docs/protocol.md section 5): "mine", "dup", "busy", "claim", "parked" or "fresh".
-- "mine": a hold with this very token, which only this attempt made (tokens are unique):
-- the same call sent again after its reply was lost; it has the unit already.
-- Only the memo proves that a stay ran: a hold or a wait with this very ticket proves only
-- that it started, and its process may be dead (the unit then goes without a memo), so a
-- copy that meets one is "busy": deferred, then dropped by the memo or run after all.
local function classify(j, who, ticket, token)
  local info = redis.call("HGET", key(j, I), who)
  if info == token then
    return "mine"
  end
  if info and not starts_with(info, "@") then
    return "busy"
  end
  if redis.call("HEXISTS", key(j, V), who) == 1 then
    return "busy"
  end
  if ticket ~= "" and redis.call("GET", memo_key(j)) == "done:" .. ticket then
    return "dup"
  end
  if info and (starts_with(info, "@w") or starts_with(info, "@h")) then
    -- only the woken message (it carries the reservation's ticket) claims; another copy
    -- of the run stands aside, since that message is safe (here, or in a later line)
    if string.sub(info, 3) == ticket then
      return "claim"
    end
    return "parked"
  end
  if redis.call("ZSCORE", key(j, P), who) then
    return "parked"
  end
  return "fresh"
end


local function settle_all(lease)
  for j, _ in pairs(TOUCHED) do
    settle(j, lease)
  end
end
