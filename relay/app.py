"""Wiring only: settings -> Redis -> scripts -> policies -> upstream -> listeners; graceful
start and stop (STYLE §2). Production (``serve``) and the tests start the relay through this
same class.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import structlog

from relay.accounts import AccountStore
from relay.admin import Admin
from relay.adminapi import AdminServer
from relay.channels import Channel, EmailChannel, WebhookChannel
from relay.credentials import CredentialStore, load_key
from relay.embedded import EmbeddedRedis
from relay.events import EventLog
from relay.handler import RelayHandler
from relay.health import MetricsServer, NotifierReadiness, RelayReadiness
from relay.metrics import NotifierMetrics, RelayMetrics, UpstreamMetrics
from relay.notify import GROUP, Notifier
from relay.period import Clock, SystemClock
from relay.policies import Policies, load_policies
from relay.quota import QuotaStore
from relay.routes import RouteUpstreams
from relay.server import listen, make_factory
from relay.settings import Settings
from relay.store import connect_redis
from relay.tlsconfig import ensure_dev_certificate, server_context
from relay.transaction import Services
from relay.upstream import CaptureUpstream, SmtpUpstream, Upstream

log = structlog.get_logger()


class StartupError(RuntimeError):
    pass


@asynccontextmanager
async def redis_for(settings: Settings, *, share: bool) -> AsyncIterator[aioredis.Redis]:
    """The configured Redis, or the embedded development one (started and stopped here)."""
    embedded: EmbeddedRedis | None = None
    if settings.redis_url:
        url = settings.redis_url
    else:
        embedded = EmbeddedRedis(settings.state_dir)
        # serve waits a little for an admin command that owns the server for a moment.
        await embedded.start(share=share, wait_seconds=15 if share else 5)
        url = embedded.url
        if embedded.owned:
            log.warning("dev.embedded_redis", url=url, directory=str(embedded.directory),
                        note="development default: set RELAY_REDIS_URL in production")
    client = connect_redis(url, timeout=settings.redis_timeout)
    try:
        yield client
    finally:
        await client.aclose()
        if embedded is not None:
            await embedded.stop()


async def wait_for_redis(client: aioredis.Redis, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            await client.ping()
            return
        except (aioredis.RedisError, OSError) as exc:
            if time.monotonic() > deadline:
                raise StartupError(f"Redis not reachable: {exc}") from None
            await asyncio.sleep(0.2)


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
                metrics: RelayMetrics | None = None) -> RouteUpstreams:
    """The routes of routing.toml over their upstreams; a route whose upstream setting is
    missing is logged at start-up and answers 451 4.3.5 until it is configured."""
    routes = RouteUpstreams(policies.routing, default=default, targets=settings.route_urls,
                            credentials=credentials, pool_size=settings.upstream_pool_size,
                            timeout=settings.upstream_timeout, hostname=settings.hostname,
                            tls_verify=settings.upstream_tls_verify,
                            ca_file=settings.upstream_ca_file, metrics=metrics)
    for name in routes.missing_settings():
        log.warning("route.unconfigured", route=name,
                    note=f"set RELAY_ROUTE_{name.upper()}_URL; sends routed there get a 451")
    return routes


class RelayApp:
    """The running relay. ``async with RelayApp(...)`` starts it; leaving stops it."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, *,
                 clock: Clock | None = None, policies: Policies | None = None) -> None:
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
        self.events = EventLog(redis, self.metrics)
        self.upstream = make_upstream(settings, self.metrics.upstream("default"))
        self.credentials = CredentialStore(redis, lambda: load_key(settings.credentials_key,
                                                                   settings.state_dir))
        self.routes = make_routes(settings, self.policies, self.upstream, self.credentials,
                                  self.metrics)
        self.handler = RelayHandler(
            accounts=self.accounts,
            services=Services(quota=self.quota, events=self.events, routes=self.routes,
                              policies=self.policies, max_recipients=settings.max_recipients,
                              metrics=self.metrics),
            clock=self.clock, hostname=settings.hostname, default_tz=settings.default_tz)
        self.metrics_server: MetricsServer | None = None
        if settings.metrics_listen is not None:
            self.metrics_server = MetricsServer(
                settings.metrics_listen, self.metrics.registry,
                RelayReadiness(redis=redis, upstream=self.upstream,
                               timeout=settings.redis_timeout, draining=lambda: self.draining,
                               metrics=self.metrics))
        self._servers: list[asyncio.Server] = []
        self.admin_server: AdminServer | None = None
        if settings.admin_token:
            self.admin_server = AdminServer(
                Admin(redis, self.policies, self.clock, settings.default_tz),
                settings.admin_token, settings.admin_listen)

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
        if s.allow_plaintext_auth:
            log.warning("dev.plaintext_auth", listen=str(s.listen),
                        note="AUTH offered without TLS on a loopback listener")
        def factory(implicit_tls: bool) -> Any:
            return make_factory(self.handler, hostname=s.hostname,
                                data_size_limit=s.max_message_size, idle_timeout=s.idle_timeout,
                                tls_context=tls, allow_plaintext_auth=s.allow_plaintext_auth,
                                implicit_tls=implicit_tls)
        try:
            self._servers.append(await listen(factory(False), s.listen))
            if s.smtps_listen is not None:
                self._servers.append(await listen(factory(True), s.smtps_listen,
                                                  ssl_context=tls))
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
        if self.metrics_server is not None:
            try:
                await self.metrics_server.start()
            except OSError as exc:
                self.metrics_server = None
                await self.stop()
                raise StartupError(f"cannot listen for metrics (metrics_listen): "
                                   f"{exc.strerror or exc}") from None
        log.info("relay.started", listen=[str(a) for a in self.addresses],
                 upstream=self.upstream.name, policies=str(s.policies_dir),
                 plans=sorted(self.policies.plans))

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

    async def stop(self) -> None:
        self.draining = True
        if self.admin_server is not None:
            await self.admin_server.stop()
        for server in self._servers:
            server.close()
        for server in self._servers:
            # Closing the listener does not end open SMTP sessions; cut them so their
            # transactions are retired (refunded) before the process exits.
            close_clients = getattr(server, "close_clients", None)  # Python 3.13+
            if close_clients is not None:
                close_clients()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)
        self._servers.clear()
        await asyncio.sleep(0)
        await self.handler.drain()
        await self.routes.close()
        # Last: /readyz keeps answering 503 (draining) while the rest stops.
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        log.info("relay.stopped")

    async def __aenter__(self) -> RelayApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM."""
    # Signal handlers first: a SIGTERM during start-up (waiting for Redis, say) must still
    # stop the embedded Redis cleanly instead of killing the process around it.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    async with redis_for(settings, share=False) as redis:
        await wait_for_redis(redis, 10)
        app = RelayApp(settings, redis)
        await app.start()
        try:
            await stopping.wait()
        finally:
            log.info("relay.stopping")
            await app.stop()


async def run_notifier(settings: Settings) -> None:
    """``command-relay notifier``: deliver events until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    policies = load_policies(settings.policies_dir)
    policy = policies.notifications
    async with redis_for(settings, share=True) as redis, aiohttp.ClientSession() as http:
        await wait_for_redis(redis, 10)
        upstream = make_upstream(settings)
        channels: dict[str, Channel] = {}
        if policy.in_app.enabled:
            if settings.notify_webhook_url and settings.notify_webhook_secret:
                channels["in_app"] = WebhookChannel(
                    settings.notify_webhook_url, settings.notify_webhook_secret,
                    timeout=policy.in_app_timeout, session=http)
            else:
                log.warning("notify.in_app_unconfigured",
                            note="set RELAY_NOTIFY_WEBHOOK_URL and RELAY_NOTIFY_WEBHOOK_SECRET; "
                                 "in-app notifications are skipped meanwhile")
        if policy.timeline.enabled:
            if settings.timeline_webhook_url and settings.timeline_webhook_secret:
                channels["timeline"] = WebhookChannel(
                    settings.timeline_webhook_url, settings.timeline_webhook_secret,
                    timeout=policy.timeline_timeout, session=http, name="timeline")
            else:
                log.warning("notify.timeline_unconfigured",
                            note="set RELAY_TIMELINE_WEBHOOK_URL and "
                                 "RELAY_TIMELINE_WEBHOOK_SECRET; Contact Timeline entries are "
                                 "skipped meanwhile")
        if policy.email.enabled:
            channels["email"] = EmailChannel(upstream, sender=policy.email_from,
                                             hostname=settings.hostname)
        metrics = NotifierMetrics(channels)
        server: MetricsServer | None = None
        if settings.notifier_metrics_listen is not None:
            server = MetricsServer(settings.notifier_metrics_listen, metrics.registry,
                                   NotifierReadiness(redis=redis, timeout=settings.redis_timeout,
                                                     stopping=stop.is_set, metrics=metrics,
                                                     group=GROUP))
            try:
                await server.start()
            except OSError as exc:
                await upstream.close()
                raise StartupError(f"cannot listen for metrics (notifier_metrics_listen): "
                                   f"{exc.strerror or exc}") from None
        try:
            await Notifier(redis, channels, policy, metrics=metrics).run(stop)
        finally:
            await upstream.close()
            if server is not None:
                await server.stop()
