--[[
terms.lua: shared prologue, prepended to reserve.lua and plan_change.lua by quota.py.

terms(user_key, period, first) -> status, plan, custom_limit
  The plan and custom limit in force for `period` (YYYY-MM): the user's own, or the pending
  change (a downgrade or cancellation) once its month has come. Nothing is written: a due
  change is simply read as current, so reservations of an older month still see the terms
  of that month.
  status: 'ok', 'missing' (no user hash) or 'disabled'.
plan_limit(plan, first) -> number or nil
  The monthly limit of `plan` in the plan table carried in ARGV[first..] as name, limit pairs.
]]
local function plan_limit(plan, first)
  if not plan then
    return nil
  end
  for i = first, #ARGV, 2 do
    if ARGV[i] == plan then
      return tonumber(ARGV[i + 1])
    end
  end
  return nil
end

local function terms(user_key, period)
  local u = redis.call('HMGET', user_key, 'status', 'plan', 'limit',
                       'pending_plan', 'pending_limit', 'pending_from')
  if not u[1] then
    return 'missing', nil, nil
  end
  local plan, custom = u[2], u[3]
  if u[6] and period >= u[6] then
    plan, custom = u[4], u[5]
  end
  if custom == '' then
    custom = nil
  end
  if u[1] ~= 'active' then
    return 'disabled', plan, custom
  end
  return 'ok', plan, custom
end
