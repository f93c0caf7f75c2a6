"""The metrics and health listener of ``serve --workers N`` (STYLE §1 step 9): the supervisor
answers ``/metrics``, ``/healthz`` and ``/readyz`` on ``RELAY_METRICS_LISTEN`` for the whole
``serve``, so a scrape or a probe never depends on which worker the kernel would have picked.

Each worker serves its own registry (relay/observe/health.py's ``MetricsServer``) on a private
loopback socket that the supervisor bound for its slot and hands it like the SMTP sockets
(relay/process/supervisor.py); the slot keeps its port across restarts. Here:

* ``/metrics``: every *serving* worker (one that said it serves and has not exited) is asked
  for its exposition at once, in OpenMetrics, with ``SCRAPE_TIMEOUT``; each answer is parsed
  with prometheus_client's own parser, every sample gets ``worker="<slot>"``, and the union
  of the families is rendered with the supervisor's own (``relay_workers_*``,
  ``relay_worker_*``) in the format the scraper asked for (OpenMetrics or text, as
  health.py). A worker that does not answer in time, or answers badly, is left out of that
  scrape and counted (``relay_worker_scrape_errors_total``, ``relay_worker_up`` 0). Counters
  and histograms stay correct: ``sum without (worker)`` is the serve's total, and a restarted
  worker's series restart from 0 like any restarted process's (``rate()`` handles it).
* ``/healthz``: 200 while the supervisor runs (it restarts dead workers itself).
* ``/readyz``: 503 ``draining`` from the supervisor's SIGTERM on, without asking anyone; 503
  ``no_worker_serving`` while no worker serves; otherwise every serving worker's own
  ``/readyz`` is asked at once (``READY_TIMEOUT``), and the answer is 200 only if all of them
  answer 200 (``worker_not_ready``, ``worker_no_answer`` otherwise). Workers that are starting
  or waiting to be restarted are not asked and do not count against readiness: they accept no
  connection, and the shared listening socket sends every connection to a serving one. The
  body names each worker's state (``serving`` workers with what they answered).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from relay.observe.metrics import SupervisorMetrics

log = structlog.get_logger()

# What the supervisor waits for a worker. A worker's own checks take at most a second (its
# Redis PING, relay/observe/health.py's PING_TIMEOUT); the prober's timeout must be longer than
# READY_TIMEOUT (the Kubernetes manifest gives /readyz 3 s), Prometheus's scrape timeout
# (10 s by default) longer than SCRAPE_TIMEOUT.
SCRAPE_TIMEOUT = 3.0
READY_TIMEOUT = 2.0
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
WORKER_LABEL = "worker"

SlotState = Literal["serving", "starting", "down"]


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """One worker slot as the supervisor sees it now: ``serving`` (said it serves, not yet
    exited), ``starting`` (a process that has not said so yet) or ``down`` (no process:
    waiting out its restart delay, or stopped). ``port``: its private metrics listener."""

    index: int
    state: SlotState
    port: int


class WorkerPool(Protocol):
    """What the listener needs of the supervisor (relay/process/supervisor.py's ``Supervisor``)."""

    @property
    def draining(self) -> bool: ...

    def slots(self) -> list[WorkerSlot]: ...


class _Families(Collector):
    """A collector of families already made (the merged scrape)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_families(parts: Iterable[tuple[str, Iterable[Metric]]]) -> list[Metric]:
    """The union of several processes' families, each sample labelled ``worker=<name>``.
    Families of one name become one (their samples in the order given, one process's after
    another's), so the exposition stays valid; a family whose type differs from the first
    seen under that name (never between workers of one build) is dropped."""
    merged: dict[str, Metric] = {}
    for worker, families in parts:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation,
                                                    family.type, family.unit)
            elif into.type != family.type:
                log.warning("metrics.family_mismatch", family=family.name, worker=worker,
                            type=family.type, expected=into.type)
                continue
            into.samples.extend(_labelled(sample, worker) for sample in family.samples)
    return list(merged.values())


def _labelled(sample: Sample, worker: str) -> Sample:
    return sample._replace(labels={**sample.labels, WORKER_LABEL: worker})


class WorkerAnswerError(Exception):
    """A worker's listener answered, but not with what was asked."""


class SupervisorMetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` for every worker, on a socket the
    supervisor bound (``RELAY_METRICS_LISTEN``)."""

    def __init__(self, sock: socket.socket, pool: WorkerPool,
                 metrics: SupervisorMetrics) -> None:
        self._sock = sock
        self._pool = pool
        self._metrics = metrics
        self._http: aiohttp.ClientSession | None = None
        app = web.Application()
        app.add_routes([web.get("/metrics", self._scrape), web.get("/healthz", self._healthz),
                        web.get("/readyz", self._readyz)])
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        # No proxy, whatever the environment says: the workers are on loopback. A new
        # connection per request: a kept-alive one to a worker that was since restarted
        # would fail the next scrape of the new one for nothing.
        self._http = aiohttp.ClientSession(
            trust_env=False, connector=aiohttp.TCPConnector(force_close=True))
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()
        host, port = self._sock.getsockname()[:2]
        log.info("metrics.listening", listen=f"{host}:{port}", aggregates="workers")

    async def stop(self) -> None:
        await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    # -- asking the workers ----------------------------------------------------------------
    async def _ask(self, slot: WorkerSlot, path: str, seconds: float,
                   accept: str = "") -> tuple[int, str]:
        assert self._http is not None
        async with self._http.get(f"http://127.0.0.1:{slot.port}{path}",
                                  headers={"Accept": accept} if accept else {},
                                  timeout=aiohttp.ClientTimeout(total=seconds)) as response:
            return response.status, await response.text()

    async def _worker_families(self, slot: WorkerSlot) -> list[Metric] | None:
        """The worker's families, or None (logged and counted) when it cannot be had."""
        try:
            status, text = await self._ask(slot, "/metrics", SCRAPE_TIMEOUT, OPENMETRICS)
            if status != 200:
                raise WorkerAnswerError(f"/metrics answered {status}")
            return list(text_string_to_metric_families(text))  # type: ignore[no-untyped-call]
        except (aiohttp.ClientError, TimeoutError, WorkerAnswerError, ValueError) as exc:
            self._metrics.scrape_errors(str(slot.index)).inc()
            log.warning("metrics.worker_unanswered", worker=slot.index, port=slot.port,
                        error=str(exc) or type(exc).__name__)
            return None

    async def _worker_readiness(self, slot: WorkerSlot) -> dict[str, Any]:
        try:
            status, text = await self._ask(slot, "/readyz", READY_TIMEOUT)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return {"status": "no answer", "error": str(exc) or type(exc).__name__}
        if status == 200:
            return {"status": "ready"}
        try:
            reasons = list(_json(text).get("reasons", []))
        except ValueError:
            reasons = []
        return {"status": "not ready", "http_status": status, "reasons": reasons}

    # -- the endpoints ---------------------------------------------------------------------
    async def _scrape(self, request: web.Request) -> web.Response:
        slots = self._pool.slots()
        serving = [slot for slot in slots if slot.state == "serving"]
        found = await asyncio.gather(*(self._worker_families(slot) for slot in serving))
        answered = {slot.index: families for slot, families in zip(serving, found, strict=True)
                    if families is not None}
        self._metrics.alive.set(sum(slot.state != "down" for slot in slots))
        for slot in slots:
            self._metrics.worker_up(str(slot.index)).set(slot.index in answered)
        families = [*self._metrics.registry.collect(),
                    *merge_families((str(index), families)
                                    for index, families in sorted(answered.items()))]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(families))
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._pool.draining:
            return web.json_response({"status": "not ready", "reasons": ["draining"]},
                                     status=503)
        slots = self._pool.slots()
        serving = [slot for slot in slots if slot.state == "serving"]
        answers = await asyncio.gather(*(self._worker_readiness(slot) for slot in serving))
        workers: dict[str, dict[str, Any]] = {str(slot.index): {"status": slot.state}
                                             for slot in slots}
        workers.update((str(slot.index), answer)
                       for slot, answer in zip(serving, answers, strict=True))
        reasons = []
        if not serving:
            reasons.append("no_worker_serving")
        if any(a["status"] == "not ready" for a in answers):
            reasons.append("worker_not_ready")
        if any(a["status"] == "no answer" for a in answers):
            reasons.append("worker_no_answer")
        if reasons:
            return web.json_response({"status": "not ready", "reasons": reasons,
                                      "workers": workers}, status=503)
        return web.json_response({"status": "ready", "workers": workers})


def _json(text: str) -> dict[str, Any]:
    loaded = json.loads(text)
    if not isinstance(loaded, dict):
        raise ValueError("not a JSON object")
    return loaded
