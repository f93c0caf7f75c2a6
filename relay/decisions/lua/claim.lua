--[[
claim.lua: claim a message's recipients for one transaction, at the end of DATA and before
the upstream is sent the message, atomically (idempotent resubmission, docs/resubmission.md).

Per recipient, by its field (claims.lua):
  no field            CLAIMED    first submission: now `sending` by this transaction
  accepted X          DUPLICATE  the upstream already accepted it from X: not sent again
  sending X, held     BUSY       X is sending it right now (its claim holds)
  sending X, expired  RESEND     X's outcome is unknown (the relay died or was cut): sent
                                 again, and X's unit is given back once this send commits
  unknown EARLIER     RESEND     the earlier outcome is unknown: sent again, likewise
  sending by this transaction    renewed (a second call before DATA extends the claim)
If any recipient is BUSY nothing is claimed: the whole message waits (a 4xx), so it is never
sent in part while another relay sends the rest. Otherwise every CLAIMED or RESEND field
becomes `sending` by this transaction until ARGV[4], and the hash lives ARGV[5] seconds
more. Two relays calling this at once for the same recipient: one claims, the other sees
BUSY (the script is the unit of atomicity).

KEYS[1]  relay:dedup:{uid}:<digest>   hash: recipient -> state (claims.lua)
ARGV[1]  the transaction id
ARGV[2]  the month of its units, YYYY-MM
ARGV[3]  now, unix ms
ARGV[4]  until when the claim holds, unix ms
ARGV[5]  TTL of the hash, seconds (RELAY_DEDUP_WINDOW)
ARGV[6..] pairs: recipient (normalised, each once), its number in the transaction

Returns two entries per recipient, in order: status, detail
  0 CLAIMED    ''
  1 RESEND     the EARLIER triples (TXN NO PERIOD ...) whose units this send settles
  2 DUPLICATE  the transaction it was accepted from
  3 BUSY       the transaction sending it now
]]
local txn, period, now, holds, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local result, claims, busy = {}, {}, false
for i = 6, #ARGV, 2 do
  local field, number = ARGV[i], ARGV[i + 1]
  local value = redis.call('HGET', KEYS[1], field)
  local status, detail, before = 0, '', ''
  if value then
    local w = words(value)
    if w[1] == 'accepted' then
      status, detail = 2, w[2]
    elseif w[1] == 'sending' and w[2] == txn then
      before = earlier(w, 6, nil)
    elseif w[1] == 'sending' and tonumber(w[5]) > now then
      status, detail = 3, w[2]
      busy = true
    elseif w[1] == 'sending' then
      before = earlier(w, 6, {w[2], w[3], w[4]})
    else
      before = earlier(w, 2, nil)
    end
  end
  if status == 0 and before ~= '' then
    status, detail = 1, before
  end
  result[#result + 1] = status
  result[#result + 1] = detail
  if status < 2 then
    local claim = 'sending ' .. txn .. ' ' .. number .. ' ' .. period .. ' ' .. holds
    if before ~= '' then
      claim = claim .. ' ' .. before
    end
    claims[#claims + 1] = {field, claim}
  end
end
if not busy and #claims > 0 then
  for _, claim in ipairs(claims) do
    redis.call('HSET', KEYS[1], claim[1], claim[2])
  end
  redis.call('EXPIRE', KEYS[1], ttl)
end
return result
