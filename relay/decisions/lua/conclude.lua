--[[
conclude.lua: end a transaction's claims on a message's recipients (claims.lua), once its
outcome is known: accepted by the upstream (on a route that is not counted; on a counted
route commit.lua does it, in the same step as the quota), released (nothing was sent: back
to what they were), or unknown (the upstream's reply was lost: a resubmission sends again).
Idempotent, and it changes only fields this transaction still claims.

KEYS[1]  relay:dedup:{uid}:<digest>   hash: recipient -> state (claims.lua)
ARGV[1]  the transaction id
ARGV[2]  'accepted' | 'released' | 'unknown'
ARGV[3]  TTL of the hash, seconds (RELAY_DEDUP_WINDOW)

Returns the number of recipients concluded.
]]
return conclude_claims(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
