"""relay.decisions.dedup: claim.lua, conclude.lua and the claims part of commit.lua, against a
real redis-server (docs/resubmission.md)."""

from __future__ import annotations

import asyncio
import hashlib
import socket

import pytest
import redis.asyncio as aioredis

from relay.decisions.dedup import (
    ClaimSettlement,
    ClaimStatus,
    DedupStore,
    EarlierUnit,
    RecipientClaim,
    digest,
)
from relay.decisions.quota import QuotaStore
from relay.errors import StoreUnavailableError
from relay.store import keys
from relay.store.client import connect_redis

UID = "u-test"
NOV, OCT = "2026-11", "2026-10"
MSG = digest(b"<m1@app.test>")
NOW = 1_790_000_000_000  # unix ms
HOLD = 60_000
WINDOW = 3600
A, B, C = "a@example.test", "b@example.test", "c@example.test"
PLANS: list[str | int] = ["free", 100]
CLAIMED = RecipientClaim(ClaimStatus.CLAIMED)


@pytest.fixture
def store(redis_client: aioredis.Redis) -> DedupStore:
    return DedupStore(redis_client)


async def claim(store: DedupStore, txn: str, *recipients: tuple[str, int], now: int = NOW,
                period: str = NOV) -> list[RecipientClaim]:
    return await store.claim(UID, MSG, txn, period, list(recipients), now_ms=now,
                             holds_ms=now + HOLD, window=WINDOW)


async def fields(redis_client: aioredis.Redis) -> dict[str, str]:
    return dict(await redis_client.hgetall(keys.dedup(UID, MSG)))  # type: ignore[arg-type]


def test_dedup_key_is_in_the_users_slot_and_digest_is_sha256() -> None:
    assert MSG == hashlib.sha256(b"<m1@app.test>").hexdigest()
    assert keys.dedup(UID, MSG) == f"relay:dedup:{{{UID}}}:{MSG}"
    assert digest(b"<m1@app.test>") != digest(b"<M1@app.test>")  # kept as sent


async def test_dedup_first_claim_claims_every_recipient(
        store: DedupStore, redis_client: aioredis.Redis) -> None:
    """Fresh recipients: claimed, `sending` by the transaction until the hold, the hash kept
    for the window."""
    assert await claim(store, "t1", (A, 1), (B, 2)) == [CLAIMED, CLAIMED]
    assert await fields(redis_client) == {A: f"sending t1 1 {NOV} {NOW + HOLD}",
                                          B: f"sending t1 2 {NOV} {NOW + HOLD}"}
    assert 0 < await redis_client.ttl(keys.dedup(UID, MSG)) <= WINDOW


async def test_dedup_accepted_recipient_is_a_duplicate(
        store: DedupStore, redis_client: aioredis.Redis) -> None:
    """Once accepted, the recipient is a duplicate naming the transaction; a new one of the
    same message is claimed."""
    await claim(store, "t1", (A, 1))
    assert await store.conclude(UID, MSG, "t1", "accepted", WINDOW) == 1
    assert await claim(store, "t2", (A, 1), (B, 2)) == [
        RecipientClaim(ClaimStatus.DUPLICATE, "t1"), CLAIMED]
    assert (await fields(redis_client))[A] == "accepted t1"


async def test_dedup_a_held_claim_makes_the_message_wait_and_claims_nothing(
        store: DedupStore, redis_client: aioredis.Redis) -> None:
    """Another transaction's claim that still holds: BUSY, and no other recipient of the
    message is claimed (it is never sent in part meanwhile)."""
    await claim(store, "t1", (A, 1))
    before = await fields(redis_client)
    found = await claim(store, "t2", (A, 1), (B, 2), now=NOW + HOLD - 1)
    assert found[0] == RecipientClaim(ClaimStatus.BUSY, "t1")
    assert await fields(redis_client) == before


async def test_dedup_claims_from_many_tasks_at_once_have_one_winner(
        store: DedupStore) -> None:
    """Forty transactions claim the same two recipients at once: one claims both, every
    other one is told BUSY."""
    results = await asyncio.gather(*(claim(store, f"t{i}", (A, 1), (B, 2))
                                     for i in range(40)))
    winners = [r for r in results if r == [CLAIMED, CLAIMED]]
    assert len(winners) == 1
    assert sum(any(c.status is ClaimStatus.BUSY for c in r) for r in results) == 39


async def test_dedup_a_lapsed_claim_is_an_unknown_outcome(
        store: DedupStore, redis_client: aioredis.Redis) -> None:
    """A claim past its hold (its relay died): the next transaction sends again, told which
    unit of which month to give back once it commits."""
    await claim(store, "t1", (A, 3), period=OCT)
    found = await claim(store, "t2", (A, 1), now=NOW + HOLD + 1)
    assert found == [RecipientClaim(ClaimStatus.RESEND, earlier=(EarlierUnit("t1", 3, OCT),))]
    assert (await fields(redis_client))[A] == \
        f"sending t2 1 {NOV} {NOW + 2 * HOLD + 1} t1 3 {OCT}"


async def test_dedup_unknown_outcomes_chain_and_the_chain_is_capped(
        store: DedupStore, redis_client: aioredis.Redis) -> None:
    """Each attempt whose outcome is unknown joins the list the next send settles; the last
    eight are kept."""
    for i in range(10):
        await claim(store, f"t{i}", (A, i + 1))
        assert await store.conclude(UID, MSG, f"t{i}", "unknown", WINDOW) == 1
    [found] = await claim(store, "last", (A, 1))
    assert found.status is ClaimStatus.RESEND
    assert found.earlier == tuple(EarlierUnit(f"t{i}", i + 1, NOV) for i in range(2, 10))


async def test_dedup_released_claims_go_back_to_what_they_were(
        store: DedupStore, redis_client: aioredis.Redis) -> None:
    """Nothing was sent: a fresh recipient's field goes away, a resent one's goes back to
    the unknown outcome it was."""
    await claim(store, "t1", (A, 1))
    await store.conclude(UID, MSG, "t1", "unknown", WINDOW)
    assert [c.status for c in await claim(store, "t2", (A, 1), (B, 2))] == [
        ClaimStatus.RESEND, ClaimStatus.CLAIMED]
    assert await store.conclude(UID, MSG, "t2", "released", WINDOW) == 2
    assert await fields(redis_client) == {A: f"unknown t1 1 {NOV}"}
    assert await store.conclude(UID, MSG, "t2", "released", WINDOW) == 0  # idempotent


async def test_dedup_a_second_claim_by_the_same_transaction_renews_it(
        store: DedupStore, redis_client: aioredis.Redis) -> None:
    """The same transaction claiming again (just before DATA) extends its hold and keeps
    the earlier attempts it settles."""
    await claim(store, "t0", (A, 1))
    await store.conclude(UID, MSG, "t0", "unknown", WINDOW)
    await claim(store, "t1", (A, 1))
    renewed = await claim(store, "t1", (A, 1), now=NOW + 5000)
    assert renewed == [RecipientClaim(ClaimStatus.RESEND, earlier=(EarlierUnit("t0", 1, NOV),))]
    assert (await fields(redis_client))[A] == f"sending t1 1 {NOV} {NOW + 5000 + HOLD} t0 1 {NOV}"


async def test_dedup_a_late_conclusion_leaves_a_later_claim_alone(
        store: DedupStore, redis_client: aioredis.Redis) -> None:
    """t1's claim lapsed and t2 took it over: t1 concluding afterwards changes nothing."""
    await claim(store, "t1", (A, 1))
    await claim(store, "t2", (A, 1), now=NOW + HOLD + 1)
    before = await fields(redis_client)
    for outcome in ("accepted", "released", "unknown"):
        assert await store.conclude(UID, MSG, "t1", outcome, WINDOW) == 0  # type: ignore[arg-type]
    assert await fields(redis_client) == before


def test_dedup_claim_settlement_groups_earlier_units_by_transaction_and_month() -> None:
    """KEYS[4..] and ARGV[5] of commit.lua: the dedup key, then one (usage, reservations)
    pair per earlier transaction and month, with its unit numbers."""
    settlement = ClaimSettlement(UID, MSG, "t9", WINDOW, (
        EarlierUnit("t1", 2, OCT), EarlierUnit("t2", 1, NOV), EarlierUnit("t1", 1, OCT),
        EarlierUnit("t1", 1, OCT)))
    assert settlement.keys_and_argument() == (
        [keys.dedup(UID, MSG), keys.usage(UID, OCT), keys.reservations(UID, "t1"),
         keys.usage(UID, NOV), keys.reservations(UID, "t2")],
        f"t9 {WINDOW} 1,2 1")


async def test_dedup_commit_marks_the_claims_accepted_and_settles_earlier_units(
        store: DedupStore, redis_client: aioredis.Redis) -> None:
    """The send after unknown outcomes in October and November commits its own units, gives
    back theirs (each recipient counted once, in whichever month the unit was taken) and
    marks its recipients accepted, in one step; a repeat changes nothing."""
    quota = QuotaStore(redis_client)
    await redis_client.hset(keys.user(UID), mapping={"status": "active", "plan": "free"})
    await quota.reserve(UID, OCT, "t1", [1, 2], PLANS)
    await claim(store, "t1", (A, 1), (B, 2), period=OCT)
    await store.conclude(UID, MSG, "t1", "unknown", WINDOW)
    await quota.reserve(UID, NOV, "t2", [1], PLANS)
    await claim(store, "t2", (A, 1))
    await store.conclude(UID, MSG, "t2", "unknown", WINDOW)
    await quota.reserve(UID, NOV, "t3", [1, 2], PLANS)
    found = await claim(store, "t3", (A, 1), (B, 2))
    earlier = tuple(u for c in found for u in c.earlier)
    claims = ClaimSettlement(UID, MSG, "t3", WINDOW, earlier)
    settlement = await quota.commit(UID, NOV, "t3", "command", PLANS, "", [1, 2], claims)
    assert (settlement.units, settlement.settled) == (2, 3)
    assert await fields(redis_client) == {A: "accepted t3", B: "accepted t3"}
    october, november = await quota.usage(UID, OCT), await quota.usage(UID, NOV)
    assert (october.used, october.delivered) == (0, 0)
    assert (november.used, november.delivered) == (2, 2)
    again = await quota.commit(UID, NOV, "t3", "command", PLANS, "", [1, 2], claims)
    assert (again.units, again.settled, again.used) == (0, 0, 2)


async def test_dedup_redis_unreachable_is_store_unavailable() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        client = connect_redis(f"redis://127.0.0.1:{holder.getsockname()[1]}/0", timeout=1)
        try:
            store = DedupStore(client)
            with pytest.raises(StoreUnavailableError):
                await claim(store, "t1", (A, 1))
            with pytest.raises(StoreUnavailableError):
                await store.conclude(UID, MSG, "t1", "released", WINDOW)
        finally:
            await client.aclose()
