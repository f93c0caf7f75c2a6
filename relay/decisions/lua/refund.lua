--[[
refund.lua: give back units for recipients that were not delivered.

Called when the upstream refuses a recipient or the message, on RSET, on disconnect and on
timeouts. Only open (uncommitted) reservations are refunded, each at most once, so
repeating a refund or refunding after a commit changes nothing.

KEYS[1]  relay:usage:{uid}:YYYY-MM   hash: used, delivered
KEYS[2]  relay:resv:{uid}:TXN        hash: recipient number -> 1
ARGV     recipient numbers to refund; none = every open reservation of the transaction

Returns {refunded, used}: `used` after the refund, never below zero (units.lua).
]]
local fields = ARGV
if #fields == 0 then
  fields = redis.call('HKEYS', KEYS[2])
end
local n = 0
for _, field in ipairs(fields) do
  n = n + redis.call('HDEL', KEYS[2], field)
end
return {n, give_back(KEYS[1], n)}
