--[[
claims.lua: shared prologue, prepended to claim.lua, conclude.lua and commit.lua by
relay/decisions/dedup.py and quota.py: what a recipient's field in a message's dedup hash
holds, and how a transaction's claims end (docs/resubmission.md).

A field of relay:dedup:{uid}:<digest> (the recipient, normalised) holds words separated by
single spaces:
  accepted TXN                          the upstream accepted the message for it from TXN
  sending TXN NO PERIOD UNTIL EARLIER   TXN is sending it (its unit NO, of month PERIOD); the
                                        claim holds until UNTIL (unix ms), after which it
                                        counts as an unknown outcome (the relay died or was
                                        cut before it could say)
  unknown EARLIER                       the last attempt's outcome is unknown
EARLIER: the attempts whose outcome is unknown, oldest first, as TXN NO PERIOD triples
(their units may still be open: the attempt that gets through gives them back); at most
MAX_EARLIER are kept, an older one's unit stays counted (high, never low).

words(value) -> the words of a field
earlier(w, from, extra) -> the EARLIER triples of words w from index `from` on, then the
  triple `extra` (or nil), the last MAX_EARLIER kept, as one string ('' when none)
conclude_claims(key, txn, outcome, ttl) -> fields changed
  Ends every claim of `txn` in `key`: 'accepted' -> accepted TXN; 'released' (nothing was
  sent) -> what it was before the claim (unknown EARLIER, or no field); 'unknown' ->
  unknown EARLIER TXN NO PERIOD. Fields claimed by another transaction are left alone, so
  a late conclusion never undoes a later claim.
]]
local MAX_EARLIER = 8

local function words(value)
  local found = {}
  for word in string.gmatch(value, '%S+') do
    found[#found + 1] = word
  end
  return found
end

local function earlier(w, from, extra)
  local list = {}
  for i = from, #w do
    list[#list + 1] = w[i]
  end
  for _, word in ipairs(extra or {}) do
    list[#list + 1] = word
  end
  local drop = math.max(#list - 3 * MAX_EARLIER, 0)
  return table.concat(list, ' ', drop + 1)
end

local function conclude_claims(key, txn, outcome, ttl)
  local fields = redis.call('HGETALL', key)
  local n = 0
  for i = 1, #fields, 2 do
    local w = words(fields[i + 1])
    if w[1] == 'sending' and w[2] == txn then
      n = n + 1
      if outcome == 'accepted' then
        redis.call('HSET', key, fields[i], 'accepted ' .. txn)
      else
        local extra = nil
        if outcome == 'unknown' then
          extra = {w[2], w[3], w[4]}
        end
        local rest = earlier(w, 6, extra)
        if rest == '' then
          redis.call('HDEL', key, fields[i])
        else
          redis.call('HSET', key, fields[i], 'unknown ' .. rest)
        end
      end
    end
  end
  if n > 0 and redis.call('EXISTS', key) == 1 then
    redis.call('EXPIRE', key, ttl)
  end
  return n
end
