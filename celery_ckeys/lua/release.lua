-- release.lua: give back the slots one run holds; compare-and-delete, never a bare DEL.
--
-- KEYS, four per slot j = 1..n:
--   KEYS[4j-3]  holders   ZSET  owner -> lease expiry (ms)
--   KEYS[4j-2]  meta      HASH  owner -> holder JSON
--   KEYS[4j-1]  resuming  ZSET  runs back from wait_for, waiting for a slot here
--   KEYS[4j]    wake      LIST  pushed to when runs wait to resume here, so they need not poll
-- ARGV[1]  owner: the run's task id
-- ARGV[2]  "" to release unconditionally (the run itself), or "<worker>\n<pid>": release only
--          the slots whose holder record names that worker and pool process. The worker's main
--          process uses this after a pool process died, so it can never free a slot that a
--          redelivered copy of the same task id has since taken elsewhere.
--
-- Returns the number of slots released. Releasing twice releases nothing the second time.

local owner = ARGV[1]
local only = ARGV[2]
local released = 0

for j = 1, #KEYS / 4 do
  local h, m, r, wake = KEYS[4 * j - 3], KEYS[4 * j - 2], KEYS[4 * j - 1], KEYS[4 * j]
  local ok = true
  if only ~= "" then
    local rec = redis.call("HGET", m, owner)
    ok = false
    if rec then
      local info = cjson.decode(rec)
      ok = (tostring(info["w"]) .. "\n" .. tostring(info["p"])) == only
    end
  end
  if ok and redis.call("ZREM", h, owner) == 1 then
    redis.call("HDEL", m, owner)
    released = released + 1
    if redis.call("ZCARD", r) > 0 then
      redis.call("LPUSH", wake, owner)
      redis.call("LTRIM", wake, 0, 63)
      redis.call("PEXPIRE", wake, 60000)
    end
  end
end

return released
