--[[
commit.lua: make a transaction's reservations final once the upstream accepted the message,
and decide, in the same step, whether these delivered sends crossed a notification
threshold.

Only the recipients the message was delivered to are made final. Any other unit the
transaction still holds was never sent, and is given back in the same step: a recipient
whose reservation ran but whose reply was lost (Redis killed or the connection cut before
it answered, so the client was told 451 and the message went without it), or one the
upstream refused whose refund met Redis away and is still queued. The transaction is over,
so nothing can deliver those units later, and a commit that counted them would charge the
user for mail that was never sent.

After a commit the units can no longer be refunded (delivered mail is never refunded).
Idempotent: a second commit of the same transaction finds no open reservations, commits
and gives back nothing, and crosses nothing.

Thresholds are crossed by delivered sends, not by reservations: a reservation the upstream
then refuses is refunded, and a notice for it would name a send that never happened. The
limit is the one in force now (terms.lua), so the percent is of the limit the user sees. A
threshold is marked with HSETNX in the usage hash, keyed by the limit, so it fires exactly
once per user, month and limit (concurrent commits on any number of relays included), and
re-arms after an upgrade.

KEYS[1]  relay:user:{uid}            hash: status, plan, limit, pending_plan/limit/from
KEYS[2]  relay:usage:{uid}:YYYY-MM   hash: used, delivered, route:<name>,
                                           n:<limit>:<percent> -> delivered when crossed
KEYS[3]  relay:resv:{uid}:TXN        hash: recipient number -> 1
KEYS[4]  (a message with a Message-ID) relay:dedup:{uid}:<digest>: the transaction's claims
         on its recipients become `accepted` in this same step (claims.lua), so no moment
         passes between the units made final and a resubmission seeing the message accepted
KEYS[5..] pairs: relay:usage:{uid}:YYYY-MM, relay:resv:{uid}:EARLIER of earlier attempts
         whose outcome was unknown: their open units for the recipients sent again are
         given back (each recipient counted once, docs/resubmission.md)
ARGV[1]  the route the message went through (its count per route: field route:<name>)
ARGV[2]  the month, YYYY-MM (selects a pending plan change that has come due)
ARGV[3]  notification thresholds, percent, space separated, ascending (e.g. "80 85 90 95 100")
ARGV[4]  the recipient numbers delivered (fields of KEYS[3]), space separated; '*' = every
         open reservation of the transaction
ARGV[5]  with KEYS[4]: 'TXN TTL NOS...': the transaction id, the TTL of KEYS[4] (seconds)
         and, per pair of KEYS[5..], its unit numbers comma separated; else ''
ARGV[6..] plan limits as pairs: plan name, sends per month

Returns {committed, used, delivered, limit, crossed, released, settled}
  committed  units made final by this call (0 on a repeat)
  used       the month's count after the call (reserved + delivered)
  delivered  the month's delivered count after the call
  limit      the limit in force (0 if the user or the plan is gone)
  crossed    the highest threshold (percent) this commit crossed for the first time, else 0
  released   units of the transaction not delivered, given back by this call
  settled    units of earlier attempts given back (KEYS[5..])
]]
local PLANS = 6
local n, released = 0, 0
if ARGV[4] == '*' then
  n = redis.call('HLEN', KEYS[3])
else
  for number in string.gmatch(ARGV[4], '%d+') do
    n = n + redis.call('HDEL', KEYS[3], number)
  end
  -- What the transaction still holds was never delivered (see above): given back.
  released = redis.call('HLEN', KEYS[3])
end
local delivered
if n > 0 then
  delivered = redis.call('HINCRBY', KEYS[2], 'delivered', n)
  redis.call('HINCRBY', KEYS[2], 'route:' .. ARGV[1], n)
else
  delivered = tonumber(redis.call('HGET', KEYS[2], 'delivered') or '0')
end
local settled = 0
if KEYS[4] then
  local spec = words(ARGV[5])
  conclude_claims(KEYS[4], spec[1], 'accepted', spec[2])
  for i = 3, #spec do
    local given = 0
    for number in string.gmatch(spec[i], '%d+') do
      given = given + redis.call('HDEL', KEYS[2 * i], number)
    end
    give_back(KEYS[2 * i - 1], given)
    settled = settled + given
  end
end
local used = give_back(KEYS[2], released)
redis.call('DEL', KEYS[3])
local state, plan, custom = terms(KEYS[1], ARGV[2])
local limit = 0
if state ~= 'missing' then
  limit = tonumber(custom) or plan_limit(plan, PLANS) or 0
end
local crossed = 0
if n > 0 and limit > 0 then
  for percent in string.gmatch(ARGV[3], '%d+') do
    local p = tonumber(percent)
    -- The first delivered count at or above p% of the limit (integer arithmetic, no float
    -- rounding).
    if delivered * 100 >= limit * p then
      if redis.call('HSETNX', KEYS[2], 'n:' .. limit .. ':' .. p, delivered) == 1 then
        crossed = p
      end
    end
  end
end
return {n, used, delivered, limit, crossed, released, settled}
