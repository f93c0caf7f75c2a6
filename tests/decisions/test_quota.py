"""relay.quota: reserve, commit, refund and usage against a real redis-server."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest
import redis.asyncio as aioredis

from relay.config.policies import load_policies
from relay.decisions.quota import (
    RESERVATION_TTL_SECONDS,
    USAGE_TTL_SECONDS,
    QuotaStore,
    RecordedTerms,
    Reservation,
    ReserveStatus,
    Settlement,
    Usage,
    refusal_for,
)
from relay.errors import (
    PlanMisconfiguredError,
    QuotaExceededError,
    RelayError,
    StoreUnavailableError,
    UnknownSenderError,
    UserDisabledError,
)
from relay.identity.accounts import DISABLED, AccountStore
from relay.store import keys
from relay.store.client import connect_redis
from tests.conftest import POLICIES, RedisServer

NOV = "2026-11"
DEC = "2026-12"
PLANS: list[str | int] = ["free", 3, "pro", 10]
UID = "u-test"
# The terms reserve.lua records in the month's usage hash (docs/plans.md, "History").
FREE_TERMS = RecordedTerms("free", None, 3)
PRO_TERMS = RecordedTerms("pro", None, 10)


@pytest.fixture
def quota(redis_client: aioredis.Redis) -> QuotaStore:
    return QuotaStore(redis_client)


async def make_user(redis_client: aioredis.Redis, *, plan: str = "free",
                    custom_limit: int | None = None, user_id: str = UID,
                    email: str = "agent@kw.test") -> str:
    user = await AccountStore(redis_client).add_user(
        email, plan=plan, tz="UTC", password_hash=None, custom_limit=custom_limit,
        user_id=user_id)
    return user.id


async def set_used(redis_client: aioredis.Redis, period: str, used: int) -> None:
    await redis_client.hset(keys.usage(UID, period), "used", used)


# -- reserve: the cases table --------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    expected: Reservation
    used_after: int
    plan: str = "free"
    custom_limit: int | None = None
    used_before: int = 0
    disabled: bool = False
    exists: bool = True


CASES = [
    Case("under limit", Reservation(ReserveStatus.RESERVED, 1, 3), used_after=1),
    Case("last unit", Reservation(ReserveStatus.RESERVED, 3, 3), used_after=3, used_before=2),
    Case("at limit", Reservation(ReserveStatus.OVER_LIMIT, 3, 3), used_after=3, used_before=3),
    Case("over limit after a plan cut", Reservation(ReserveStatus.OVER_LIMIT, 7, 3),
         used_after=7, used_before=7),
    Case("other plan", Reservation(ReserveStatus.RESERVED, 4, 10), used_after=4, plan="pro",
         used_before=3),
    Case("custom limit above plan", Reservation(ReserveStatus.RESERVED, 5, 5), used_after=5,
         custom_limit=5, used_before=4),
    Case("custom limit below plan", Reservation(ReserveStatus.OVER_LIMIT, 2, 2), used_after=2,
         custom_limit=2, used_before=2),
    Case("custom limit with unknown plan", Reservation(ReserveStatus.RESERVED, 1, 4),
         used_after=1, plan="gold", custom_limit=4),
    Case("unknown plan", Reservation(ReserveStatus.UNKNOWN_PLAN, 0, 0), used_after=0,
         plan="gold"),
    Case("disabled user", Reservation(ReserveStatus.USER_DISABLED, 0, 0), used_after=1,
         used_before=1, disabled=True),
    Case("missing user", Reservation(ReserveStatus.USER_MISSING, 0, 0), used_after=0,
         exists=False),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_quota_reserve_cases(redis_client: aioredis.Redis, quota: QuotaStore,
                                   case: Case) -> None:
    """reserve() answers each situation with the right status, count and limit, and takes a
    unit only when it answers RESERVED."""
    if case.exists:
        await make_user(redis_client, plan=case.plan, custom_limit=case.custom_limit)
    if case.disabled:
        await AccountStore(redis_client).set_user_status(UID, DISABLED)
    if case.used_before:
        await set_used(redis_client, NOV, case.used_before)
    result = await quota.reserve(UID, NOV, "txn1", 1, PLANS)
    assert result == case.expected
    assert (await quota.usage(UID, NOV)).used == case.used_after
    reserved = await redis_client.hgetall(keys.reservations(UID, "txn1"))
    assert reserved == ({"1": "1"} if case.expected.status is ReserveStatus.RESERVED else {})


async def test_quota_reserve_same_recipient_twice_counts_once(redis_client: aioredis.Redis,
                                                              quota: QuotaStore) -> None:
    """Reserving the same (txn, rcpt_no) again is ALREADY_RESERVED and takes nothing."""
    await make_user(redis_client)
    first = await quota.reserve(UID, NOV, "txn1", 1, PLANS)
    again = await quota.reserve(UID, NOV, "txn1", 1, PLANS)
    assert first == Reservation(ReserveStatus.RESERVED, 1, 3)
    assert again == Reservation(ReserveStatus.ALREADY_RESERVED, 1, 3)
    assert (await quota.usage(UID, NOV)).used == 1
    # A different recipient of the same transaction, or the same number in another
    # transaction, is a new unit.
    assert (await quota.reserve(UID, NOV, "txn1", 2, PLANS)).status is ReserveStatus.RESERVED
    assert (await quota.reserve(UID, NOV, "txn2", 1, PLANS)).status is ReserveStatus.RESERVED
    assert (await quota.usage(UID, NOV)).used == 3


async def test_quota_reserve_already_reserved_at_limit(redis_client: aioredis.Redis,
                                                       quota: QuotaStore) -> None:
    """A retry of a unit already held is ALREADY_RESERVED even when the month is now full."""
    await make_user(redis_client)
    for rcpt_no in (1, 2, 3):
        assert (await quota.reserve(UID, NOV, "t", rcpt_no, PLANS)).status is \
            ReserveStatus.RESERVED
    assert await quota.reserve(UID, NOV, "t", 3, PLANS) == Reservation(
        ReserveStatus.ALREADY_RESERVED, 3, 3)
    assert await quota.reserve(UID, NOV, "t", 4, PLANS) == Reservation(
        ReserveStatus.OVER_LIMIT, 3, 3)


# -- commit and refund ---------------------------------------------------------------------------
async def reserve_n(quota: QuotaStore, txn: str, count: int, period: str = NOV) -> None:
    for rcpt_no in range(1, count + 1):
        result = await quota.reserve(UID, period, txn, rcpt_no, PLANS)
        assert result.status is ReserveStatus.RESERVED


async def test_quota_commit_is_idempotent(redis_client: aioredis.Redis,
                                          quota: QuotaStore) -> None:
    """A commit makes the open units delivered once; a second commit changes nothing."""
    await make_user(redis_client)
    await reserve_n(quota, "txn1", 2)
    assert await quota.commit(UID, NOV, "txn1") == Settlement(units=2, used=2, delivered=2)
    assert await quota.commit(UID, NOV, "txn1") == Settlement(units=0, used=2, delivered=2)
    assert await quota.usage(UID, NOV) == Usage(used=2, delivered=2, routes={"command": 2},
                                                terms=FREE_TERMS)
    assert not await redis_client.exists(keys.reservations(UID, "txn1"))


async def test_quota_commit_makes_only_the_delivered_numbers_final(
        redis_client: aioredis.Redis, quota: QuotaStore) -> None:
    """Three units reserved, recipients 1 and 3 delivered: the commit makes those final and
    gives back 2 (never sent: a reservation whose reply was lost, a refund still queued) in
    the same step; a repeat commits and gives back nothing."""
    await make_user(redis_client, plan="pro")
    await reserve_n(quota, "txn1", 3)
    assert await quota.commit(UID, NOV, "txn1", "command", PLANS, "", [1, 3]) == Settlement(
        units=2, used=2, delivered=2, limit=10, released=1)
    assert await quota.commit(UID, NOV, "txn1", "command", PLANS, "", [1, 3]) == Settlement(
        units=0, used=2, delivered=2, limit=10)
    assert await quota.usage(UID, NOV) == Usage(used=2, delivered=2, routes={"command": 2},
                                                terms=PRO_TERMS)
    assert not await redis_client.exists(keys.reservations(UID, "txn1"))


THRESHOLDS = "80 90 100"


async def test_quota_thresholds_are_crossed_by_delivered_sends(
        redis_client: aioredis.Redis, quota: QuotaStore) -> None:
    """Limit 10: eight units reserved and refunded cross nothing (a notice would name sends
    that never happened); the commit that makes the 8th delivered crosses 80 %, naming 8,
    once; a repeat commit crosses nothing."""
    await make_user(redis_client, plan="pro")
    await reserve_n(quota, "refused", 8)
    await quota.refund(UID, NOV, "refused")
    await reserve_n(quota, "sent", 7)
    seven = await quota.commit(UID, NOV, "sent", "command", PLANS, THRESHOLDS)
    assert (seven.delivered, seven.limit, seven.crossed) == (7, 10, 0)
    await reserve_n(quota, "eighth", 1)
    await reserve_n(quota, "open", 2)  # reserved, not delivered: does not count for 90 %
    eighth = await quota.commit(UID, NOV, "eighth", "command", PLANS, THRESHOLDS)
    assert eighth == Settlement(units=1, used=10, delivered=8, limit=10, crossed=80)
    again = await quota.commit(UID, NOV, "eighth", "command", PLANS, THRESHOLDS)
    assert (again.units, again.crossed) == (0, 0)
    assert (await quota.usage(UID, NOV)).notified == {10: (80,)}
    assert await redis_client.hget(keys.usage(UID, NOV), "n:10:80") == "8"


async def test_quota_threshold_crossings_are_exactly_once_under_concurrent_commits(
        redis_client: aioredis.Redis, quota: QuotaStore, redis_server: RedisServer) -> None:
    """Ten one-unit transactions committed at once from three clients: 80, 90 and 100 %
    are each crossed by exactly one commit, each naming the delivered count it made."""
    await make_user(redis_client, plan="pro")
    for txn in range(10):
        await reserve_n(quota, f"t{txn}", 1)
    clients = [connect_redis(redis_server.url, timeout=2) for _ in range(3)]
    try:
        stores = [QuotaStore(c) for c in clients]
        settled = await asyncio.gather(*(
            stores[t % 3].commit(UID, NOV, f"t{t}", "command", PLANS, THRESHOLDS)
            for t in range(10)))
    finally:
        for c in clients:
            await c.aclose()
    crossings = sorted((s.crossed, s.delivered) for s in settled if s.crossed)
    assert crossings == [(80, 8), (90, 9), (100, 10)]


async def test_quota_refund_after_commit_refunds_nothing(redis_client: aioredis.Redis,
                                                         quota: QuotaStore) -> None:
    """Delivered units are never refunded, whole or by recipient number."""
    await make_user(redis_client)
    await reserve_n(quota, "txn1", 2)
    await quota.commit(UID, NOV, "txn1")
    assert await quota.refund(UID, NOV, "txn1") == Settlement(units=0, used=2)
    assert await quota.refund(UID, NOV, "txn1", [1, 2]) == Settlement(units=0, used=2)
    assert await quota.usage(UID, NOV) == Usage(used=2, delivered=2, routes={"command": 2},
                                                terms=FREE_TERMS)


async def test_quota_refund_specific_recipients(redis_client: aioredis.Redis,
                                                quota: QuotaStore) -> None:
    """Refunding recipient numbers gives back exactly those open units, each once."""
    await make_user(redis_client)
    await reserve_n(quota, "txn1", 3)
    assert await quota.refund(UID, NOV, "txn1", [2]) == Settlement(units=1, used=2)
    assert await quota.refund(UID, NOV, "txn1", [2]) == Settlement(units=0, used=2)
    assert await quota.refund(UID, NOV, "txn1", [9]) == Settlement(units=0, used=2)
    assert await quota.refund(UID, NOV, "txn1", [3, 3]) == Settlement(units=1, used=1)
    # What is left (recipient 1) is committed as delivered.
    assert await quota.commit(UID, NOV, "txn1") == Settlement(units=1, used=1, delivered=1)
    assert await quota.usage(UID, NOV) == Usage(used=1, delivered=1, routes={"command": 1},
                                                terms=FREE_TERMS)


async def test_quota_refund_all_is_idempotent(redis_client: aioredis.Redis,
                                              quota: QuotaStore) -> None:
    """Refunding a whole transaction gives back every open unit once, and only its own."""
    await make_user(redis_client, plan="pro")
    await reserve_n(quota, "txn1", 3)
    await reserve_n(quota, "other", 1)
    assert await quota.refund(UID, NOV, "txn1") == Settlement(units=3, used=1)
    assert await quota.refund(UID, NOV, "txn1") == Settlement(units=0, used=1)
    assert await quota.usage(UID, NOV) == Usage(used=1, delivered=0, terms=PRO_TERMS)
    # The freed units can be taken again.
    await reserve_n(quota, "txn2", 2)


async def test_quota_refund_empty_list_refunds_nothing(redis_client: aioredis.Redis,
                                                       quota: QuotaStore) -> None:
    """refund(rcpt_nos=[]) gives back nothing; only None means every open unit."""
    await make_user(redis_client)
    await reserve_n(quota, "txn1", 2)
    assert await quota.refund(UID, NOV, "txn1", []) == Settlement(units=0, used=2)
    assert await redis_client.hlen(keys.reservations(UID, "txn1")) == 2


async def test_quota_refund_never_below_zero(redis_client: aioredis.Redis,
                                             quota: QuotaStore) -> None:
    """If an operator lowered the count meanwhile, a refund stops at zero."""
    await make_user(redis_client)
    await reserve_n(quota, "txn1", 2)
    await set_used(redis_client, NOV, 1)
    settlement = await quota.refund(UID, NOV, "txn1")
    assert settlement.used == 0
    assert (await quota.usage(UID, NOV)).used == 0
    await set_used(redis_client, NOV, 0)
    await reserve_n(quota, "txn2", 1)
    await redis_client.delete(keys.usage(UID, NOV))
    assert (await quota.refund(UID, NOV, "txn2")).used == 0
    assert (await quota.usage(UID, NOV)).used == 0


async def test_quota_refund_unknown_transaction(redis_client: aioredis.Redis,
                                                quota: QuotaStore) -> None:
    """Refunding or committing a transaction that reserved nothing changes nothing."""
    await make_user(redis_client)
    await reserve_n(quota, "txn1", 1)
    assert await quota.refund(UID, NOV, "nope") == Settlement(units=0, used=1)
    assert await quota.commit(UID, NOV, "nope") == Settlement(units=0, used=1)
    assert await quota.usage(UID, NOV) == Usage(used=1, delivered=0, terms=FREE_TERMS)


# -- usage ---------------------------------------------------------------------------------------
async def test_quota_usage_used_delivered_in_flight(redis_client: aioredis.Redis,
                                                    quota: QuotaStore) -> None:
    """used counts reserved and delivered units, delivered the committed ones, in_flight the
    difference."""
    await make_user(redis_client, plan="pro")
    await reserve_n(quota, "a", 3)
    await quota.commit(UID, NOV, "a")
    await reserve_n(quota, "b", 2)
    usage = await quota.usage(UID, NOV)
    assert usage == Usage(used=5, delivered=3, routes={"command": 3}, terms=PRO_TERMS)
    assert usage.in_flight == 2


async def test_quota_usage_of_empty_month_is_zero(quota: QuotaStore) -> None:
    """A month nobody sent in reads as zero."""
    usage = await quota.usage("u-nobody", NOV)
    assert (usage.used, usage.delivered, usage.in_flight) == (0, 0, 0)


def test_usage_in_flight_never_negative() -> None:
    """in_flight is never negative, even if delivered exceeds used after a manual fix."""
    assert Usage(used=1, delivered=3).in_flight == 0


# -- months and expiry ---------------------------------------------------------------------------
async def test_quota_months_are_separate_keys(redis_client: aioredis.Redis,
                                              quota: QuotaStore) -> None:
    """A full November does not limit December: each month is its own key starting at 0."""
    await make_user(redis_client)
    await reserve_n(quota, "nov", 3, NOV)
    assert (await quota.reserve(UID, NOV, "nov", 4, PLANS)).status is ReserveStatus.OVER_LIMIT
    december = await quota.reserve(UID, DEC, "dec", 1, PLANS)
    assert december == Reservation(ReserveStatus.RESERVED, 1, 3)
    assert (await quota.usage(UID, NOV)).used == 3
    assert (await quota.usage(UID, DEC)).used == 1
    assert await redis_client.exists(keys.usage(UID, NOV), keys.usage(UID, DEC)) == 2


async def test_quota_usage_and_reservation_keys_expire(redis_client: aioredis.Redis,
                                                       quota: QuotaStore) -> None:
    """The month's usage hash and the transaction's reservations carry a TTL."""
    await make_user(redis_client)
    await reserve_n(quota, "txn1", 1)
    usage_ttl = await redis_client.ttl(keys.usage(UID, NOV))
    resv_ttl = await redis_client.ttl(keys.reservations(UID, "txn1"))
    assert USAGE_TTL_SECONDS - 60 < usage_ttl <= USAGE_TTL_SECONDS
    assert RESERVATION_TTL_SECONDS - 60 < resv_ttl <= RESERVATION_TTL_SECONDS
    # The usage history outlives the month it counts (kept about 13 months).
    assert USAGE_TTL_SECONDS > 365 * 24 * 3600


# -- plan changes --------------------------------------------------------------------------------
async def test_quota_plan_change_applies_to_next_reserve(redis_client: aioredis.Redis,
                                                         quota: QuotaStore) -> None:
    """A plan written to the user hash governs the very next reservation, up or down."""
    await make_user(redis_client)
    await reserve_n(quota, "txn1", 3)
    assert (await quota.reserve(UID, NOV, "txn1", 4, PLANS)).status is ReserveStatus.OVER_LIMIT
    await redis_client.hset(keys.user(UID), "plan", "pro")
    assert await quota.reserve(UID, NOV, "txn1", 4, PLANS) == Reservation(
        ReserveStatus.RESERVED, 4, 10)
    await redis_client.hset(keys.user(UID), "plan", "free")
    assert await quota.reserve(UID, NOV, "txn1", 5, PLANS) == Reservation(
        ReserveStatus.OVER_LIMIT, 4, 3)


async def test_quota_custom_limit_change_applies_to_next_reserve(redis_client: aioredis.Redis,
                                                                 quota: QuotaStore) -> None:
    """A custom limit set or removed on the user hash applies to the next reservation."""
    await make_user(redis_client)
    await reserve_n(quota, "txn1", 3)
    await redis_client.hset(keys.user(UID), "limit", "4")
    assert await quota.reserve(UID, NOV, "txn1", 4, PLANS) == Reservation(
        ReserveStatus.RESERVED, 4, 4)
    await redis_client.hdel(keys.user(UID), "limit")
    assert (await quota.reserve(UID, NOV, "txn1", 5, PLANS)).status is ReserveStatus.OVER_LIMIT


async def test_quota_plan_limits_come_from_the_caller(redis_client: aioredis.Redis,
                                                      quota: QuotaStore) -> None:
    """The limit is the one in the plan_limits passed with the call (a policy reload)."""
    await make_user(redis_client)
    await reserve_n(quota, "txn1", 3)
    reloaded: list[str | int] = ["free", 5, "pro", 10]
    assert await quota.reserve(UID, NOV, "txn1", 4, reloaded) == Reservation(
        ReserveStatus.RESERVED, 4, 5)


# -- concurrency ---------------------------------------------------------------------------------
@pytest.fixture
async def many_clients(redis_server: RedisServer,
                       redis_client: aioredis.Redis) -> AsyncIterator[list[aioredis.Redis]]:
    """Several independent clients (separate connection pools), as several relay processes."""
    clients = [connect_redis(redis_server.url, timeout=10) for _ in range(5)]
    yield clients
    for client in clients:
        await client.aclose()


async def test_quota_concurrent_reserves_take_exactly_the_limit(
        redis_client: aioredis.Redis, many_clients: list[aioredis.Redis]) -> None:
    """200 concurrent reservations over several clients against a limit of 20 yield exactly
    20 RESERVED, and the month's count is exactly 20."""
    await make_user(redis_client, custom_limit=20)
    stores = [QuotaStore(client) for client in many_clients]
    calls = [stores[i % len(stores)].reserve(UID, NOV, f"txn{i % 17}", i, PLANS)
             for i in range(200)]
    results = await asyncio.gather(*calls)
    statuses = Counter(result.status for result in results)
    assert statuses == {ReserveStatus.RESERVED: 20, ReserveStatus.OVER_LIMIT: 180}
    assert sorted(r.used for r in results if r.status is ReserveStatus.RESERVED) == \
        list(range(1, 21))
    assert all(r.used == 20 for r in results if r.status is ReserveStatus.OVER_LIMIT)
    assert (await QuotaStore(redis_client).usage(UID, NOV)).used == 20


# -- Redis down ----------------------------------------------------------------------------------
async def test_quota_redis_unreachable_is_store_unavailable() -> None:
    """With Redis unreachable every operation fails closed with StoreUnavailableError (451)."""
    with socket.socket() as holder:
        # Bound but not listening: connections to this port are refused, and nobody else
        # can take it during the test.
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        client = connect_redis(f"redis://127.0.0.1:{port}/0", timeout=1)
        try:
            quota = QuotaStore(client)
            with pytest.raises(StoreUnavailableError) as refused:
                await quota.reserve(UID, NOV, "t", 1, PLANS)
            assert refused.value.reply.startswith("451 4.3.0 ")
            with pytest.raises(StoreUnavailableError):
                await quota.commit(UID, NOV, "t")
            with pytest.raises(StoreUnavailableError):
                await quota.refund(UID, NOV, "t")
            with pytest.raises(StoreUnavailableError):
                await quota.usage(UID, NOV)
        finally:
            await client.aclose()


# -- what a reservation's status means ---------------------------------------------------------
def test_refusal_for_names_the_refusal_of_each_status() -> None:
    """refusal_for: nothing when the units were taken; the account's refusal, or the policy's
    over-limit reply (made permanent for an app that must not retry) otherwise."""
    # The shipped reply's text as a 4xx (a policy may choose one), so "permanent" changes it.
    over_limit = replace(load_policies(POLICIES).over_limit, code=452, status="4.2.2")

    def refusal(status: ReserveStatus, permanent: bool = False) -> RelayError | None:
        return refusal_for(Reservation(status, used=5000, limit=5000), over_limit=over_limit,
                           permanent=permanent, resets_on="December 1, 2026")

    assert refusal(ReserveStatus.RESERVED) is None
    assert refusal(ReserveStatus.ALREADY_RESERVED) is None
    assert isinstance(refusal(ReserveStatus.USER_DISABLED), UserDisabledError)
    assert isinstance(refusal(ReserveStatus.USER_MISSING), UnknownSenderError)
    assert isinstance(refusal(ReserveStatus.UNKNOWN_PLAN), PlanMisconfiguredError)
    retry = refusal(ReserveStatus.OVER_LIMIT)
    assert isinstance(retry, QuotaExceededError) and retry.code == over_limit.code
    final = refusal(ReserveStatus.OVER_LIMIT, permanent=True)
    assert isinstance(final, QuotaExceededError) and final.permanent
    assert "December 1, 2026" in final.reply
