"""``serve --workers 2``'s metrics and health listener, answered by the supervisor for every
worker: real processes, real SMTP traffic, /metrics parsed with prometheus_client's own
parsers; a draining supervisor, a SIGKILLed worker and a stopped (SIGSTOP) one."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)

from relay.identity.accounts import AccountStore
from relay.observe.metrics import RelayMetrics
from relay.observe.supervisor_metrics import merge_families
from tests.conftest import RedisServer, add_user, wait_for
from tests.scraping import Scrape, get, readyz
from tests.serving import LineClient, ServeProcess, Start, body, relay_env, send_to

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
# The supervisor's own series (the rest are the workers').
SUPERVISOR = {"relay_workers_configured", "relay_workers_alive", "relay_worker_up",
              "relay_worker_restarts_total", "relay_worker_scrape_errors_total"}


class Serve:
    """A running ``serve --workers 2``: its SMTP port, its metrics port and its workers."""

    def __init__(self, process: ServeProcess, smtp: int, metrics: int,
                 workers: dict[int, int]) -> None:
        self.process = process
        self.smtp = smtp
        self.metrics = metrics
        self.workers = workers

    @classmethod
    async def start(cls, serve: Start, redis_url: str, state: Path) -> Serve:
        process = serve(relay_env(redis_url, state), "--workers", "2")
        [started] = await process.wait_event("supervisor.started")
        smtp = int(started["listen"]["listen"].rpartition(":")[2])
        metrics = int(started["listen"]["metrics_listen"].rpartition(":")[2])
        ready = await process.wait_event("worker.ready", count=2)
        return cls(process, smtp, metrics, {r["worker"]: r["pid"] for r in ready})

    async def scrape(self, accept: str = "") -> Scrape:
        status, content_type, text = await get(self.metrics, "/metrics", accept)
        assert status == 200, text
        return Scrape(text, content_type)


def workers_in(scrape: Scrape) -> set[str]:
    """The worker labels of the workers' own series (not the supervisor's)."""
    return {s.labels["worker"] for s in scrape.samples
            if s.name not in SUPERVISOR and "worker" in s.labels}


def delivered(scrape: Scrape, worker: str) -> float:
    return sum(s.value for s in scrape.samples if s.name == "relay_messages_total"
               and s.labels.get("outcome") == "delivered" and s.labels["worker"] == worker)


async def test_aggregate_sums_every_workers_counters(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        accounts: AccountStore, tmp_path: Path) -> None:
    """Messages sent through a 2-worker serve, some to each worker: the supervisor's
    /metrics has each worker's series under its `worker` label (equal to what that worker
    logged), and the delivered counter sums to the number sent across the label."""
    await add_user(accounts, limit=10_000)
    relay = await Serve.start(serve, redis_server.url, tmp_path / "state")
    sent = 0
    # Which worker accepts a connection is the kernel's choice: a batch goes to each worker
    # in turn while the other is stopped (SIGSTOP), so both deliver on every run.
    for other in (2, 1):
        os.kill(relay.workers[other], signal.SIGSTOP)
        try:
            results = await asyncio.gather(*(send_to(relay.smtp, f"r{sent + i}@example.test")
                                             for i in range(3)))
        finally:
            os.kill(relay.workers[other], signal.SIGCONT)
        assert results == [[250]] * 3
        sent += 3
    results = await asyncio.gather(*(send_to(relay.smtp, f"r{sent + i}@example.test")
                                     for i in range(6)))  # and both running
    assert results == [[250]] * 6
    sent += 6
    logged = await relay.process.wait_event("delivery.finished", count=sent,
                                            outcome="delivered")
    assert len(logged) == sent
    assert {r["worker"] for r in logged} == {1, 2}, "one worker took every connection"

    async def counted() -> bool:
        m = await relay.scrape()
        return m.value("relay_messages_total", outcome="delivered") == sent
    await wait_for(counted, 30)
    m = await relay.scrape()
    assert m.content_type.startswith("text/plain")
    for worker in ("1", "2"):
        assert delivered(m, worker) == len([r for r in logged if r["worker"] == int(worker)])
        assert m.value("relay_worker_up", worker=worker) == 1
        assert m.value("relay_build_info", worker=worker) == 1
        assert m.value("process_resident_memory_bytes", worker=worker) > 0
        assert m.value("relay_worker_scrape_errors_total", worker=worker) == 0
        assert m.value("relay_worker_restarts_total", worker=worker) == 0
    # The runtime's own figures (relay/observe/runtime.py), per worker: the loop-lag timer
    # fires every 50 ms in each, and the GC pauses have a series per generation.
    async def lag_sampled() -> bool:
        m = await relay.scrape()
        return all(m.value("relay_event_loop_lag_seconds_count", worker=w) > 0
                   for w in ("1", "2"))
    await wait_for(lag_sampled, 30)
    m = await relay.scrape()
    assert {(s.labels["worker"], s.labels["generation"]) for s in m.samples
            if s.name == "relay_gc_pause_seconds_count"} == \
        {(w, g) for w in ("1", "2") for g in ("0", "1", "2")}
    # Histograms too: every bucket, count and sum of a worker carries its label.
    assert m.value("relay_transaction_duration_seconds_count", outcome="delivered") == sent
    assert m.value("relay_transaction_duration_seconds_bucket", outcome="delivered",
                   le="+Inf") == sent
    assert m.value("relay_workers_configured") == 2 and m.value("relay_workers_alive") == 2
    # Every sample but the supervisor's few gauges is some worker's.
    unlabelled = {s.name for s in m.samples if "worker" not in s.labels}
    assert unlabelled == {"relay_workers_configured", "relay_workers_alive"}
    assert workers_in(m) == {"1", "2"}

    # OpenMetrics when asked, the same numbers.
    om = await relay.scrape(OPENMETRICS)
    assert om.content_type.startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")
    families = {f.name: f for f in parse_openmetrics(om.text)}
    assert sum(s.value for s in families["relay_messages"].samples
               if s.labels["outcome"] == "delivered") == sent
    assert families["relay_messages"].type == "counter"
    assert families["relay_transaction_duration_seconds"].type == "histogram"

    status, _, text = await get(relay.metrics, "/healthz")
    assert (status, text) == (200, '{"status": "alive"}')
    relay.process.signal(signal.SIGTERM)
    assert await relay.process.wait_exit() == 0


async def test_aggregate_readyz_then_503_while_draining(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        accounts: AccountStore, tmp_path: Path) -> None:
    """/readyz is 200 while both workers are ready, 503 "draining" from the supervisor's
    SIGTERM on (a transaction held open keeps the drain going), while /healthz and /metrics
    still answer; the held transaction still delivers and everything exits 0."""
    await add_user(accounts)
    relay = await Serve.start(serve, redis_server.url, tmp_path / "state")

    async def ready() -> bool:
        return (await readyz(relay.metrics))[0] == 200
    await wait_for(ready, 30)
    assert await readyz(relay.metrics) == (200, {"status": "ready", "workers": {
        "1": {"status": "ready"}, "2": {"status": "ready"}}})

    client = await LineClient.connect(relay.smtp)
    await client.login()
    await client.open_transaction()
    relay.process.signal(signal.SIGTERM)
    await relay.process.wait_event("supervisor.stopping")
    assert await readyz(relay.metrics) == (503, {"status": "not ready",
                                                 "reasons": ["draining"]})
    assert relay.process.process.poll() is None
    assert (await get(relay.metrics, "/healthz"))[0] == 200

    async def draining() -> bool:  # the worker holding the transaction drains
        return (await relay.scrape()).value("relay_draining") >= 1
    await wait_for(draining, 30)

    assert (await client.command("DATA"))[0] == 354
    await client.send(body("Delivered while draining") + b".\r\n")
    assert (await client.reply())[0] == 250
    await client.until_closed()
    assert await relay.process.wait_exit() == 0


async def test_aggregate_leaves_out_a_killed_worker_until_it_is_back(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        accounts: AccountStore, tmp_path: Path) -> None:
    """A SIGKILLed worker's series leave the scrape (relay_worker_up 0, one alive) and come
    back, from zero, once the supervisor restarted it; the restart is counted."""
    await add_user(accounts)
    relay = await Serve.start(serve, redis_server.url, tmp_path / "state")
    assert workers_in(await relay.scrape()) == {"1", "2"}

    os.kill(relay.workers[1], signal.SIGKILL)
    await relay.process.wait_event("worker.died", worker=1)

    async def left_out() -> bool:
        m = await relay.scrape()
        return workers_in(m) == {"2"} and m.value("relay_worker_up", worker="1") == 0
    await wait_for(left_out, 30)

    await relay.process.wait_event("worker.ready", count=2, worker=1)

    async def back() -> bool:
        return workers_in(await relay.scrape()) == {"1", "2"}
    await wait_for(back, 30)
    m = await relay.scrape()
    assert m.value("relay_worker_restarts_total", worker="1") == 1
    assert m.value("relay_worker_restarts_total", worker="2") == 0
    assert m.value("relay_workers_alive") == 2
    assert m.value("relay_worker_up", worker="1") == 1
    assert await readyz(relay.metrics) == (200, {"status": "ready", "workers": {
        "1": {"status": "ready"}, "2": {"status": "ready"}}})
    relay.process.signal(signal.SIGTERM)
    assert await relay.process.wait_exit() == 0


async def test_aggregate_counts_a_worker_that_does_not_answer(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        tmp_path: Path) -> None:
    """A worker that is alive but does not answer (stopped with SIGSTOP) is left out of the
    scrape after the timeout and counted; /readyz says which; SIGCONT brings it back."""
    relay = await Serve.start(serve, redis_server.url, tmp_path / "state")
    os.kill(relay.workers[2], signal.SIGSTOP)
    try:
        m = await relay.scrape()
        assert workers_in(m) == {"1"}
        assert m.value("relay_worker_scrape_errors_total", worker="2") == 1
        assert m.value("relay_worker_scrape_errors_total", worker="1") == 0
        assert m.value("relay_worker_up", worker="2") == 0
        assert m.value("relay_workers_alive") == 2
        [unanswered] = await relay.process.wait_event("metrics.worker_unanswered")
        assert unanswered["worker"] == 2 and unanswered["level"] == "warning"
        status, answer = await readyz(relay.metrics)
        assert (status, answer["reasons"]) == (503, ["worker_no_answer"])
        assert answer["workers"]["1"] == {"status": "ready"}
        assert answer["workers"]["2"]["status"] == "no answer"
    finally:
        os.kill(relay.workers[2], signal.SIGCONT)

    async def back() -> bool:
        return workers_in(await relay.scrape()) == {"1", "2"}
    await wait_for(back, 30)
    assert (await readyz(relay.metrics))[0] == 200
    relay.process.signal(signal.SIGTERM)
    assert await relay.process.wait_exit() == 0


async def test_aggregate_readyz_reports_each_workers_reasons(
        serve: Start, tmp_path: Path) -> None:
    """With Redis stopped the workers answer 503 themselves: the supervisor's /readyz is 503
    "worker_not_ready" with every worker's own reasons; 200 again once Redis is back."""
    own = RedisServer(tmp_path / "own-redis")
    own.start()
    try:
        relay = await Serve.start(serve, own.url, tmp_path / "state")

        async def ready() -> bool:
            return (await readyz(relay.metrics))[0] == 200
        await wait_for(ready, 30)
        own.stop()

        async def unready() -> bool:
            return (await readyz(relay.metrics))[0] == 503
        await wait_for(unready, 30)
        status, answer = await readyz(relay.metrics)
        assert (status, answer["status"]) == (503, "not ready")
        assert answer["reasons"] == ["worker_not_ready"]
        for worker in ("1", "2"):
            assert answer["workers"][worker]["status"] == "not ready"
            assert "redis_unreachable" in answer["workers"][worker]["reasons"]
        m = await relay.scrape()
        assert m.value("relay_redis_up", worker="1") == 0
        assert m.value("relay_redis_up", worker="2") == 0

        own.start()
        await wait_for(ready, 30)
        relay.process.signal(signal.SIGTERM)
        assert await relay.process.wait_exit() == 0
    finally:
        own.stop()


def test_aggregate_merge_keeps_each_family_whole() -> None:
    """Two processes' registries merge into one family per name, every sample labelled with
    its worker, and the result renders as valid OpenMetrics that parses back the same."""
    first, second = RelayMetrics(), RelayMetrics()
    first.messages("delivered", "command").inc(3)
    second.messages("delivered", "command").inc(4)
    second.transaction_seconds("delivered").observe(0.2)
    parts = [(name, list(parse_openmetrics(openmetrics_latest(m.registry).decode())))
             for name, m in (("1", first), ("2", second))]
    merged = merge_families(parts)
    names = [f.name for f in merged]
    assert len(names) == len(set(names)) == len(parts[0][1])

    class Families:
        def collect(self) -> Any:
            return merged

    text = openmetrics_latest(Families()).decode()  # type: ignore[arg-type]
    again = {f.name: f for f in parse_openmetrics(text)}
    delivered_by = {s.labels["worker"]: s.value for s in again["relay_messages"].samples
                    if s.labels == {"outcome": "delivered", "route": "command",
                                    "worker": s.labels["worker"]}}
    assert delivered_by == {"1": 3.0, "2": 4.0}
    counts = {s.labels["worker"]: s.value
              for s in again["relay_transaction_duration_seconds"].samples
              if s.name.endswith("_count") and s.labels["outcome"] == "delivered"}
    assert counts == {"1": 0.0, "2": 1.0}
    assert all("worker" in s.labels for f in again.values() for s in f.samples)
