--[[
units.lua: shared prologue, prepended to refund.lua and commit.lua by quota.py.

give_back(usage_key, n) -> used
  Takes `n` units off the month's `used` count, never below zero (an operator may have
  reset the month by hand meanwhile), and returns the count after it. With n = 0 it only
  reads the count.
]]
local function give_back(usage_key, n)
  local used = tonumber(redis.call('HGET', usage_key, 'used') or '0')
  local give = math.min(n, used)
  if give > 0 then
    used = redis.call('HINCRBY', usage_key, 'used', -give)
  end
  return used
end
