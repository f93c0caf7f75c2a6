"""The suppression list: recipients that must not be sent to (CAN-SPAM opt-outs, RFC 8058
one-click unsubscribes, hard bounces, spam complaints), checked at RCPT before the quota so a
send that must not happen never costs a unit.

An entry is (scope, address, reason, source, time). The scope is one user (a contact who
unsubscribed from that agent: ``relay:supp:{uid}``, in the user's Cluster slot, read by
reserve.lua in the same step as the quota) or global (a hard bounce or complaint, for the
whole brokerage: ``relay:supp:global``, one key read with single-key commands). Addresses are
normalised like sender addresses (A-Z lower-cased, nothing else folded). Each entry is one
hash field whose value is ``reason<TAB>source<TAB>unix seconds``: Lua reads the reason with
one ``string.match``, and a listing needs no second key.

This module holds the store; the check on the SMTP path is in reserve.lua (user scope) and
``SuppressionStore.check_global`` (the global scope) on a counted route, ``check`` (both
scopes) on an uncounted one, ``check_many`` at the end of DATA; ``relay/smtp/suppressed.py``
calls them for the transaction (docs/suppression.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from relay.identity.accounts import normalize_address
from relay.store import hot, keys
from relay.store.client import RedisClient, store_errors

# The one scope that is not a user id, as the CLI, the API and the CSV files write it.
GLOBAL = "*"


class SuppressionReason(StrEnum):
    UNSUBSCRIBE = "unsubscribe"   # the contact opted out (a user-scoped entry, normally)
    COMPLAINT = "complaint"       # marked as spam at the mailbox provider
    BOUNCE = "bounce"             # a hard bounce or a provider's reject
    MANUAL = "manual"             # entered by an operator


@dataclass(frozen=True, slots=True)
class Suppression:
    address: str
    # A user id, or None for the global list.
    user_id: str | None
    reason: SuppressionReason
    # Who made the entry: "cli", "api", "import", "mandrill", "command", "one-click"…
    source: str
    at: int  # Unix seconds

    @property
    def scope(self) -> str:
        return self.user_id or GLOBAL


def encode(reason: SuppressionReason, source: str, at: int) -> str:
    return f"{reason.value}\t{source}\t{at}"


def decode(address: str, user_id: str | None, value: str) -> Suppression:
    reason, _, rest = value.partition("\t")
    source, _, at = rest.partition("\t")
    return Suppression(address, user_id, reason_of(reason), source,
                       int(at) if at.isdigit() else 0)


def reason_of(text: str) -> SuppressionReason:
    """The reason an entry's value (or reserve.lua) names; one this relay does not know (a
    hand-written entry) reads as ``manual``: still suppressed."""
    try:
        return SuppressionReason(text)
    except ValueError:
        return SuppressionReason.MANUAL


def scope_key(user_id: str | None) -> str:
    return keys.suppressions(user_id) if user_id else keys.global_suppressions()


class SuppressionStore:
    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis

    async def add(self, address: str, *, user_id: str | None, reason: SuppressionReason,
                  source: str, at: int | None = None) -> Suppression:
        """Create or replace the entry of ``address`` in one scope (the latest reason wins)."""
        entry = Suppression(normalize_address(address), user_id, reason, source,
                            int(time.time()) if at is None else at)
        with store_errors():
            await self._redis.hset(scope_key(user_id), entry.address,
                                   encode(reason, source, entry.at))
        return entry

    async def add_many(self, entries: Iterable[Suppression]) -> int:
        """Write entries in one pipelined round trip (an import's batch); how many were new."""
        batch = list(entries)
        if not batch:
            return 0
        with store_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                for e in batch:
                    pipe.hset(scope_key(e.user_id), normalize_address(e.address),
                              encode(e.reason, e.source, e.at))
                created = await pipe.execute()
        return sum(int(n) for n in created)

    async def remove(self, address: str, *, user_id: str | None) -> bool:
        with store_errors():
            removed = await self._redis.hdel(scope_key(user_id), normalize_address(address))
        return bool(removed)

    async def get(self, address: str, *, user_id: str | None) -> Suppression | None:
        normalized = normalize_address(address)
        with store_errors():
            value = await hot.hget(self._redis, scope_key(user_id), normalized)
        return None if value is None else decode(normalized, user_id, str(value))

    async def check_global(self, address: str) -> Suppression | None:
        """The global entry of ``address``, if any (one HGET: the RCPT path's added round
        trip; the user's own list is read inside reserve.lua)."""
        return await self.get(address, user_id=None)

    async def check(self, address: str, *, user_id: str) -> Suppression | None:
        """The entry that suppresses ``address`` for ``user_id``: the global one, else the
        user's own. Both scopes in one pipelined round trip (two slots: on a Cluster,
        redis-py sends each node its part at once). For a route without a reservation."""
        return (await self.check_many([address], user_id=user_id)).get(
            normalize_address(address))

    async def check_many(self, addresses: Iterable[str], *,
                         user_id: str) -> dict[str, Suppression]:
        """The entries that suppress any of ``addresses`` for ``user_id`` (global first),
        keyed by normalised address; one pipelined round trip for every address and both
        scopes (the recipients of a message decided at the end of DATA)."""
        wanted = list(dict.fromkeys(normalize_address(a) for a in addresses))
        if not wanted:
            return {}
        with store_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hmget(keys.global_suppressions(), wanted)
                pipe.hmget(keys.suppressions(user_id), wanted)
                everyone, own = await pipe.execute()
        found: dict[str, Suppression] = {}
        for address, global_value, user_value in zip(wanted, everyone, own, strict=True):
            if global_value is not None:
                found[address] = decode(address, None, str(global_value))
            elif user_value is not None:
                found[address] = decode(address, user_id, str(user_value))
        return found

    async def listing(self, *, user_id: str | None) -> list[Suppression]:
        """Every entry of one scope, sorted by address (HSCAN, so a long list does not block
        Redis)."""
        out: list[Suppression] = []
        with store_errors():
            async for address, value in self._redis.hscan_iter(scope_key(user_id), count=1000):
                # decode_responses=True: both are str.
                out.append(decode(str(address), user_id, str(value)))
        return sorted(out, key=lambda e: e.address)
