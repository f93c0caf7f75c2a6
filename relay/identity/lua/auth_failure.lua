--[[
auth_failure.lua: count one failed AUTH attempt in a throttling window.

Called once per counter (the client's and the login's: different keys, possibly in
different cluster slots, so one call each). The window starts at the first failure; the
count and the window go together when the TTL ends. Setting the TTL in the same step as the
increment means a counter can never be left without one (which would throttle forever).

KEYS[1]  relay:authfail:ip:{client} or relay:authfail:login:{digest}   string counter
ARGV[1]  window length in milliseconds

Returns the number of failures in the current window (1 for the first).
]]
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
