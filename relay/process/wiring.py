"""Wiring only: settings -> Redis -> scripts -> policies -> upstream -> listeners; graceful
start and stop (STYLE §2). Production (``serve``) and the tests start the relay through this
same class.

Signals in ``serve`` (``relay/process/serve.py``): SIGTERM (and SIGINT) drain the relay
(``RelayApp.stop``, see ``relay/smtp/shutdown.py``), SIGHUP reloads ``policies/``
(``RelayApp.reload_policies``). With several worker processes,
``relay/process/supervisor.py`` runs one ``serve`` per worker on sockets it bound itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import structlog

from relay.admin.api import AdminServer
from relay.admin.operations import Admin
from relay.admin.public import PublicServer, public_groups
from relay.admin.usage_links import UsageLinks
from relay.config.policies import Policies, PolicyError, load_policies
from relay.config.reload import changed_files, read_policies
from relay.config.settings import Settings
from relay.decisions.dedup import DedupStore
from relay.decisions.months import Clock, SystemClock
from relay.decisions.quota import QuotaStore
from relay.decisions.settle import LateSettlements
from relay.decisions.shadow_counts import ShadowCounts
from relay.decisions.shadow_trial import Recorder, ShadowTrial, open_trial
from relay.decisions.suppression import SuppressionStore
from relay.delivery.capture import CaptureUpstream
from relay.delivery.credentials import CredentialStore, load_key
from relay.delivery.pool import SmtpUpstream
from relay.delivery.routes import RouteUpstreams
from relay.delivery.upstream import Upstream
from relay.errors import StartupError
from relay.events.stream import EventLog
from relay.identity.accounts import AccountStore
from relay.identity.signed_links import LinkSigner, load_link_secret
from relay.identity.throttle import AuthThrottle
from relay.observe.health import MetricsServer, RelayReadiness
from relay.observe.metrics import RelayMetrics, UpstreamMetrics
from relay.observe.runtime import RuntimeMonitor
from relay.smtp import tickets
from relay.smtp.admission import ConnectionLimiter
from relay.smtp.hooks import RelayHandler
from relay.smtp.listeners import listen, make_factory
from relay.smtp.proxy import ProxyPolicy
from relay.smtp.resubmission import Resubmissions
from relay.smtp.screening import RecipientScreen
from relay.smtp.services import Services
from relay.smtp.shutdown import SessionTracker
from relay.smtp.tls import ensure_dev_certificate, server_context
from relay.smtp.unsubscribe import UnsubscribeLinks
from relay.store.client import RedisClient

if TYPE_CHECKING:
    pass

log = structlog.get_logger()

# How long a delivery whose client is gone may still run once the drain's time is up: the
# upstream usually answers the final dot within it, and its outcome is then counted exactly.
_DELIVERY_GRACE_SECONDS = 2.0


def make_upstream(settings: Settings, metrics: UpstreamMetrics | None = None) -> Upstream:
    """The configured upstream pool, or the capture folder (development default)."""
    s = settings
    if s.upstream is None:
        log.warning("dev.capture_upstream", directory=str(s.capture_dir),
                    note="development default: mail is written to files, not delivered; "
                         "set RELAY_UPSTREAM_URL in production")
        return CaptureUpstream(s.capture_dir)
    return SmtpUpstream(s.upstream, size=s.upstream_pool_size, timeout=s.upstream_timeout,
                        local_hostname=s.hostname, tls_verify=s.upstream_tls_verify,
                        ca_file=s.upstream_ca_file, metrics=metrics)


def make_routes(settings: Settings, policies: Policies, default: Upstream,
                credentials: CredentialStore,
                previous: RouteUpstreams | None = None,
                metrics: RelayMetrics | None = None) -> RouteUpstreams:
    """The routes of routing.toml over their upstreams; a route whose upstream setting is
    missing is logged at start-up and answers 451 4.3.5 until it is configured. On a reload,
    ``previous`` lends its pools to the routes that did not change."""
    routes = RouteUpstreams(policies.routing, default=default, targets=settings.route_urls,
                            credentials=credentials, pool_size=settings.upstream_pool_size,
                            timeout=settings.upstream_timeout, hostname=settings.hostname,
                            tls_verify=settings.upstream_tls_verify,
                            ca_file=settings.upstream_ca_file, previous=previous,
                            metrics=metrics)
    for name in routes.missing_settings():
        log.warning("route.unconfigured", route=name,
                    note=f"set RELAY_ROUTE_{name.upper()}_URL; sends routed there get a 451")
    return routes


class RelayApp:
    """The running relay. ``async with RelayApp(...)`` starts it; leaving stops it.

    ``sockets``: listening sockets bound by a supervisor (``relay/process/supervisor.py``),
    by setting name (``listen``, ``smtps_listen``, ``admin_listen``, ``public_listen``);
    without them the relay binds the configured addresses itself.
    """

    def __init__(self, settings: Settings, redis: RedisClient, *,
                 clock: Clock | None = None, policies: Policies | None = None,
                 sockets: Mapping[str, socket.socket] | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.clock = clock or SystemClock()
        self.policies = policies or load_policies(settings.policies_dir)
        # Set when a stop begins: /readyz answers 503 from then on.
        self.draining = False
        routes = self.policies.routing.routes
        self.metrics = RelayMetrics(
            routes=routes, pools=["default", *(r.name for r in routes.values()
                                               if r.upstream == "setting")],
            failovers=[(r.name, r.failover) for r in routes.values() if r.failover])
        self.accounts = AccountStore(redis)
        self.quota = QuotaStore(redis, self.metrics)
        self.settlements = LateSettlements(self.quota, self.metrics)
        self.events = EventLog(redis, self.metrics)
        # Candidate policies trialled beside the live ones (docs/shadow.md).
        self.shadow_counts = ShadowCounts(redis, self.metrics)
        self._shadow_recorder = Recorder(self.metrics, self.shadow_counts, self.clock)
        self.upstream = make_upstream(settings, self.metrics.upstream("default"))
        self.credentials = CredentialStore(redis, lambda: load_key(settings.credentials_key,
                                                                   settings.state_dir))
        self.routes = make_routes(settings, self.policies, self.upstream, self.credentials,
                                  metrics=self.metrics)
        # The link secret, read (in development: made) once, on first use.
        link_secret = functools.cache(
            lambda: load_link_secret(settings.link_secret, settings.state_dir))
        self.handler = RelayHandler(
            accounts=self.accounts,
            services=Services(quota=self.quota, events=self.events, routes=self.routes,
                              policies=self.policies, max_recipients=settings.max_recipients,
                              screen=RecipientScreen(SuppressionStore(redis), self.quota,
                                                     self.metrics),
                              metrics=self.metrics, settlements=self.settlements,
                              clock=self.clock,
                              links=UnsubscribeLinks(settings.public_url, link_secret),
                              resubmissions=Resubmissions(
                                  DedupStore(redis, self.metrics), self.clock,
                                  window=settings.dedup_window,
                                  upstream_timeout=max([settings.upstream_timeout, *(
                                      r.timeout for r in routes.values() if r.timeout)]),
                                  redis_timeout=settings.redis_timeout, metrics=self.metrics,
                                  settlements=self.settlements),
                              shadow=self.shadow_for(self.policies)),
            clock=self.clock, hostname=settings.hostname, default_tz=settings.default_tz,
            throttle=AuthThrottle(redis, per_client=settings.auth_max_failures_per_ip,
                                  per_login=settings.auth_max_failures_per_login,
                                  window=settings.auth_failure_window))
        # One count of open connections for every listener of this process.
        self.connections = ConnectionLimiter(total=settings.max_connections,
                                             per_client=settings.max_connections_per_ip)
        self.metrics_server: MetricsServer | None = None
        if settings.metrics_listen is not None:
            self.metrics_server = MetricsServer(
                settings.metrics_listen, self.metrics.registry,
                RelayReadiness(redis=redis, upstream=self.upstream,
                               timeout=settings.redis_timeout, draining=lambda: self.draining,
                               metrics=self.metrics),
                sock=(sockets or {}).get("metrics_listen"))
        self._servers: list[asyncio.Server] = []
        self._sockets = dict(sockets or {})
        self._sessions = SessionTracker()
        self._stopped = False
        # Event-loop lag and GC pauses: what the process adds to every reply's tail.
        self.runtime = RuntimeMonitor(self.metrics.registry)
        self.reload_lock = asyncio.Lock()
        self.admin: Admin | None = None
        self.admin_server: AdminServer | None = None
        if settings.admin_token:
            self.admin = Admin(redis, self.policies, self.clock, settings.default_tz)
            self.admin_server = AdminServer(self.admin, settings.admin_token,
                                            settings.admin_listen,
                                            sock=self._sockets.get("admin_listen"))
        # One-click unsubscribe and the provider webhooks (relay/admin/public.py).
        self.public_server: PublicServer | None = None
        # The operations the agent's usage page reads (the API's when it is on).
        self.usage_admin: Admin | None = None
        if settings.public_listen is not None:
            self.usage_admin = self.admin or Admin(redis, self.policies, self.clock,
                                                   settings.default_tz)
            # One signer for every link: the page's, the API's and (through the same cached
            # secret) the SMTP path's, whose first use then reads no file on the event loop.
            signer = LinkSigner(link_secret())
            if self.admin is not None:
                # POST /v1/users/{user}/usage-link: links the CRM embeds.
                self.admin.usage_links = UsageLinks(signer, settings.public_url)
            self.public_server = PublicServer(
                settings.public_listen,
                public_groups(settings, redis, self.accounts, self.metrics, self.clock,
                              self.usage_admin, signer),
                sock=self._sockets.get("public_listen"))

    async def start(self) -> None:
        s = self.settings
        if s.tls_cert and s.tls_key:
            cert, key = s.tls_cert, s.tls_key
        else:
            cert, key = await asyncio.to_thread(ensure_dev_certificate, s.state_dir, s.hostname)
            log.warning("dev.self_signed_certificate", cert=str(cert),
                        note="development default: set RELAY_TLS_CERT and RELAY_TLS_KEY")
        try:
            tls = server_context(cert, key)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot load TLS certificate {cert}: {exc}") from None
        # A worker of several: the supervisor's ticket key, so that tickets resume on any.
        tickets.share(tls, tickets.take_key(), functools.partial(server_context, cert, key))
        if s.allow_plaintext_auth:
            log.warning("dev.plaintext_auth", listen=str(s.listen),
                        note="AUTH offered without TLS on a loopback listener")
        def factory(implicit_tls: bool) -> Any:
            return self._sessions.track(make_factory(
                self.handler, hostname=s.hostname, data_size_limit=s.max_message_size,
                idle_timeout=s.idle_timeout, tls_context=tls,
                allow_plaintext_auth=s.allow_plaintext_auth, implicit_tls=implicit_tls,
                connections=self.connections,
                # PROXY cannot precede implicit TLS (settings refuse both).
                proxy=None if implicit_tls else proxy,
                transaction_timeout=s.transaction_timeout,
                tls_handshake_timeout=s.tls_handshake_timeout))
        proxy = (ProxyPolicy(s.trusted_proxies, s.proxy_protocol_timeout)
                 if s.proxy_protocol else None)
        if proxy is not None:
            log.info("proxy_protocol.enabled", trusted=[str(n) for n in s.trusted_proxies])
        try:
            self._servers.append(await listen(factory(False), s.listen,
                                              sock=self._sockets.get("listen")))
            if s.smtps_listen is not None:
                self._servers.append(await listen(factory(True), s.smtps_listen,
                                                  ssl_context=tls,
                                                  sock=self._sockets.get("smtps_listen"),
                                                  tls_handshake_timeout=s.tls_handshake_timeout))
        except OSError as exc:
            await self.stop()
            raise StartupError(f"cannot listen: {exc.strerror or exc}") from None
        if self.admin_server is not None:
            try:
                await self.admin_server.start()
            except OSError as exc:
                await self.stop()
                raise StartupError(f"cannot listen for the admin API: {exc.strerror or exc}") \
                    from None
        else:
            log.info("admin_api.disabled", note="set RELAY_ADMIN_TOKEN to enable it")
        if self.public_server is not None:
            try:
                await self.public_server.start()
            except OSError as exc:
                self.public_server = None
                await self.stop()
                raise StartupError(f"cannot listen for the public HTTP listener "
                                   f"(public_listen): {exc.strerror or exc}") from None
        if self.metrics_server is not None:
            try:
                await self.metrics_server.start()
            except OSError as exc:
                self.metrics_server = None
                await self.stop()
                raise StartupError(f"cannot listen for metrics (metrics_listen): "
                                   f"{exc.strerror or exc}") from None
        # Started once everything else is up: a start-up that fails leaves no timer and no
        # GC callback behind (``stop`` stops it, and is a no-op for it before this).
        self.runtime.start()
        loop = asyncio.get_running_loop()
        log.info("relay.started", listen=[str(a) for a in self.addresses],
                 upstream=self.upstream.name, policies=str(s.policies_dir),
                 plans=sorted(self.policies.plans),
                 event_loop=type(loop).__module__.partition(".")[0])

    @property
    def addresses(self) -> list[str]:
        found = []
        for server in self._servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                found.append(f"{host}:{port}")
        return found

    @property
    def port(self) -> int:
        """The bound port of the STARTTLS listener (useful with port 0)."""
        return int(self._servers[0].sockets[0].getsockname()[1])

    @property
    def smtps_port(self) -> int:
        return int(self._servers[1].sockets[0].getsockname()[1])

    @property
    def metrics_port(self) -> int:
        """The bound port of the metrics listener (useful with port 0)."""
        assert self.metrics_server is not None
        return self.metrics_server.port

    # -- policies ------------------------------------------------------------------------------
    def routes_for(self, policies: Policies, previous: RouteUpstreams) -> RouteUpstreams:
        """New routes for reloaded policies, keeping ``previous``'s unchanged pools."""
        return make_routes(self.settings, policies, self.upstream, self.credentials, previous,
                           metrics=self.metrics)

    def shadow_for(self, policies: Policies) -> ShadowTrial:
        """The shadow trial beside ``policies`` (off when unset or bad; never raises).
        Reads the shadow folder: off the event loop once serving."""
        return open_trial(self.settings.shadow_policies_dir, policies, self._shadow_recorder)

    def use_policies(self, policies: Policies, routes: RouteUpstreams,
                     shadow: ShadowTrial) -> None:
        """Swap in reloaded policies (and the shadow trial beside them) everywhere at once.
        The handler's ``services`` is replaced whole: a transaction keeps the services it
        started with."""
        self.policies, self.routes = policies, routes
        self.handler.services = replace(self.handler.services, policies=policies,
                                        routes=routes, shadow=shadow)
        for admin in (self.admin, self.usage_admin):
            if admin is not None:
                admin.policies = policies

    async def reload_policies(self) -> bool:
        """Load the policy folder and swap it in, or keep the old policies and log why.
        Returns whether the new policies are in force. Never raises for a bad file."""
        directory = self.settings.policies_dir
        async with self.reload_lock:
            try:
                # A few small files, but file I/O all the same: off the event loop.
                policies = await asyncio.to_thread(read_policies, directory)
            except PolicyError as exc:
                log.error("policies.reload_failed", directory=str(directory), error=str(exc),
                          note="the previous policies stay in force")
                return False
            if self.draining:
                log.info("policies.reload_skipped", reason="draining")
                return False
            # A bad shadow file turns the trial off; the live policies are swapped in anyway.
            shadow = await asyncio.to_thread(self.shadow_for, policies)
            old_policies, old_routes = self.policies, self.routes
            changed = changed_files(old_policies, policies)
            routes = old_routes
            if policies.routing != old_policies.routing:
                routes = self.routes_for(policies, old_routes)
            self.use_policies(policies, routes, shadow)
            if routes is not old_routes:
                await old_routes.close(successor=routes)
            log.info("policies.reloaded", directory=str(directory), changed=changed,
                     plans={p.name: p.monthly_limit for p in policies.plans.values()})
            return True

    # -- stopping --------------------------------------------------------------------------------
    async def stop(self, drain_timeout: float = 0.0) -> None:
        """Drain, then stop: close the listeners, say ``421`` to idle sessions, give open
        transactions up to ``drain_timeout`` seconds to finish, cut (and refund) the rest.
        Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.draining = True
        self.handler.draining = True
        for server in self._servers:
            server.close()
        if self._servers:
            log.info("relay.draining", sessions=len(self._sessions.open_sessions()),
                     timeout=drain_timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        cut = await self._sessions.drain(drain_timeout)
        await self._sessions.wait_closed(5)
        for server in self._servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)
        self._servers.clear()
        # The transactions of the sessions that ended are retired in tasks of their own, and
        # a delivery whose client left (or was cut) goes on in its own: wait for them, and
        # their commits and refunds, before the Redis client goes away. A delivery gets what
        # is left of the drain, and at least a moment to hear the upstream's reply.
        await asyncio.sleep(0)
        await self.handler.drain(max(deadline - loop.time(), _DELIVERY_GRACE_SECONDS))
        # Commits and refunds still waiting for Redis get one more timeout's worth of tries.
        await self.settlements.close(max(deadline - loop.time(), self.settings.redis_timeout))
        await self.shadow_counts.close(self.settings.redis_timeout)
        if self.admin_server is not None:
            await self.admin_server.stop()
        if self.public_server is not None:
            await self.public_server.stop()
        async with self.reload_lock:  # not while a reload swaps the routes
            await self.routes.close()
        # Last: /readyz keeps answering 503 (draining) while the rest stops.
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        await self.runtime.stop()
        log.info("relay.stopped", sessions_cut=cut)

    async def __aenter__(self) -> RelayApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
