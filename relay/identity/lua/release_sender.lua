--[[
release_sender.lua: forget that a user owns a sender address, if that user still owns it.

A bulk import (relay/identity/bulk.py) calls this for an address a user no longer lists, and
to give back an address it claimed for a line it then refused. Compared and deleted in one
step, so a claim another user made in the meantime is never deleted. One key: in a Cluster,
the sender index is per address, on that address's own slot.

KEYS[1]  relay:sender:<address>   string: the owning user's id
ARGV[1]  the user id the address is released by

Returns 1 when the entry was deleted, 0 when it named another user or nobody.
]]
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
