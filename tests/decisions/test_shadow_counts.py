"""relay/decisions/shadow_counts.py on a real redis-server: the differences counted per
day, kind and app in the background, the examples kept, and what happens when Redis is away
or the queue is full (the counts are dropped, never the SMTP reply)."""

from __future__ import annotations

import redis.asyncio as aioredis
from structlog.testing import capture_logs

from relay.decisions.shadow_counts import (
    COUNTS_TTL_SECONDS,
    EXAMPLES_KEPT,
    Counted,
    ShadowCounts,
)
from relay.observe.metrics import RelayMetrics
from relay.store import keys
from relay.store.client import connect_redis
from tests.conftest import free_port

DAY = "2026-11-15"


def counted(kind: str = "route", app: str = "campaigns", n: int = 0,
            day: str = DAY) -> Counted:
    return Counted(day, kind, app, {"kind": kind, "app": app, "n": n})


def uncounted(metrics: RelayMetrics) -> float:
    value = metrics.registry.get_sample_value("relay_shadow_uncounted_total")
    assert value is not None
    return value


async def test_shadow_counts_by_day_kind_and_app(redis_client: aioredis.Redis) -> None:
    """Counts add up per kind and per app and kind; the latest examples are kept per kind,
    newest first, at most EXAMPLES_KEPT; the keys expire by themselves."""
    counts = ShadowCounts(redis_client)
    for n in range(EXAMPLES_KEPT + 5):
        counts.add(counted(n=n))
    counts.add(counted("refusal", "direct", n=100))
    counts.add(counted("route", "direct", n=101))
    counts.add(counted("notice", "smartplans", n=102, day="2026-11-14"))
    await counts.idle()
    assert len(counts) == 0
    [yesterday, today] = await counts.read(["2026-11-14", DAY])
    assert today.by_kind == {"route": EXAMPLES_KEPT + 6, "refusal": 1}
    assert today.by_app == {"campaigns": {"route": EXAMPLES_KEPT + 5},
                            "direct": {"refusal": 1, "route": 1}}
    routes = today.examples["route"]
    assert len(routes) == EXAMPLES_KEPT
    assert [e["n"] for e in routes[:3]] == [101, EXAMPLES_KEPT + 4, EXAMPLES_KEPT + 3]
    assert today.examples["refusal"] == [{"kind": "refusal", "app": "direct", "n": 100}]
    assert "notice" not in today.examples
    assert yesterday.by_kind == {"notice": 1}
    assert yesterday.by_app == {"smartplans": {"notice": 1}}
    for key in (keys.shadow_counts(DAY), keys.shadow_examples(DAY, "route")):
        assert 0 < await redis_client.ttl(key) <= COUNTS_TTL_SECONDS
    [empty] = await counts.read(["2026-10-01"])
    assert (empty.by_kind, empty.by_app, empty.examples) == ({}, {}, {})


async def test_shadow_counts_redis_away_drops_the_counts() -> None:
    """With Redis unreachable the batch is dropped, logged and counted as uncounted; add()
    itself never raises."""
    metrics = RelayMetrics()
    unreachable = connect_redis(f"redis://127.0.0.1:{free_port()}/0", timeout=1)
    try:
        counts = ShadowCounts(unreachable, metrics, retry_delay=0)
        with capture_logs() as logs:
            counts.add(counted())
            counts.add(counted("notice"))
            await counts.idle()
    finally:
        await unreachable.aclose()
    assert uncounted(metrics) == 2
    [failed] = [e for e in logs if e["event"] == "shadow.count_failed"]
    assert failed["differences"] == 2


async def test_shadow_counts_full_queue_drops_the_newest(redis_client: aioredis.Redis) -> None:
    """Past max_pending a difference is not queued (logged once, counted as uncounted); the
    queued ones are still written."""
    metrics = RelayMetrics()
    counts = ShadowCounts(redis_client, metrics, max_pending=2)
    with capture_logs() as logs:
        for n in range(4):
            counts.add(counted(n=n))
    assert len(counts) == 2
    assert uncounted(metrics) == 2
    assert [e["event"] for e in logs] == ["shadow.count_queue_full"]
    await counts.idle()
    [today] = await counts.read([DAY])
    assert today.by_kind == {"route": 2}


async def test_shadow_counts_close_writes_what_is_queued(redis_client: aioredis.Redis) -> None:
    counts = ShadowCounts(redis_client)
    counts.add(counted())
    await counts.close(5)
    [today] = await counts.read([DAY])
    assert today.by_kind == {"route": 1}
