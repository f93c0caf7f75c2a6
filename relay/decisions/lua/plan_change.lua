--[[
plan_change.lua: change a user's plan (or custom limit) and record it in the audit trail,
atomically.

Rules (docs/plans.md, "Plans and subscription changes"):
  * a change to an equal or higher limit (an upgrade) applies at once, to the current
    month; it also cancels a pending downgrade;
  * a change to a lower limit (a downgrade, or a cancellation back to the free plan) is
    pending until the next monthly reset: the current month keeps the limit paid for;
  * every call appends one entry to the user's audit stream (XADD, never trimmed);
  * every call records the terms in force after it (plan, limit, custom limit or '') in the
    usage hashes of the current and the next month, so each month's history keeps its own
    terms (docs/plans.md, "History"): after a downgrade the current month keeps the old
    terms and the next one gets the new; otherwise both get the new.

KEYS[1]  relay:user:{uid}      hash: plan, limit, pending_plan, pending_limit, pending_from
KEYS[2]  relay:audit:{uid}     stream: the append-only audit trail
KEYS[3]  relay:usage:{uid}:YYYY-MM  hash: the current month's usage (fields plan, limit,
                                     custom_limit written here)
KEYS[4]  relay:usage:{uid}:YYYY-MM  hash: the next month's usage (the same fields)
ARGV[1]  new plan name
ARGV[2]  new custom limit, or '' for the plan's own limit
ARGV[3]  the user's current month, YYYY-MM
ARGV[4]  the user's next month, YYYY-MM
ARGV[5]  who made the change (operator, "billing", …)
ARGV[6]  when, ISO 8601
ARGV[7]  TTL of a usage hash, seconds (as reserve.lua's ARGV[2])
ARGV[8..] plan limits as pairs: plan name, sends per month

Returns {outcome, effective_from, old_plan, old_custom_limit, old_limit, new_limit}
  outcome  'upgrade' | 'change' (same limit) | 'downgrade' | 'unchanged' | 'missing' |
           'unknown_plan'
]]
local PLANS = 8
local state, plan, custom = terms(KEYS[1], ARGV[3])
if state == 'missing' then
  return {'missing', '', '', '', '', ''}
end
local new_custom = ARGV[2]
local new_limit = tonumber(new_custom) or plan_limit(ARGV[1], PLANS)
if not new_limit then
  return {'unknown_plan', '', '', '', '', ''}
end
-- Make the terms in force the recorded ones first: a pending change that has come due
-- must not be lost when a new pending change replaces it.
redis.call('HSET', KEYS[1], 'plan', plan or '')
if custom then
  redis.call('HSET', KEYS[1], 'limit', custom)
else
  redis.call('HDEL', KEYS[1], 'limit')
end
redis.call('HDEL', KEYS[1], 'pending_plan', 'pending_limit', 'pending_from')
local old_limit = tonumber(custom) or plan_limit(plan, PLANS)
local outcome, from
if plan == ARGV[1] and (custom or '') == new_custom then
  outcome, from = 'unchanged', ARGV[3]
elseif old_limit == nil or new_limit >= old_limit then
  outcome = (old_limit ~= nil and new_limit == old_limit) and 'change' or 'upgrade'
  from = ARGV[3]
end
if outcome then
  redis.call('HSET', KEYS[1], 'plan', ARGV[1])
  if new_custom ~= '' then
    redis.call('HSET', KEYS[1], 'limit', new_custom)
  else
    redis.call('HDEL', KEYS[1], 'limit')
  end
else
  outcome, from = 'downgrade', ARGV[4]
  redis.call('HSET', KEYS[1], 'pending_plan', ARGV[1], 'pending_limit', new_custom,
             'pending_from', ARGV[4])
end
local function record(usage_key, month_plan, month_custom, month_limit)
  redis.call('HSET', usage_key, 'plan', month_plan, 'limit', month_limit,
             'custom_limit', month_custom)
  redis.call('EXPIRE', usage_key, ARGV[7])
end
if outcome == 'downgrade' then
  record(KEYS[3], plan or '', custom or '', old_limit)
else
  record(KEYS[3], ARGV[1], new_custom, new_limit)
end
record(KEYS[4], ARGV[1], new_custom, new_limit)
redis.call('XADD', KEYS[2], '*', 'at', ARGV[6], 'by', ARGV[5], 'outcome', outcome,
           'old_plan', plan or '', 'old_limit', tostring(old_limit or ''),
           'new_plan', ARGV[1], 'new_limit', tostring(new_limit), 'effective_from', from)
return {outcome, from, plan or '', custom or '', tostring(old_limit or ''), tostring(new_limit)}
