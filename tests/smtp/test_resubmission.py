"""relay.smtp.resubmission: one transaction's claims (MessageClaims) against a real
redis-server, with a settable clock: which recipients go, the renewal before DATA, and a
conclusion that meets Redis away."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
import redis.asyncio as aioredis
import structlog

from relay.decisions.dedup import DedupStore, digest
from relay.decisions.quota import QuotaStore
from relay.decisions.settle import LateSettlements
from relay.errors import ResubmissionInProgressError
from relay.smtp.resubmission import MessageClaims, Resubmissions
from relay.store import keys
from relay.store.client import connect_redis
from relay.store.scripts import lua_source
from tests.conftest import MutableClock, RedisServer, wait_for
from tests.replyproxy import ReplyDroppingProxy

UID, NOV = "u-test", "2026-11"
HEADER = b"Subject: s\r\nMessage-ID: <m1@app.test>\r\n\r\n"
MSG = digest(b"<m1@app.test>")
A, B = "a@example.test", "b@example.test"
CONCLUDE = lua_source("relay.decisions", "conclude.lua", prologues=["claims.lua"])


def resubmissions(redis: aioredis.Redis, clock: MutableClock, *, window: int = 3600,
                  settlements: LateSettlements | None = None) -> Resubmissions:
    return Resubmissions(DedupStore(redis), clock, window=window, upstream_timeout=10,
                         redis_timeout=2, settlements=settlements)


def begin(owner: Resubmissions, txn: str) -> MessageClaims:
    return owner.begin(user_id=UID, txn_id=txn, period=NOV, log=structlog.get_logger())


async def test_resubmission_claims_hold_for_the_reply_and_the_commit_twice_over(
        redis_client: aioredis.Redis, clock: MutableClock) -> None:
    owner = resubmissions(redis_client, clock)
    assert owner.needed == 10 + 2 + 30 and owner.holds == 2 * owner.needed


@pytest.mark.parametrize("case", ["off", "no_message_id", "no_store"])
async def test_resubmission_is_skipped_without_window_message_id_or_store(
        case: str, redis_client: aioredis.Redis, clock: MutableClock) -> None:
    """Window 0, a message without a Message-ID, or no store: every recipient goes, no key
    is written, and nothing is concluded."""
    owner = {"off": resubmissions(redis_client, clock, window=0),
             "no_message_id": resubmissions(redis_client, clock),
             "no_store": Resubmissions.off()}[case]
    claims = begin(owner, "t1")
    header = b"Subject: s\r\n\r\n" if case == "no_message_id" else HEADER
    assert await claims.claim(header, [(A, 1), (B, 2)]) == [(A, 1), (B, 2)]
    assert claims.settlement() is None
    await claims.conclude("released")
    assert [k async for k in redis_client.scan_iter(match="relay:dedup:*")] == []


async def test_resubmission_one_address_twice_is_claimed_once(
        redis_client: aioredis.Redis, clock: MutableClock) -> None:
    """The same recipient twice in a message (in two cases of A-Z): one field, claimed with
    the first unit; both go, as before; a resubmission finds both duplicates."""
    owner = resubmissions(redis_client, clock)
    claims = begin(owner, "t1")
    upper = A.upper()
    assert await claims.claim(HEADER, [(A, 1), (upper, 2)]) == [(A, 1), (upper, 2)]
    assert list(await redis_client.hkeys(keys.dedup(UID, MSG))) == [A]
    await claims.conclude("accepted")
    assert await begin(owner, "t2").claim(HEADER, [(upper, 1), (A, 2)]) == []


async def test_resubmission_confirm_renews_a_claim_that_might_lapse(
        redis_client: aioredis.Redis, clock: MutableClock) -> None:
    """Just before DATA: a recent claim is left as it is (no Redis call); one with less than
    the reply and the commit left of its hold is renewed."""
    owner = resubmissions(redis_client, clock)
    claims = begin(owner, "t1")
    await claims.claim(HEADER, [(A, 1)])
    before = await redis_client.hget(keys.dedup(UID, MSG), A)
    await claims.confirm()
    assert await redis_client.hget(keys.dedup(UID, MSG), A) == before
    clock.current += timedelta(seconds=owner.holds - owner.needed + 1)
    await claims.confirm()
    until = int((clock.now().timestamp() + owner.holds) * 1000)
    assert await redis_client.hget(keys.dedup(UID, MSG), A) == f"sending t1 1 {NOV} {until}"


async def test_resubmission_confirm_refuses_when_another_took_the_claim_over(
        redis_client: aioredis.Redis, clock: MutableClock) -> None:
    """The steps since the claim took longer than its hold, and another transaction took it
    over: the message is not sent (451), and concluding leaves the other's claim alone."""
    owner = resubmissions(redis_client, clock)
    slow = begin(owner, "t1")
    await slow.claim(HEADER, [(A, 1)])
    clock.current += timedelta(seconds=owner.holds + 1)
    assert await begin(owner, "t2").claim(HEADER, [(A, 1)]) == [(A, 1)]
    with pytest.raises(ResubmissionInProgressError):
        await slow.confirm()
    await slow.conclude("released")
    assert (await redis_client.hget(keys.dedup(UID, MSG), A) or "").startswith("sending t2 ")


async def test_resubmission_conclusion_meeting_redis_away_is_written_later(
        redis_client: aioredis.Redis, redis_server: RedisServer, clock: MutableClock) -> None:
    """A conclusion that meets Redis away (conclude.lua kept from it by a real proxy) waits
    with the late settlements, and is written once Redis takes it."""
    proxy = await ReplyDroppingProxy(redis_server.port).start()
    client = connect_redis(proxy.url, timeout=1)
    try:
        settlements = LateSettlements(QuotaStore(client), first_delay=0.01, max_delay=0.02)
        owner = Resubmissions(DedupStore(client), clock, window=3600, upstream_timeout=1,
                              redis_timeout=1, settlements=settlements)
        await redis_client.script_load(CONCLUDE)
        claims = begin(owner, "t1")
        await claims.claim(HEADER, [(A, 1)])
        proxy.refuse(hashlib.sha1(CONCLUDE.encode()).hexdigest().encode())
        await claims.conclude("unknown")
        assert len(settlements) == 1
        await wait_for(lambda: settlements._pending[0].attempts >= 2)
        proxy.allow(hashlib.sha1(CONCLUDE.encode()).hexdigest().encode())
        await wait_for(lambda: len(settlements) == 0)
        assert await redis_client.hget(keys.dedup(UID, MSG), A) == f"unknown t1 1 {NOV}"
        assert await settlements.close(0) == 0
    finally:
        await client.aclose()
        await proxy.close()
