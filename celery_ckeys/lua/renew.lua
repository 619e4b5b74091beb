-- renew.lua: extend the leases a live run still owns. docs/protocol.md section 6.5.
--
-- KEYS  as acquire.lua (ten role keys per slot; the rest unused).
-- ARGV  1 role: "hold" (a running run: its units, compared by hold token) or "wait" (a run
--         in wait_for: its waiting entry and any unit reserved for its resume, compared by
--         wait token)
--       2 task id   3 token   4 lease ms   5 n
-- Returns how many slots were renewed. A unit that is no longer ours (its lease ran out and
-- someone else may have it) is never taken back: fewer than n means the lease was lost.

local role, who, token, lease = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
N = tonumber(ARGV[5])
local renewed = 0
now_ms()

for j = 1, N do
  local h = key(j, H)
  if role == "hold" then
    if redis.call("TYPE", h)["ok"] == "string" then
      if redis.call("GET", h) == token then
        redis.call("PEXPIRE", h, lease)
        renewed = renewed + 1
      end
    elseif redis.call("HGET", key(j, I), who) == token
        and tonumber(redis.call("ZSCORE", h, who) or "0") > NOW then
      redis.call("ZADD", h, "XX", NOW + lease, who)
      if redis.call("PTTL", h) >= 0 then -- no TTL: kept for a line, resuming or woken runs (I1)
        extend(h, lease)
        extend(key(j, I), lease)
      end
      renewed = renewed + 1
    end
  elseif redis.call("HGET", key(j, V), who) == token then
    redis.call("ZADD", key(j, W), "XX", NOW + lease, who)
    extend(key(j, W), lease)
    extend(key(j, V), lease)
    if redis.call("PTTL", h) >= 0 then -- its marker keeps the slot; unless kept for a line
      extend(h, lease)
      extend(key(j, I), lease)
    end
    if redis.call("HGET", key(j, I), who) == "@r" .. token then
      redis.call("ZADD", h, "XX", NOW + lease, who)
    end
    renewed = renewed + 1
  end
end
return renewed
