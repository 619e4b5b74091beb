-- sweep.lua: the handoff's safety net for one slot; no parked run is ever stranded.
--
-- A releaser wakes the oldest parked run by moving it to the woken set and re-publishing its
-- message. If the releaser dies between those two steps, or a holder's lease runs out
-- instead of being released, nobody would wake the line. Workers' main processes run this
-- every second on slots that have a line:
--   * a woken run that has not arrived after the claim window is published again (a
--     duplicate that does arrive is turned away by acquire.lua: only one copy can claim);
--   * when the slot has room that nobody was woken for (its limit, recorded when runs
--     park, minus live holders and runs on their way), that many runs are woken from the
--     head of the line. Busy slots are looked at again every countdown: the countdown of
--     countdown mode, kept as the safety net.
--
-- KEYS[1]  parked    ZSET  owner -> first deferral (ms)
-- KEYS[2]  woken     ZSET  owner -> when it was woken (ms)
-- KEYS[3]  messages  HASH  owner -> message JSON; "#l" -> the slot's limit when a run last parked;
--                            "~"..owner -> a woken run's claim (forgotten after 5 minutes)
-- KEYS[4]  holders   ZSET  owner -> lease expiry (ms)
-- ARGV[1]  claim window, ms
-- ARGV[2]  countdown, ms
-- ARGV[3]  most woken entries to look at
--
-- Returns {next_due, message...}: when this slot next needs a sweep (ms, server time; -1 when
-- its line is empty), then the messages to publish.

local window, countdown, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local reply = {-1}
local due = nil

local function soonest(at)
  if due == nil or at < due then
    due = at
  end
end

local woken = redis.call("ZRANGE", KEYS[2], 0, most - 1, "WITHSCORES")
for i = 1, #woken, 2 do
  local who, since = woken[i], tonumber(woken[i + 1])
  if since <= now - window then
    local msg = redis.call("HGET", KEYS[3], who)
    if msg then
      redis.call("ZADD", KEYS[2], now, who)
      reply[#reply + 1] = msg
      soonest(now + window)
    else
      redis.call("ZREM", KEYS[2], who)
    end
  else
    soonest(since + window)
  end
end

-- Room that nobody was woken for (a holder's lease ran out, the limit was raised): wake
-- that many from the head of the line, at once. A slot that is simply full is left alone;
-- its holders' releases wake the line, and nobody is churned through the broker meanwhile.
local limit = tonumber(redis.call("HGET", KEYS[3], "#l")) or 1
local room = limit - redis.call("ZCOUNT", KEYS[4], "(" .. now, "+inf") - redis.call("ZCARD", KEYS[2])
while room > 0 do
  local head = redis.call("ZPOPMIN", KEYS[1])
  if #head == 0 then
    break
  end
  local msg = redis.call("HGET", KEYS[3], head[1])
  if msg then
    redis.call("ZADD", KEYS[2], now, head[1])
    reply[#reply + 1] = msg
    soonest(now + window)
    room = room - 1
  end
end
-- claims whose run never came back (its message was not redelivered) are forgotten
local fields = redis.call("HKEYS", KEYS[3])
for _, f in ipairs(fields) do
  if string.sub(f, 1, 1) == "~" then
    local at = tonumber(redis.call("HGET", KEYS[3], f)) or 0
    if at < now - 300000 then
      redis.call("HDEL", KEYS[3], f)
    else
      soonest(at + 300000)
    end
  end
end

if redis.call("ZCARD", KEYS[1]) > 0 then
  soonest(now + countdown)
elseif redis.call("ZCARD", KEYS[2]) == 0 then
  redis.call("HDEL", KEYS[3], "#l")  -- the line is gone: leave nothing behind
end

if due ~= nil then
  reply[1] = due
end
return reply
