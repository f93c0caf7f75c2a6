"""Users read and written in bulk, for ``command-relay users import`` and the admin API's
``POST /v1/user-imports`` (``relay/admin/user_import.py`` decides what to write; this module
only talks to Redis).

The same keys and records as ``accounts.AccountStore``: a user's hash and sender set (one
hash tag, so one Cluster slot) and the sender index (one key per address). Every step is one
pipeline, never a transaction (Cluster refuses one across slots), so a batch of a few hundred
users costs a few round trips; and one command per user where it can (a script for the two
keys of one user), as redis-py's cost per command is what bounds the rate. An address is
claimed with SET NX, as ``add_user`` claims it: two writers racing for one address cannot
both get it.

The scripts go as EVAL with their body, not EVALSHA: a pipeline cannot load a script a
Cluster node lacks (redis-py's Cluster pipeline does not retry a NOSCRIPT), and Redis caches
the compiled body, so the cost is the few hundred bytes sent.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from relay.identity.accounts import User, user_from_record
from relay.store import keys
from relay.store.client import RedisClient, store_errors
from relay.store.scripts import lua_source

_COMMENT = re.compile(r"^--\[\[.*?\]\]\n", re.DOTALL)


def _body(name: str) -> str:
    """The script without its opening comment block: it goes with every call (EVAL)."""
    return _COMMENT.sub("", lua_source("relay.identity", name), count=1)


_READ = _body("user.lua")
_WRITE = _body("write_user.lua")
_RELEASE = _body("release_sender.lua")


@dataclass(frozen=True, slots=True)
class UserWrite:
    """What to write for one user: the whole record of a new user, or the changed fields of
    an existing one, and the addresses its sender set gains and loses. The addresses gained
    must have been claimed (``claim``) first."""

    user_id: str
    created: bool
    fields: Mapping[str, str]
    add_senders: frozenset[str] = frozenset()
    remove_senders: frozenset[str] = frozenset()


class BulkAccounts:
    """Batched reads and writes of users. Redis errors surface as StoreUnavailableError."""

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis

    async def read(self, user_ids: Sequence[str], addresses: Sequence[str]
                   ) -> tuple[list[User | None], list[str | None]]:
        """The users ``user_ids`` name (None: no such user) and the id of the user owning
        each of ``addresses`` (None: nobody), in one pipeline (``user.lua`` per user)."""
        if not user_ids and not addresses:
            return [], []
        with store_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                for user_id in user_ids:
                    pipe.eval(_READ, 2, keys.user(user_id), keys.user_senders(user_id))
                for address in addresses:
                    pipe.get(keys.sender_index(address))
                replies = await pipe.execute()
        users: list[User | None] = []
        for user_id, (flat, senders) in zip(user_ids, replies, strict=False):
            record = dict(zip(flat[::2], flat[1::2], strict=True))
            users.append(user_from_record(user_id, record, set(senders)) if record else None)
        owners = [None if owner is None else str(owner) for owner in replies[len(user_ids):]]
        return users, owners

    async def claim(self, claims: Sequence[tuple[str, str]]) -> list[bool]:
        """Claim each (address, user id) with SET NX; True where this call made the claim
        (False: the address already names a user, maybe this one)."""
        if not claims:
            return []
        with store_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                for address, user_id in claims:
                    pipe.set(keys.sender_index(address), user_id, nx=True)
                replies = await pipe.execute()
        return [bool(reply) for reply in replies]

    async def write(self, writes: Sequence[UserWrite], *, index: Collection[str] = (),
                    releases: Collection[tuple[str, str]] = ()) -> None:
        """Write each user's record and sender set (``write_user.lua``), add the new users
        to the users index and release the addresses the users no longer own, in one
        pipeline. ``index`` and ``releases`` add users to the index and (address, user id)
        pairs to release: what an earlier, failed attempt at the same batch set out to do
        (both steps are idempotent, so doing them again is safe)."""
        created = sorted({w.user_id for w in writes if w.created} | set(index))
        gone = sorted({(a, w.user_id) for w in writes for a in w.remove_senders}
                      | set(releases))
        if not writes and not created and not gone:
            return
        with store_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                for w in writes:
                    fields = [part for pair in w.fields.items() for part in pair]
                    pipe.eval(_WRITE, 2, keys.user(w.user_id), keys.user_senders(w.user_id),
                              len(w.fields), *fields, len(w.add_senders), *w.add_senders,
                              *w.remove_senders)
                if created:
                    pipe.sadd(keys.users_index(), *created)
                for address, user_id in gone:
                    pipe.eval(_RELEASE, 1, keys.sender_index(address), user_id)
                await pipe.execute()

    async def release(self, releases: Sequence[tuple[str, str]]) -> None:
        """Delete the index entry of each (address, user id) if it still names that user
        (``release_sender.lua``): a claim given back."""
        if not releases:
            return
        with store_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                for address, user_id in releases:
                    pipe.eval(_RELEASE, 1, keys.sender_index(address), user_id)
                await pipe.execute()
