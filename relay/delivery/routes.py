"""The running routes: one upstream pool per route, per-user pools for routes that log in with
the user's own credentials (Mailchimp), and failover (STYLE §1 step 6).

Failover is used only when a route's upstream cannot be reached at all (connect, TLS or
login failure while opening the transaction, before any recipient was accepted), never
after a partial send.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import structlog

from relay.config.endpoints import UpstreamTarget
from relay.config.routing import Route, Routing
from relay.delivery.credentials import CredentialStore
from relay.delivery.pool import SmtpUpstream
from relay.delivery.upstream import Upstream, UpstreamSession
from relay.errors import (
    MissingRouteCredentialsError,
    RouteNotConfiguredError,
    UpstreamUnavailableError,
)
from relay.identity.accounts import User
from relay.observe.metrics import RelayMetrics, detached

log = structlog.get_logger()

# Per-user pools are small and few: a user's campaign rarely needs more than two connections,
# and the least recently used pools are closed beyond this many.
USER_POOL_SIZE = 2
MAX_USER_POOLS = 200


class RouteUpstreams:
    """``previous``: the routes a policy reload replaces; their pools are kept wherever a
    route's upstream and pool settings did not change, so a reload keeps warm connections."""

    def __init__(self, routing: Routing, *, default: Upstream,
                 targets: Mapping[str, UpstreamTarget], credentials: CredentialStore,
                 pool_size: int, timeout: float, hostname: str, tls_verify: bool,
                 ca_file: Path | None = None, previous: RouteUpstreams | None = None,
                 metrics: RelayMetrics | None = None) -> None:
        self._routing = routing
        # Pools are labelled "default" (RELAY_UPSTREAM_URL) or by their route's name.
        self._metrics = metrics or detached()
        self._default = default
        self._credentials = credentials
        self._timeout = timeout
        self._hostname = hostname
        self._tls_verify = tls_verify
        self._ca_file = ca_file
        self._targets = dict(targets)
        self._pool_size = pool_size
        self._retired = False
        self._shared: dict[str, Upstream] = {}
        self._per_user: OrderedDict[tuple[str, str, str], SmtpUpstream] = OrderedDict()
        kept: dict[tuple[object, ...], Upstream] = {}
        if previous is not None:
            kept = {previous._pool_key(route): previous._shared[route.name]
                    for route in previous._routing.routes.values()
                    if route.name in previous._shared}
        for route in routing.routes.values():
            if route.upstream == "default":
                self._shared[route.name] = default
            elif route.credentials == "upstream" and route.name in targets:
                self._shared[route.name] = kept.get(self._pool_key(route)) or SmtpUpstream(
                    targets[route.name], size=route.pool_size or pool_size,
                    timeout=route.timeout or timeout,
                    local_hostname=hostname, tls_verify=tls_verify, ca_file=ca_file,
                    metrics=self._metrics.upstream(route.name))
        if previous is not None:
            for key, pool in previous._per_user.items():
                old, new = previous._routing.routes.get(key[0]), routing.routes.get(key[0])
                if (old is not None and new is not None and new.credentials == "user"
                        and previous._pool_key(old) == self._pool_key(new)):
                    self._per_user[key] = pool

    def _pool_key(self, route: Route) -> tuple[object, ...]:
        """What a route's pool is made of: a pool is reused only when all of it is equal."""
        return (route.name, route.upstream, route.credentials, self._targets.get(route.name),
                route.pool_size or self._pool_size, route.timeout or self._timeout)

    def missing_settings(self) -> list[str]:
        """Routes whose upstream is a setting that is not set (checked at start-up)."""
        return [r.name for r in self._routing.routes.values()
                if r.upstream == "setting" and r.name not in self._targets]

    async def _upstream_for(self, route: Route, user: User) -> Upstream:
        if route.credentials == "upstream":
            upstream = self._shared.get(route.name)
            if upstream is None:
                raise RouteNotConfiguredError()
            return upstream
        target = self._targets.get(route.name)
        if target is None:
            raise RouteNotConfiguredError()
        creds = await self._credentials.load(user.id, route.name)
        if creds is None:
            raise MissingRouteCredentialsError.for_route(route.name)
        # Keyed by a digest of the secret, so changed credentials get a fresh pool.
        key = (route.name, creds.username, hashlib.sha256(creds.secret.encode()).hexdigest())
        pool = self._per_user.get(key)
        if pool is None:
            pool = SmtpUpstream(replace(target, username=creds.username or user.email,
                                        password=creds.secret),
                                size=route.pool_size or USER_POOL_SIZE,
                                timeout=route.timeout or self._timeout,
                                local_hostname=self._hostname, tls_verify=self._tls_verify,
                                ca_file=self._ca_file,
                                metrics=self._metrics.upstream(route.name))
            if self._retired:
                # A transaction that began before a reload still routes through these
                # routes: its pool works, but closes each connection when handed back.
                await pool.close()
            self._per_user[key] = pool
            while len(self._per_user) > MAX_USER_POOLS:
                _, oldest = self._per_user.popitem(last=False)
                await oldest.close()
        self._per_user.move_to_end(key)
        return pool

    async def begin(self, route: Route, user: User, sender: str, options: list[str], *,
                    smtputf8: bool) -> tuple[Route, UpstreamSession, str]:
        """Open a transaction on ``route`` (or its failover when unreachable).

        Returns the route actually used, the session and the upstream's name. Raises
        RelayError.
        """
        try:
            upstream = await self._upstream_for(route, user)
            return route, await upstream.begin(sender, options, smtputf8=smtputf8), \
                upstream.name
        except UpstreamUnavailableError:
            if route.failover is None:
                raise
            fallback = self._routing.routes[route.failover]
            self._metrics.failovers(route.name, fallback.name).inc()
            log.warning("route.failover", route=route.name, failover=fallback.name)
            upstream = await self._upstream_for(fallback, user)
            return fallback, await upstream.begin(sender, options, smtputf8=smtputf8), \
                upstream.name

    def _pools(self) -> dict[int, Upstream]:
        pools: dict[int, Upstream] = {id(u): u for u in self._shared.values()}
        pools.update((id(p), p) for p in self._per_user.values())
        return pools

    async def close(self, *, successor: RouteUpstreams | None = None) -> None:
        """Close every pool (at shutdown), or, after a reload, those ``successor`` does not
        use (never the default upstream). A closed pool still serves the transactions that
        hold one of its connections, and closes the connection when it is handed back."""
        keep = {} if successor is None else {**successor._pools(),
                                             id(successor._default): successor._default}
        self._retired = True
        for key, upstream in self._pools().items():
            if key not in keep:
                await upstream.close()
        self._per_user.clear()
