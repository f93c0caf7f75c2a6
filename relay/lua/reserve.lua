--[[
reserve.lua: check the monthly limit and take one unit for one recipient, atomically.

The check and the increment are one script, so any number of concurrent RCPTs on any
number of relay processes can never take `used` past the limit. The limit is resolved
here, from the user record, at the moment of the reservation: a plan change applies to the
very next recipient, and a change in flight can never let a send exceed the limit in force.

KEYS[1]  relay:user:{uid}            hash: status, plan, limit (custom, optional)
KEYS[2]  relay:usage:{uid}:YYYY-MM   hash: used (reserved + delivered), delivered
KEYS[3]  relay:resv:{uid}:TXN        hash: recipient number -> 1 (this transaction's open units)
ARGV[1]  recipient number within the transaction (field of KEYS[3])
ARGV[2]  TTL of the usage hash, seconds (kept for usage history, then expires)
ARGV[3]  TTL of the reservation hash, seconds (outlives any transaction; left for reconciling)
ARGV[4..] plan limits as pairs: plan name, sends per month

Returns {status, used, limit}
  0 RESERVED          one unit taken; used includes it
  1 OVER_LIMIT        nothing taken; used >= limit
  2 ALREADY_RESERVED  this recipient number already holds a unit (idempotent retry)
  3 USER_DISABLED
  4 USER_MISSING
  5 UNKNOWN_PLAN      the user's plan is not in plans.toml and the user has no custom limit
]]
local user = redis.call('HMGET', KEYS[1], 'status', 'plan', 'limit')
if not user[1] then
  return {4, 0, 0}
end
if user[1] ~= 'active' then
  return {3, 0, 0}
end
local limit = tonumber(user[3])
if not limit then
  for i = 4, #ARGV, 2 do
    if ARGV[i] == user[2] then
      limit = tonumber(ARGV[i + 1])
      break
    end
  end
end
if not limit then
  return {5, 0, 0}
end
local used = tonumber(redis.call('HGET', KEYS[2], 'used') or '0')
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return {2, used, limit}
end
if used >= limit then
  return {1, used, limit}
end
used = redis.call('HINCRBY', KEYS[2], 'used', 1)
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], 1)
redis.call('EXPIRE', KEYS[3], ARGV[3])
return {0, used, limit}
