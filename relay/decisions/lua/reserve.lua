--[[
reserve.lua: check the monthly limit and take one unit per recipient, atomically.

One recipient at RCPT time; all the recipients of a message at the end of DATA for messages
decided whole (all or nothing: either every unit fits under the limit or none is taken).

The check and the increment are one script, so any number of concurrent RCPTs on any
number of relay processes can never take `used` past the limit. The limit is resolved
here, from the user record (terms.lua), at the moment of the reservation: a plan change
applies to the very next recipient, and a change in flight can never let a send exceed the
limit in force. The terms it applied (plan, limit, custom limit or '') are recorded in the
month's usage hash with the units, so the month's history keeps its own terms after a later
plan change (docs/plans.md, "History"); the latest reservation's win. Notification
thresholds are not decided here but in commit.lua, by delivered sends: a reservation may
still be refunded.

KEYS[1]  relay:user:{uid}            hash: status, plan, limit, pending_plan/limit/from
KEYS[2]  relay:usage:{uid}:YYYY-MM   hash: used (reserved + delivered), delivered,
                                           plan, limit, custom_limit (the month's terms)
KEYS[3]  relay:resv:{uid}:TXN        hash: recipient number -> 1 (this transaction's open units)
ARGV[1]  recipient numbers within the transaction (fields of KEYS[3]), space separated
ARGV[2]  TTL of the usage hash, seconds (kept for usage history, then expires)
ARGV[3]  TTL of the reservation hash, seconds (outlives any transaction; left for reconciling)
ARGV[4]  the month, YYYY-MM (selects a pending plan change that has come due)
ARGV[5..] plan limits as pairs: plan name, sends per month

Returns {status, used, limit}
  status
    0 RESERVED          the units taken; used includes them
    1 OVER_LIMIT        nothing taken; used + units > limit
    2 ALREADY_RESERVED  these recipient numbers already hold their units (idempotent retry)
    3 USER_DISABLED
    4 USER_MISSING
    5 UNKNOWN_PLAN      the plan in force is not in plans.toml and there is no custom limit
]]
local PLANS = 5
local state, plan, custom = terms(KEYS[1], ARGV[4])
if state == 'missing' then
  return {4, 0, 0}
end
if state == 'disabled' then
  return {3, 0, 0}
end
local limit = tonumber(custom) or plan_limit(plan, PLANS)
if not limit then
  return {5, 0, 0}
end
local used = tonumber(redis.call('HGET', KEYS[2], 'used') or '0')
local fresh = {}
for number in string.gmatch(ARGV[1], '%d+') do
  if redis.call('HEXISTS', KEYS[3], number) == 0 then
    fresh[#fresh + 1] = number
  end
end
if #fresh == 0 then
  -- A retry of a reservation already made. Touch the key anyway: the script is then a
  -- write, replicated like one, so a WAIT after it also covers the original reservation.
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  return {2, used, limit}
end
if used + #fresh > limit then
  return {1, used, limit}
end
used = redis.call('HINCRBY', KEYS[2], 'used', #fresh)
redis.call('HSET', KEYS[2], 'plan', plan or '', 'limit', limit, 'custom_limit', custom or '')
redis.call('EXPIRE', KEYS[2], ARGV[2])
for _, number in ipairs(fresh) do
  redis.call('HSET', KEYS[3], number, 1)
end
redis.call('EXPIRE', KEYS[3], ARGV[3])
return {0, used, limit}
