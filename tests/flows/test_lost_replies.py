"""A quota script whose reply is lost (Redis killed after running it) or that meets Redis away
while the rest of the transaction goes on: a user is charged only for what was delivered.

Redis is reached through a real proxy (tests/replyproxy.py) that lets the chosen script run
and loses its reply, then keeps Redis away until the test brings it back, or keeps one
script from Redis while the others go through: the exact interleaving of a SIGKILL, chosen
by the command's content, never by timing.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import aiosmtplib
import pytest
import redis.asyncio as aioredis

from relay.decisions.quota import QuotaStore, Usage
from relay.identity.accounts import AccountStore
from relay.process.wiring import RelayApp
from relay.store import keys
from relay.store.client import connect_redis
from relay.store.scripts import lua_source
from tests.conftest import (
    CapturingUpstream,
    RedisServer,
    RelayFactory,
    add_app,
    add_user,
    message,
    smtp_client,
    wait_for,
)
from tests.replyproxy import ReplyDroppingProxy

NOV = "2026-11"  # the month of the tests' clock


def _sha(name: str, *prologues: str) -> bytes:
    """The SHA1 redis-py sends in EVALSHA for ``relay/decisions/lua/<name>``."""
    source = lua_source("relay.decisions", name, prologues=prologues)
    return hashlib.sha1(source.encode()).hexdigest().encode()


RESERVE = _sha("reserve.lua", "terms.lua")
REFUND = _sha("refund.lua", "units.lua")


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[ReplyDroppingProxy]:
    server = await ReplyDroppingProxy(redis_server.port).start()
    yield server
    await server.close()


@pytest.fixture
async def proxied(redis_client: aioredis.Redis, proxy: ReplyDroppingProxy,
                  make_relay: RelayFactory, upstream: CapturingUpstream,
                  accounts: AccountStore) -> AsyncIterator[RelayApp]:
    """A relay whose Redis client goes through the proxy (accounts are written directly)."""
    await add_user(accounts)
    client = connect_redis(proxy.url, timeout=2)
    try:
        yield await make_relay(upstream=upstream, redis=client)
    finally:
        await client.aclose()


async def _usage(redis_client: aioredis.Redis) -> tuple[Usage, int]:
    """The month's usage of the one user, and its open reservations (units)."""
    [user_id] = await redis_client.smembers(keys.users_index())  # type: ignore[misc]
    open_units = 0
    async for key in redis_client.scan_iter(match=keys.reservations(user_id, "*")):
        open_units += int(await redis_client.hlen(key))
    return await QuotaStore(redis_client).usage(user_id, NOV), open_units


async def _counted(redis_client: aioredis.Redis) -> tuple[int, int, int]:
    usage, open_units = await _usage(redis_client)
    return usage.used, usage.delivered, open_units


async def test_lost_replies_reservation_run_but_unanswered_is_not_committed(
        proxied: RelayApp, proxy: ReplyDroppingProxy, upstream: CapturingUpstream,
        redis_client: aioredis.Redis) -> None:
    """RCPT b's reservation runs in Redis, its reply is lost and Redis is away: b gets 451.
    Redis back, the message goes to a alone and the commit counts a alone (b's unit, held
    by the transaction, is given back), not a user charged for a send that never was."""
    async with smtp_client(proxied) as client:
        await client.mail("agent@kw.test")
        await client.rcpt("a@example.test")
        proxy.drop_reply_to(RESERVE)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt("b@example.test")
        assert refused.value.code == 451
        assert proxy.dropped.is_set()
        assert await _counted(redis_client) == (2, 0, 2)  # b's reservation was made
        proxy.heal()
        await client.data(message())
    assert [m.rcpt_tos for m in upstream.messages] == [["a@example.test"]]
    assert await _counted(redis_client) == (1, 1, 0)


async def test_lost_replies_late_commit_counts_only_the_delivered_recipients(
        proxied: RelayApp, proxy: ReplyDroppingProxy, upstream: CapturingUpstream,
        redis_client: aioredis.Redis) -> None:
    """The failing run of the Redis-killed fault scenario, step by step: b's reservation
    runs and its reply is lost, Redis stays away through DATA, so the commit after the
    upstream's 250 is queued; once Redis is back the late commit counts a alone. The
    message has no Message-ID: one that has is claimed at the end of DATA, which meets the
    outage first and refuses the message (docs/resubmission.md)."""
    async with smtp_client(proxied) as client:
        await client.mail("agent@kw.test")
        await client.rcpt("a@example.test")
        proxy.drop_reply_to(RESERVE)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused):
            await client.rcpt("b@example.test")
        # delivered: the client hears 250, the commit waits
        await client.data(b"Subject: no Message-ID\r\n\r\nBody line\r\n")
    assert len(proxied.settlements) == 1
    proxy.heal()
    await wait_for(lambda: len(proxied.settlements) == 0, seconds=15)
    assert [m.rcpt_tos for m in upstream.messages] == [["a@example.test"]]
    assert await _counted(redis_client) == (1, 1, 0)


async def test_lost_replies_queued_refund_is_not_committed_first(
        proxied: RelayApp, proxy: ReplyDroppingProxy, upstream: CapturingUpstream,
        redis_client: aioredis.Redis) -> None:
    """The upstream refuses b and b's refund meets Redis away (queued); the commit after the
    upstream's 250 reaches Redis before it: it counts a alone and gives b's unit back, and
    the queued refund then finds nothing to give back."""
    upstream.behaviour.rcpt_replies["b@example.test"] = "450 4.2.1 Mailbox busy"
    proxy.refuse(REFUND)
    async with smtp_client(proxied) as client:
        errors, _ = await client.sendmail("agent@kw.test", ["a@example.test",
                                                             "b@example.test"], message())
    assert errors["b@example.test"].code == 450
    assert len(proxied.settlements) == 1  # the refund, still waiting
    assert await _counted(redis_client) == (1, 1, 0)
    proxy.allow(REFUND)
    await wait_for(lambda: len(proxied.settlements) == 0, seconds=15)
    assert await _counted(redis_client) == (1, 1, 0)


async def test_lost_replies_reservation_at_data_run_but_unanswered_is_given_back(
        proxied: RelayApp, proxy: ReplyDroppingProxy, upstream: CapturingUpstream,
        redis_client: aioredis.Redis, accounts: AccountStore) -> None:
    """Decided at the end of DATA (a timeline app): the reservation of both recipients runs,
    its reply is lost and the message is refused with a 451; once Redis is back both units
    are given back (nothing was sent)."""
    await add_app(accounts, "smartplans")
    await redis_client.script_load(lua_source("relay.decisions", "reserve.lua",
                                              prologues=["terms.lua"]))  # no NOSCRIPT to drop
    async with smtp_client(proxied, login="smartplans") as client:
        proxy.drop_reply_to(RESERVE)
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.sendmail("agent@kw.test", ["a@example.test", "b@example.test"],
                                  message())
    assert refused.value.code == 451
    assert proxy.dropped.is_set()
    assert await _counted(redis_client) == (2, 0, 2)  # the reservation was made
    proxy.heal()
    await wait_for(lambda: len(proxied.settlements) == 0, seconds=15)
    assert upstream.messages == []
    assert await _counted(redis_client) == (0, 0, 0)
