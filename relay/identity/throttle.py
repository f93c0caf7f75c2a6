"""Client protections: connection limits and AUTH failure throttling (STYLE §1 steps 1-2).

Both key a client by its real address (after PROXY, see ``relay/smtp/proxy.py``): an IPv4 address as
is, an IPv6 address by its /64, since one host usually holds a whole /64.

- ``ConnectionLimiter`` counts open connections in this process, in total and per client.
  It is per process on purpose: it protects this process's memory and file descriptors, and
  needs no cleanup when a process dies. With ``serve --workers N`` each worker has its own.
- ``AuthThrottle`` counts failed AUTH attempts per client and per login in Redis, so every
  relay sharing the Redis sees the same counts (a guesser cannot spread attempts over the
  relays behind a load balancer). A counter is a string with a TTL (``auth_failure.lua``):
  the window starts at the first failure and the count resets when it expires.
  Once a count reaches its limit, AUTH from that client, or for that login, gets
  ``454 4.7.0`` without the password being checked, until the window ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from typing import Any

from redis.commands.core import AsyncScript

from relay.errors import AuthThrottledError
from relay.store import keys
from relay.store.client import RedisClient, store_errors
from relay.store.scripts import lua_source


def client_key(ip: str) -> str:
    """The unit a limit counts: the IPv4 address, or the IPv6 /64 network."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def login_digest(login: bytes) -> str:
    """A short digest of the lower-cased login: the key part for per-login counters."""
    return hashlib.sha256(login.strip().lower()).hexdigest()[:32]


class AuthThrottle:
    """Failed AUTH attempts per client and per login, in Redis, within a window."""

    def __init__(self, redis: RedisClient, *, per_client: int, per_login: int,
                 window: float) -> None:
        self._redis = redis
        self.per_client = per_client
        self.per_login = per_login
        self._window_ms = max(1, round(window * 1000))
        self._count: AsyncScript = redis.register_script(
            lua_source("relay.identity", "auth_failure.lua"))

    @property
    def enabled(self) -> bool:
        return bool(self.per_client or self.per_login)

    def _keys(self, client: str, login: bytes) -> tuple[str, str]:
        return (keys.auth_failures_client(client_key(client)),
                keys.auth_failures_login(login_digest(login)))

    def queue_check(self, pipe: Any, client: str, login: bytes) -> bool:
        """Queue the two reads of ``check`` on ``pipe`` (a non-transactional pipeline), so
        that AUTH can ask them together with the credential: False when throttling is off
        (nothing queued). ``judge`` reads the two results."""
        if not self.enabled:
            return False
        client_key_name, login_key_name = self._keys(client, login)
        # Two single-key reads; not MGET, which Redis Cluster refuses across slots.
        pipe.get(client_key_name)
        pipe.get(login_key_name)
        return True

    def judge(self, by_client: Any, by_login: Any) -> int:
        """The login's failures so far; AuthThrottledError when the client or the login is at
        its limit."""
        client_failures, login_failures = int(by_client or 0), int(by_login or 0)
        if self.per_client and client_failures >= self.per_client:
            raise AuthThrottledError("ip", client_failures)
        if self.per_login and login_failures >= self.per_login:
            raise AuthThrottledError("login", login_failures)
        return login_failures

    async def check(self, client: str, login: bytes) -> int:
        """The login's failures so far in its window (0 when throttling is off).

        Raises AuthThrottledError when the client or the login is at its limit, and
        StoreUnavailableError when Redis cannot be asked (fail closed, like AUTH itself).
        """
        if not self.enabled:
            return 0
        with store_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                self.queue_check(pipe, client, login)
                by_client, by_login = await pipe.execute()
        return self.judge(by_client, by_login)

    async def record_failure(self, client: str, login: bytes) -> tuple[int, int]:
        """Count one failed attempt; returns (client failures, login failures) in the window.

        Raises StoreUnavailableError when Redis cannot be reached.
        """
        if not self.enabled:
            return 0, 0
        client_key_name, login_key_name = self._keys(client, login)
        window = [self._window_ms]
        with store_errors():
            # One script call per key (they may live in different cluster slots), both in
            # flight at once. This is the failure path only: a correct AUTH never gets here.
            by_client, by_login = await asyncio.gather(
                self._count(keys=[client_key_name], args=window),
                self._count(keys=[login_key_name], args=window))
        return int(by_client), int(by_login)

    async def record_success(self, login: bytes) -> None:
        """Clear the login's failures after a successful AUTH (the client's stay counted).

        Raises StoreUnavailableError when Redis cannot be reached.
        """
        if not self.per_login:
            return
        with store_errors():
            await self._redis.delete(self._keys("", login)[1])
