"""Credentials -> ``Principal`` (STYLE §1 step 2).

A login containing ``@`` is a user credential (the user's email); any other login is an app
credential (``smartplans``, ``campaigns``, ``command``…). The slow scrypt check runs in a
worker thread so one AUTH never stalls the other connections on the event loop.

Apps reconnect constantly, and a slow hash on every connection would cap the relay at tens
of connections per second. So a successful check is remembered in a bounded in-memory cache
keyed by a keyed digest (HMAC-SHA256 under a per-process random key) of login and password:
the password itself is never kept. Every AUTH still reads the stored credential from Redis,
and the cache entry is used only while that stored hash is unchanged and the account active,
so a changed password or a disabled user or app takes effect at the next AUTH.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections import OrderedDict

from relay.identity.accounts import (
    AccountStore,
    AppPrincipal,
    Principal,
    UserPrincipal,
    app_credential,
)
from relay.identity.passwords import DUMMY_HASH, verify_password
from relay.identity.throttle import AuthThrottle
from relay.store import hot
from relay.store.client import store_errors

CACHE_SIZE = 10_000


class VerifiedCache:
    """digest(login, password) -> the stored hash it was verified against (LRU, bounded)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self._key = os.urandom(32)
        self._entries: OrderedDict[bytes, str] = OrderedDict()
        self._size = size

    def digest(self, login: bytes, password: bytes) -> bytes:
        # Length-prefixed, so ("ab", "c") and ("a", "bc") cannot collide.
        return hmac.new(self._key, len(login).to_bytes(4, "big") + login + password,
                        hashlib.sha256).digest()

    def holds(self, digest: bytes, stored: str) -> bool:
        found = self._entries.get(digest)
        if found is None or not hmac.compare_digest(found, stored):
            return False
        self._entries.move_to_end(digest)
        return True

    def remember(self, digest: bytes, stored: str) -> None:
        self._entries[digest] = stored
        self._entries.move_to_end(digest)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class Authenticator:
    def __init__(self, accounts: AccountStore, cache: VerifiedCache | None = None) -> None:
        self._accounts = accounts
        self.cache = cache or VerifiedCache()

    async def authenticate(self, login: bytes, password: bytes) -> Principal | None:
        """The principal for valid, active credentials; None otherwise.

        Raises StoreUnavailableError when Redis cannot be asked (the caller answers 454).
        """
        principal, _ = await self.check(login, password)
        return principal

    async def check(self, login: bytes, password: bytes, throttle: AuthThrottle | None = None,
                    client: str = "") -> tuple[Principal | None, int]:
        """``authenticate``, with the throttle's check first: (principal or None, the login's
        failures so far). Raises AuthThrottledError before the password is looked at, and
        StoreUnavailableError.

        An app login (the applications' path, and a new connection per message for many of
        them) asks Redis once: the throttle's two counters and the app's credential in one
        pipelined round trip. A user login needs the user id from the address first.
        """
        try:
            name = login.decode("utf-8")
        except UnicodeDecodeError:
            name = ""
        principal: Principal | None = None
        stored = DUMMY_HASH
        earlier = 0
        if name and "@" not in name:
            with store_errors():
                reads = hot.HotReads(self._accounts.redis)
                throttled = throttle is not None and throttle.queue_check(reads, client, login)
                asked = self._accounts.queue_app(reads, name)
                results = await reads.execute() if throttled or asked else []
            if throttled:
                assert throttle is not None
                earlier = throttle.judge(results[0], results[1])
            app = app_credential(name, results[-1]) if asked else None
            if app is not None and app[0].status == "active":
                principal, stored = AppPrincipal(app[0].name), app[1]
        else:
            earlier = await throttle.check(client, login) if throttle is not None else 0
            if name:
                found = await self._accounts.user_password_hash(name)
                if found is not None and found[0].active:
                    principal, stored = UserPrincipal(found[0].email, found[0].id), found[1]
        return await self._verify(principal, stored, login, password), earlier

    async def _verify(self, principal: Principal | None, stored: str, login: bytes,
                      password: bytes) -> Principal | None:
        if principal is None:
            # Still pay for one hash, so unknown logins and wrong passwords take the same time.
            await asyncio.to_thread(verify_password, password, stored)
            return None
        digest = self.cache.digest(login, password)
        if self.cache.holds(digest, stored):
            return principal
        if not await asyncio.to_thread(verify_password, password, stored):
            return None
        self.cache.remember(digest, stored)
        return principal
