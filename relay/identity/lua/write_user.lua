--[[
write_user.lua: write one user's record and sender set in one step, for a bulk import
(relay/identity/bulk.py): the record and the set change together, and a batch costs one
command per user. Both keys carry the user's hash tag (one Cluster slot). The sender index
entries (other slots) are claimed before, with SET NX, and released after.

KEYS[1]  relay:user:{uid}       hash: email, plan, limit, tz, status, created_at, ...
KEYS[2]  relay:senders:{uid}    set: the sender addresses the user owns
ARGV[1]  n, the number of fields to set; ARGV[2 .. 2n+1]: field, value pairs (HSET)
ARGV[2n+2]  m, the number of addresses the set gains; the m addresses after it (SADD);
         every argument after those: addresses the set loses (SREM)

Returns 0.
]]
local n = tonumber(ARGV[1])
if n > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2, 2 * n + 1))
end
local at = 2 * n + 2
local m = tonumber(ARGV[at])
if m > 0 then
  redis.call('SADD', KEYS[2], unpack(ARGV, at + 1, at + m))
end
if #ARGV > at + m then
  redis.call('SREM', KEYS[2], unpack(ARGV, at + m + 1, #ARGV))
end
return 0
