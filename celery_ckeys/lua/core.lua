-- core.lua: the first part of the library every script shares: the named key roles, the
-- server clock and the queue-limit rule. scripts.py puts in front of each script the
-- definitions of core.lua and then lib.lua that it names (and those they name), no others;
-- docs/protocol.md is the contract they follow.
--
-- Key roles: every slot j of a script passes ten keys, in this order (KEYS[10j-9..10j]):
--   H  units     STRING (simple: one hold, value = its token, PX lease) or
--                ZSET (full: task id -> expiry ms of its hold or reservation; and, score -1,
--                a marker "\1"..task id for each run waiting in wait_for: not a unit, it only
--                keeps the slot from looking idle to the fast path while that run lives)
--   I  info      HASH task id -> hold token, "@w"..ticket (woken), "@h"..ticket (kept: a
--                woken run that waits on a later slot of its plan keeps this unit) or
--                "@r"..wait token (resuming); "#f" last fence; "#l" limit last resolved here;
--                "#d" the declared limit of a queue slot ("" none), for the sweeper
--   P  line      ZSET task id -> order (first deferral, ms)
--   M  messages  HASH task id -> ticket.."\n"..message of a parked or woken run
--   R  resume    ZSET task id -> when its child finished (resume order)
--   W  waiting   ZSET task id -> lease expiry of a run blocked in wait_for
--   V  waits     HASH task id -> wait token
--   F  deferred  HASH task id -> countdown deferral record (JSON, for status)
--   Q  wake      LIST pushed to when a unit is reserved for a resuming run
--   S  starts    ZSET start -> when (ms): the starts within a rate-limited slot's window
-- plus, per slot, a memo STRING (KEYS[10n + j]): "done:"..ticket once a ticketed run ended.
-- Tokens: a hold token is JSON [task id, host, pid, nonce, ticket, task, started, tags];
-- a wait token is JSON [task id, host, pid, nonce, ticket]. Both carry the ticket 5th.

local H, I, P, M, R, W, V, F, Q, S = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
local ROLES = 10
local NOW = 0 -- ms, server time; set by now_ms()
local N = 0 -- slots in this call; the script sets it

local function key(j, role)
  return KEYS[(j - 1) * ROLES + role]
end

local function now_ms()
  local t = redis.call("TIME")
  NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  return NOW
end

-- A run's own end frees its unit of a full slot nobody waits on (give.lua, unlock.lua: the
-- caller made sure of both). A units key that empties is gone with its last member; its info
-- goes with it (settle's rule). No TTL is touched: every write that added or renewed a unit
-- set h and i to outlive it. The first two members tell whether this run's unit is the last
-- one (the uncontended end: one DEL for both keys) or whether h outlives it (a marker sorts
-- first).
local function give_own(h, i, who)
  local first = redis.call("ZRANGE", h, 0, 1)
  if #first == 1 and first[1] == who then
    redis.call("DEL", h, i)
  else
    redis.call("ZREM", h, who)
    redis.call("HDEL", i, who, "n:" .. who)
    if #first == 0 then -- its unit was gone already (pruned): only the info was left
      redis.call("DEL", i)
    end
  end
end

-- The queue-limit rule (docs/protocol.md section 1; LimitSpec.resolve in limits.py is the
-- same rule and a property test keeps them equal). A spec is
--   "=N"                 a fixed limit N (a key mutex, the environment)
--   "q|c|s|d|x|u|o|r|k"  a queue's limit (r: its rate, see rate_of): 0 while the queue ("paused" in conf KEYS[c]) or
--                        the partition ("paused:"..k) is paused, or the partition
--                        ("throttle:"..k; the queue's own slot: "throttle") is throttled
--                        until a time (ms) still to come; else the limit recorded
--                        for key k alone (a partition;
--                        field "key:"..k of conf KEYS[c]), else o (computed for k by the
--                        queue's callable; "#": the one remembered on slot j as "#o";
--                        "!N": N is only remembered there ("!": none is), "!#": the
--                        remembered one is kept: the limit is resolved already),
--                        else s (a trigger-time limit,
--                        recorded in conf KEYS[c], c > 0, when write is true), else the
--                        recorded one, else d (declared in code; "#" = the limit last
--                        resolved on slot j), capped by x (the environment's base limit, also
--                        the default); when all are empty the queue is unlimited, or limited
--                        to u when u is set. k is "" for a queue's own slot, and last, so it
--                        may hold any character
--   "t|c|s|d|x"          a queue's total_limit: s (trigger time; recorded as "total" in conf
--                        KEYS[c] when write is true), else the recorded "total", else d
--                        (declared; "#" as above), capped by x; with none of them the slot
--                        is not needed (nil), whatever x
--   "?k"                 needed (limit 1) only when slot k fell back to u
--   "~"                  not needed: the line a woken copy comes from, which its plan no
--                        longer names (the limit last resolved there, for refills)
-- Returns the limit (nil: unlimited) and whether the fallback u applied.
local DECL = {} -- slot j -> the declared part d of its queue spec ("" for none)
local COMP = {} -- slot j -> the computed part o of its queue spec ("" for none)
local RECORDED_TOTAL = {} -- conf key -> its "total" field (false: none), read once a call
local THROTTLED = {} -- slot j -> until when (ms) its partition or queue starts nothing new

-- d of a queue spec: declared in code, or "#": the declared limit remembered on slot j, never
-- the limit resolved from it (a recorded limit cleared since must not live on: S1)
local function declared(j, d)
  if d ~= "#" then
    DECL[j] = d -- remembered on the slot ("#d") for the sweeper, which has no code at hand
    return tonumber(d)
  end
  local remembered = redis.call("HGET", key(j, I), "#d")
  if remembered then
    return tonumber(remembered)
  end
  return tonumber(redis.call("HGET", key(j, I), "#l") or "") -- written before "#d" existed
end

-- r of a queue spec, its rate "n/window ms": "=..." given at trigger time (recorded as "rate"
-- in conf when write is true), "..." declared in code, "#" the one the slot remembers ("#r"),
-- "" none; a recorded rate goes before a declared one. Sets RATE[j] = {n, window}.
local RATE = {} -- slot j -> {n, window ms}: at most n runs start in any window of that length
local RATE_DECL = {} -- slot j -> the declared rate, remembered on the slot ("#r")
local function rate_of(j, r, conf, recorded, write)
  local value
  if string.sub(r, 1, 1) == "=" then
    value = string.sub(r, 2)
    if write and conf then
      redis.call("HSET", conf, "rate", value)
    end
  else
    local declared = r
    if r == "#" then
      declared = redis.call("HGET", key(j, I), "#r") or ""
    else
      RATE_DECL[j] = r
    end
    value = recorded or declared
  end
  local n, window = string.match(value or "", "^(%d+)/(%d+)$")
  if n then
    RATE[j] = {tonumber(n), tonumber(window)}
  end
end

-- o of a queue spec: computed by the queue's callable for the partition's key, or "#": the
-- one remembered on slot j (the sweeper has no code to compute it with)
local function computed(j, o)
  if string.sub(o, 1, 1) == "!" then
    if o ~= "!#" then
      COMP[j] = string.sub(o, 2) -- "" clears it: the run's code computes none
    end
    return nil
  elseif o ~= "#" then
    COMP[j] = o
    return tonumber(o)
  end
  return tonumber(redis.call("HGET", key(j, I), "#o") or "")
end

-- s of a spec: a trigger-time limit, recorded as field of conf from then on when write is true
local function triggered(conf, field, s, write)
  local lim = tonumber(s)
  if lim ~= nil and write and conf then
    redis.call("HSET", conf, field, lim)
  end
  return lim
end

-- The total_limit recorded in conf (nil: none), read once a call: a partition's read of the
-- same conf, earlier in the plan, brings it along
local function recorded_total(conf)
  if not conf then
    return nil
  end
  if RECORDED_TOTAL[conf] == nil then
    RECORDED_TOTAL[conf] = redis.call("HGET", conf, "total") or false
  end
  return tonumber(RECORDED_TOTAL[conf] or "")
end

local function resolve_limit(spec, j, write)
  local fixed = string.match(spec, "^=(%d+)$")
  if fixed then
    return tonumber(fixed), false
  end
  local tc, ts, td, tx = string.match(spec, "^t|(%d+)|(%d*)|([%d#]*)|(%d*)$")
  if tc then
    local conf = tc ~= "0" and KEYS[tonumber(tc)] or nil
    local decl = declared(j, td)
    local lim = triggered(conf, "total", ts, write) or recorded_total(conf) or decl
    local cap = tonumber(tx)
    if lim ~= nil and cap ~= nil and cap < lim then
      lim = cap
    end
    return lim, false
  end
  local c, s, d, x, u, o, r, k = string.match(spec,
    "^q|(%d+)|(%d*)|([%d#]*)|(%d*)|(%d*)|([%d#!]*)|([=%d/#]*)|(.*)$")
  if c == nil then
    error("bad limit spec " .. spec)
  end
  local conf = c ~= "0" and KEYS[tonumber(c)] or nil
  local recorded, own, paused = nil, nil, false -- one read of the queue's conf for all
  if not conf then
    rate_of(j, r, nil, nil, false)
  end
  if conf then
    local got = redis.call("HMGET", conf, "limit", "key:" .. k, "total", "paused",
      "paused:" .. k, k == "" and "throttle" or "throttle:" .. k, "rate")
    recorded, own = tonumber(got[1] or ""), k ~= "" and tonumber(got[2] or "") or nil
    RECORDED_TOTAL[conf] = got[3] or false -- the total slot comes later in the plan
    paused = got[4] or (k ~= "" and got[5])
    rate_of(j, r, conf, got[7], write)
    local until_ = tonumber(got[6] or "")
    if until_ and until_ > (NOW > 0 and NOW or now_ms()) then
      THROTTLED[j] = until_ -- throttle(): no new start before then (a timed pause)
      paused = true
    elseif until_ and write then
      redis.call("HDEL", conf, k == "" and "throttle" or "throttle:" .. k) -- it has passed
    end
  end
  local decl = declared(j, d)
  local given = triggered(conf, "limit", s, write) -- recorded even when the key's own applies
  if paused then
    return 0, false -- paused: nothing new starts, nobody in line is woken (S1 with 0)
  end
  local comp = computed(j, o) -- remembered even when the key's own limit applies
  local lim = own or comp or given or recorded or decl
  local cap = tonumber(x)
  if lim == nil or (cap ~= nil and cap < lim) then
    lim = cap
  end
  if lim == nil and u ~= "" then
    return tonumber(u), true
  end
  return lim, false
end

-- Resolve every slot's spec; LIM[j] is the limit (false: unlimited), USED[j] whether the
-- run needs slot j at all (a conditional key mutex is needed only after a fallback).
local LIM, USED = {}, {}
local function resolve_all(n, first_spec, write)
  local fell = {}
  for j = 1, n do
    local spec = ARGV[first_spec + j - 1]
    local k = string.match(spec, "^%?(%d+)$")
    if spec == "~" then
      LIM[j] = tonumber(redis.call("HGET", key(j, I), "#l") or "1")
      USED[j] = false
    elseif k then
      LIM[j] = 1
      USED[j] = "?" .. k
    else
      local lim, fallback = resolve_limit(spec, j, write)
      LIM[j] = lim or false
      USED[j] = lim ~= nil
      fell[j] = fallback
    end
  end
  for j = 1, n do
    if type(USED[j]) == "string" then
      USED[j] = fell[tonumber(string.sub(USED[j], 2))] == true
    end
  end
end

-- The limit up to which this call may hand out units of slot j (refill, re-wake, resume
-- reservations): the one resolved for this run when it needs the slot. A slot it does not
-- need resolved to "none" for this run's code, which says nothing of the slot (another
-- task of the queue may declare a limit or a total this one does not): the limit last
-- resolved there, else none at all. The sweeper, which resolves with what the slot
-- remembers, hands out the rest (S1 before liveness).
local function refill_limit(j)
  if USED[j] then
    return LIM[j]
  end
  return tonumber(redis.call("HGET", key(j, I), "#l") or "") or 0
end

-- What slot j remembers of its limit for calls that do not have the run's spec (the
-- sweeper, refills of a line no plan names): "#l" the limit resolved now, "#d" and "#o" the
-- declared and computed parts of a queue's spec. Returns HSET arguments.
local function remember(j)
  local out = {"#l", LIM[j]}
  if DECL[j] then
    out[#out + 1], out[#out + 2] = "#d", DECL[j]
  end
  if COMP[j] then
    out[#out + 1], out[#out + 2] = "#o", COMP[j]
  end
  if RATE_DECL[j] then
    out[#out + 1], out[#out + 2] = "#r", RATE_DECL[j]
  end
  return unpack(out)
end
