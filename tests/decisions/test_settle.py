"""Commits and refunds that met Redis away are written once it is back (relay/decisions/settle.py,
Redis paused or gone), against a real redis-server killed and restarted on its port with its
append-only file, so what it acknowledged survives."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
import structlog
from structlog.testing import capture_logs

from relay.decisions.quota import QuotaStore, Settlement
from relay.decisions.settle import LateSettlements, PendingSettlement
from relay.errors import StoreUnavailableError
from relay.identity.accounts import AccountStore
from relay.store.client import connect_redis
from tests.conftest import PersistentRedis, wait_for

NOV = "2026-11"
PLANS: list[str | int] = ["free", 10]


@pytest.fixture
async def client(persistent_redis: PersistentRedis) -> AsyncIterator[aioredis.Redis]:
    redis_client = connect_redis(persistent_redis.url, timeout=0.5)
    yield redis_client
    await redis_client.aclose()


async def _user(client: aioredis.Redis) -> str:
    user = await AccountStore(client).add_user("agent@kw.test", plan="free", tz="UTC",
                                               password_hash=None)
    return user.id


def _pending(kind: str, user_id: str, txn_id: str, **extra: object) -> PendingSettlement:
    return PendingSettlement(kind, user_id, NOV, txn_id,  # type: ignore[arg-type]
                             structlog.get_logger().bind(txn_id=txn_id), **extra)


async def test_settle_commit_and_refund_are_written_once_redis_is_back(
        persistent_redis: PersistentRedis, client: aioredis.Redis) -> None:
    """Redis killed after the reservations: the commit (8 of 10 delivered, crossing 80 %)
    and the refund fail and wait; once Redis is back on its port both are written,
    in_flight is 0, the late commit's threshold notice runs, the gauge is back to 0."""
    quota = QuotaStore(client)
    user_id = await _user(client)
    await quota.reserve(user_id, NOV, "sent", list(range(1, 9)), PLANS)
    await quota.reserve(user_id, NOV, "refused", [1, 2], PLANS)
    persistent_redis.stop()
    with pytest.raises(StoreUnavailableError):
        await quota.commit(user_id, NOV, "sent", "command", PLANS, "80 90")
    committed: list[Settlement] = []

    async def notice(settlement: Settlement) -> None:
        committed.append(settlement)

    settlements = LateSettlements(quota, first_delay=0.01, max_delay=0.05)
    with capture_logs() as logs:
        settlements.add(_pending("commit", user_id, "sent", plan_limits=PLANS,
                                 thresholds="80 90", on_committed=notice))
        settlements.add(_pending("refund", user_id, "refused"))
        assert len(settlements) == 2
        await wait_for(lambda: sum(e["event"] == "quota.settlement_pending" for e in logs) == 2)
        persistent_redis.start()
        await wait_for(lambda: len(settlements) == 0, seconds=10)
    usage = await quota.usage(user_id, NOV)
    assert (usage.used, usage.delivered, usage.in_flight) == (8, 8, 0)
    assert [(s.units, s.delivered, s.crossed) for s in committed] == [(8, 8, 80)]
    late = [(e["kind"], e["units"]) for e in logs if e["event"] == "quota.settled_late"]
    assert late == [("commit", 8), ("refund", 2)]
    assert await settlements.close(1) == 0


async def test_settle_close_logs_what_it_could_not_write(
        persistent_redis: PersistentRedis, client: aioredis.Redis) -> None:
    """Stopping while Redis is still away: close tries for its time, then logs each
    settlement left as quota.unreconciled (the count stays high, never low) and says how
    many; the open reservation is still there for an operator."""
    quota = QuotaStore(client)
    user_id = await _user(client)
    await quota.reserve(user_id, NOV, "sent", [1], PLANS)
    persistent_redis.stop()
    settlements = LateSettlements(quota, first_delay=0.01, max_delay=0.05)
    with capture_logs() as logs:
        settlements.add(_pending("commit", user_id, "sent"))
        assert await settlements.close(0.2) == 1
    unreconciled = [e for e in logs if e["event"] == "quota.unreconciled"]
    assert [(e["reason"], e["txn_id"]) for e in unreconciled] == [("commit_failed", "sent")]
    assert unreconciled[0]["attempts"] >= 1
    persistent_redis.start()
    assert (await quota.usage(user_id, NOV)).in_flight == 1
