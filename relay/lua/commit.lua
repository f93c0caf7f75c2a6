--[[
commit.lua: make a transaction's reservations final once the upstream accepted the message.

After a commit the units can no longer be refunded (delivered mail is never refunded).
Idempotent: a second commit of the same transaction finds no open reservations.

KEYS[1]  relay:usage:{uid}:YYYY-MM   hash: used, delivered, route:<name>
KEYS[2]  relay:resv:{uid}:TXN        hash: recipient number -> 1
ARGV[1]  the route the message went through (its count per route: field route:<name>)

Returns {committed, used}
  committed  units made final by this call (0 on a repeat)
  used       the month's count after the call
]]
local n = redis.call('HLEN', KEYS[2])
if n > 0 then
  redis.call('HINCRBY', KEYS[1], 'delivered', n)
  redis.call('HINCRBY', KEYS[1], 'route:' .. ARGV[1], n)
  redis.call('DEL', KEYS[2])
end
return {n, tonumber(redis.call('HGET', KEYS[1], 'used') or '0')}
