--[[
user.lua: a user's record and sender set in one call (read only).

The SMTP path reads both on every MAIL FROM. Both keys carry the user's hash tag, so this
runs on one node of a Cluster; a script is cheaper for the client than a two-command
pipeline (redis-py's per-call cost dominates a fast Redis).

KEYS[1]  relay:user:{uid}       hash: email, plan, limit, tz, status, password, ...
KEYS[2]  relay:senders:{uid}    set: the sender addresses the user owns

Returns {flat field/value list of the hash, list of senders}.
]]
return {redis.call('HGETALL', KEYS[1]), redis.call('SMEMBERS', KEYS[2])}
