"""The metrics and health listener (STYLE §1 step 9): ``/metrics`` for Prometheus,
``/healthz`` and ``/readyz`` for Kubernetes probes and load balancers.

One small aiohttp server per process, apart from the SMTP listener and from the admin API: it
needs no token because it tells nothing about users (no per-user label), and it binds to
loopback by default (``RELAY_METRICS_LISTEN``; the notifier's is
``RELAY_NOTIFIER_METRICS_LISTEN``).

* ``/healthz``: 200 while the process runs (liveness: restart only a process that cannot
  answer at all).
* ``/readyz``: 200 when the process can do its work now, else 503 with the reasons as JSON
  (readiness: send it no traffic meanwhile). The relay is ready when Redis answers PING, its
  upstream is reachable and it is not draining; the notifier when Redis answers and it is not
  stopping.
* ``/metrics``: the process's own registry (relay/observe/metrics.py), in the text format Prometheus
  asks for (OpenMetrics when its Accept header says so). Each scrape first runs the readiness
  checks, so ``relay_redis_up``, ``relay_upstream_up`` and ``relay_ready`` are as of the scrape.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from relay.config.endpoints import Endpoint
from relay.observe.metrics import HealthGauges, NotifierMetrics, RelayMetrics
from relay.store import keys
from relay.store.client import REDIS_ERRORS, RedisClient

log = structlog.get_logger()

# A readiness check must answer before the prober gives up (Kubernetes' default is 1 s): a
# Redis that does not answer PING within this is as good as down.
PING_TIMEOUT = 1.0


class Reachable(Protocol):
    """What readiness asks of the default upstream (``relay.delivery``'s ``Upstream`` has
    it): observe sits below delivery and sees only this."""

    def reachable(self) -> bool | None: ...


@dataclass(frozen=True, slots=True)
class Readiness:
    """The outcome of the readiness checks: ready when there is no reason not to be."""

    reasons: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return not self.reasons


ReadinessCheck = Callable[[], Awaitable[Readiness]]


async def redis_answers(client: RedisClient, seconds: float) -> bool:
    try:
        return bool(await asyncio.wait_for(client.ping(), seconds))
    except (*REDIS_ERRORS, TimeoutError):
        return False


def _record(gauges: HealthGauges, reasons: list[str], *, redis_up: bool,
            draining: bool) -> Readiness:
    gauges.redis_up.set(redis_up)
    gauges.draining.set(draining)
    gauges.ready.set(not reasons)
    return Readiness(tuple(reasons))


class RelayReadiness:
    """``/readyz`` of ``serve``: Redis answers, the default upstream is reachable (its pool's
    last connection succeeded; while not, a probe retries in the background), not draining."""

    def __init__(self, *, redis: RedisClient, upstream: Reachable, timeout: float,
                 draining: Callable[[], bool], metrics: RelayMetrics) -> None:
        self._redis = redis
        self._upstream = upstream
        self._timeout = min(timeout, PING_TIMEOUT)
        self._draining = draining
        self._metrics = metrics

    async def __call__(self) -> Readiness:
        reasons: list[str] = []
        draining = self._draining()
        if draining:
            reasons.append("draining")
        redis_up = await redis_answers(self._redis, self._timeout)
        if not redis_up:
            reasons.append("redis_unreachable")
        upstream = self._upstream.reachable()
        self._metrics.upstream_up("default").set(upstream is True)
        if upstream is None:
            reasons.append("upstream_unchecked")  # the first probe is under way
        elif not upstream:
            reasons.append("upstream_unreachable")
        return _record(self._metrics.health, reasons, redis_up=redis_up, draining=draining)


class NotifierReadiness:
    """``/readyz`` of the notifier: Redis answers and the notifier is not stopping. Also reads
    the shared streams' lengths for the scrape (one pipelined round trip)."""

    def __init__(self, *, redis: RedisClient, timeout: float, stopping: Callable[[], bool],
                 metrics: NotifierMetrics, group: str) -> None:
        self._redis = redis
        self._timeout = min(timeout, PING_TIMEOUT)
        self._stopping = stopping
        self._metrics = metrics
        self._group = group

    async def _read_streams(self) -> bool:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xlen(keys.events())
            pipe.xlen(keys.dead_letters())
            pipe.xpending(keys.events(), self._group)
            length, dead, pending = await pipe.execute(raise_on_error=False)
        if isinstance(length, Exception) or isinstance(dead, Exception):
            return False
        self._metrics.stream_length.set(length)
        self._metrics.dead_letters.set(dead)
        # No group yet (no notifier ever started) reads as an error: nothing is pending.
        self._metrics.pending.set(0 if isinstance(pending, Exception)
                                  else int(pending.get("pending", 0)))
        return True

    async def __call__(self) -> Readiness:
        reasons: list[str] = []
        stopping = self._stopping()
        if stopping:
            reasons.append("stopping")
        try:
            redis_up = await asyncio.wait_for(self._read_streams(), self._timeout)
        except (*REDIS_ERRORS, TimeoutError):
            redis_up = False
        if not redis_up:
            reasons.append("redis_unreachable")
        return _record(self._metrics.health, reasons, redis_up=redis_up, draining=stopping)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``endpoint``, on the process's own loop."""

    def __init__(self, endpoint: Endpoint, registry: CollectorRegistry,
                 readiness: ReadinessCheck, sock: socket.socket | None = None) -> None:
        self._endpoint = endpoint
        # A worker's private socket, bound by the supervisor, which answers RELAY_METRICS_LISTEN
        # for all workers (relay/process/supervisor.py, relay/observe/supervisor_metrics.py).
        self._sock = sock
        self._registry = registry
        self._readiness = readiness
        app = web.Application()
        app.add_routes([web.get("/metrics", self._metrics), web.get("/healthz", self._healthz),
                        web.get("/readyz", self._readyz)])
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        """Raises OSError when the address cannot be bound."""
        await self._runner.setup()
        site: web.BaseSite = (
            web.SockSite(self._runner, self._sock) if self._sock is not None
            else web.TCPSite(self._runner, self._endpoint.host, self._endpoint.port))
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        host, port = self._runner.addresses[0][:2]
        # With workers, the socket is the private one of this worker's slot
        # (relay/process/supervisor.py).
        log.info("metrics.listening", listen=f"{host}:{port}",
                 **({"private": True} if self._sock is not None else {}))

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        found = await self._readiness()
        if found.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reasons": list(found.reasons)},
                                 status=503)

    async def _metrics(self, request: web.Request) -> web.Response:
        await self._readiness()
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self._registry),
                            headers={"Content-Type": content_type})
