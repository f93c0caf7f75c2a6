"""Idempotent resubmission when something fails (docs/resubmission.md): Redis during the
claim (its reply lost through a real proxy, tests/replyproxy.py), a relay that stops while
the upstream holds the message, a claim whose relay died (it lapses), and a route that is
not counted (no commit to mark the claims: the relay concludes them itself)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from relay.config.endpoints import UpstreamTarget
from relay.decisions.dedup import DedupStore, digest
from relay.decisions.quota import QuotaStore
from relay.delivery.credentials import RouteCredentials
from relay.errors import ResubmissionInProgressError, StoreUnavailableError
from relay.identity.accounts import AccountStore
from relay.process.wiring import RelayApp
from relay.smtp.tls import server_context
from relay.store import keys
from relay.store.client import connect_redis
from relay.store.scripts import lua_source
from tests.conftest import (
    CapturingUpstream,
    MutableClock,
    RedisServer,
    RelayFactory,
    UpstreamBehaviour,
    add_app,
    add_user,
    wait_for,
)
from tests.ledger import ClientTxn, LedgerUser
from tests.replyproxy import ReplyDroppingProxy
from tests.resubmit import PERIOD, attempt, compose, ledger

A, B = "a@example.test", "b@example.test"
CLAIM_SOURCE = lua_source("relay.decisions", "claim.lua", prologues=["claims.lua"])
CLAIM = hashlib.sha1(CLAIM_SOURCE.encode()).hexdigest().encode()


async def agent(accounts: AccountStore, limit: int | None = None) -> LedgerUser:
    user = await add_user(accounts, limit=limit)
    return LedgerUser(user.id, limit or 5000, ("agent@kw.test",))


async def claims_of(redis: aioredis.Redis, user_id: str, ident: str) -> dict[str, str]:
    """The message's dedup hash: recipient -> state."""
    found = await redis.hgetall(keys.dedup(user_id, digest(f"<{ident}@app.test>".encode())))
    return dict(found)  # type: ignore[arg-type]


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[ReplyDroppingProxy]:
    server = await ReplyDroppingProxy(redis_server.port).start()
    yield server
    await server.close()


@pytest.mark.parametrize("fault", ["reply_lost", "never_reached"])
async def test_resubmission_redis_failing_at_the_claim_refuses_with_451_and_loses_nothing(
        fault: str, proxy: ReplyDroppingProxy, make_relay: RelayFactory,
        upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """Redis fails during the claim (the script ran and its reply was lost, or it never
    reached Redis): a clear 451, nothing sent; once Redis is back the claims are released
    and the units given back by themselves, and the app's retry sends the message once."""
    user = await agent(accounts)
    client = connect_redis(proxy.url, timeout=2)
    try:
        relay = await make_relay(upstream=upstream, redis=client)
        await redis_client.script_load(CLAIM_SOURCE)  # no NOSCRIPT reply to lose
        if fault == "reply_lost":
            proxy.drop_reply_to(CLAIM)
        else:
            proxy.refuse(CLAIM)
        content = compose("F1")
        first = await attempt(relay, "F1", [A, B], content)
        assert f"{first.data_code} {first.data_reply}" == StoreUnavailableError().reply
        assert upstream.messages == []
        if fault == "reply_lost":
            assert proxy.dropped.is_set()
            assert all(v.startswith("sending ") for v in
                       (await claims_of(redis_client, user.id, "F1")).values())
            proxy.heal()
        else:
            proxy.allow(CLAIM)
        await wait_for(lambda: len(relay.settlements) == 0, seconds=15)
        assert await claims_of(redis_client, user.id, "F1") == {}
        assert (await relay.quota.usage(user.id, PERIOD)).used == 0
        second = await attempt(relay, "F1", [A, B], content)
        assert second.outcome == "acked"
        assert [m.rcpt_tos for m in upstream.messages] == [[A, B]]
        report = await ledger(redis_client, [user], [first, second], upstream)
        assert report.problems() == [], report.summary()
        assert (report.used, report.delivered) == (2, 2)
    finally:
        await client.aclose()


async def test_resubmission_after_a_relay_was_stopped_mid_send_is_sent_again_once(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """The relay stops (past its drain) while the upstream holds the message: the outcome
    is unknown, the claim says so at once (no need to wait for it to lapse), and another
    relay sends the resubmission, counted once."""
    user = await agent(accounts)
    gate = upstream.behaviour.data_gate = asyncio.Event()
    first_relay = await make_relay(upstream=upstream)
    content = compose("F2")
    sending = asyncio.ensure_future(attempt(first_relay, "F2", [A], content))
    await upstream.handler.data_started.wait()
    await first_relay.stop(drain_timeout=0)
    first = await sending
    assert first.data_code != 250
    assert [v.split()[0] for v in (await claims_of(redis_client, user.id, "F2")).values()] \
        == ["unknown"]
    upstream.behaviour.data_gate = None
    gate.set()
    second_relay = await make_relay(upstream=upstream)
    second = await attempt(second_relay, "F2", [A], content)
    assert second.outcome == "acked"
    first.dot_sent, first.data_code = True, None  # cut after the dot: uncertain
    report = await ledger(redis_client, [user], [first, second], upstream)
    assert report.problems() == [], report.summary()
    assert (report.used, report.delivered, report.open_reservations) == (1, 1, 0)


async def test_resubmission_claim_of_a_dead_relay_holds_then_lapses(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, clock: MutableClock) -> None:
    """A relay died while sending (its claim and its unit left behind): until the claim
    lapses a resubmission waits (451); after, it is sent, and its commit gives back the
    dead transaction's unit: counted once."""
    user = await agent(accounts)
    now = clock.now().timestamp()
    message = digest(b"<F3@app.test>")
    await QuotaStore(redis_client).reserve(user.id, PERIOD, "deadbeef", 1, ["free", 5000])
    await DedupStore(redis_client).claim(
        user.id, message, "deadbeef", PERIOD, [(A, 1)], now_ms=int(now * 1000),
        holds_ms=int((now + 60) * 1000), window=3600)
    content = compose("F3")
    waiting = await attempt(relay, "F3", [A], content)
    assert f"{waiting.data_code} {waiting.data_reply}" == ResubmissionInProgressError().reply
    clock.current += timedelta(seconds=61)
    sent = await attempt(relay, "F3", [A], content)
    assert sent.outcome == "acked"
    dead = ClientTxn("F3", "agent@kw.test", [(A, 250)], dot_sent=True, lost_at="dot")
    report = await ledger(redis_client, [user], [dead, waiting, sent], upstream)
    assert report.problems() == [], report.summary()
    assert (report.used, report.delivered, report.open_reservations) == (1, 1, 0)


# -- a route that is not counted ---------------------------------------------------------------
@pytest.fixture
async def mailchimp(tls_files: tuple[Path, Path]) -> AsyncIterator[CapturingUpstream]:
    server = CapturingUpstream(UpstreamBehaviour(credentials=("mcuser", "KEY")),
                               tls=server_context(*tls_files))
    await server.start()
    yield server
    await server.stop()


async def test_resubmission_on_a_route_that_is_not_counted(
        make_relay: RelayFactory, upstream: CapturingUpstream, mailchimp: CapturingUpstream,
        accounts: AccountStore, redis_client: aioredis.Redis,
        tls_files: tuple[Path, Path]) -> None:
    """Campaigns routed to MailChimp (not counted, so no commit): the relay marks the
    recipients accepted itself, and the resubmission is a duplicate there too."""
    user = await add_user(accounts)
    await add_app(accounts, "campaigns")
    relay = await make_relay(
        upstream=upstream, upstream_ca_file=tls_files[0],
        route_urls={"mailchimp": UpstreamTarget("127.0.0.1", mailchimp.port, "starttls")})
    await relay.credentials.save(user.id, "mailchimp", RouteCredentials("mcuser", "KEY"))
    content = compose("F4", extra="X-KW-Route: mailchimp\r\n")
    for _ in range(2):
        assert (await attempt(relay, "F4", [A, B], content, login="campaigns")).outcome \
            == "acked"
    assert [m.rcpt_tos for m in mailchimp.messages] == [[A, B]]
    assert upstream.messages == []
    states = await claims_of(redis_client, user.id, "F4")
    assert sorted(v.split()[0] for v in states.values()) == ["accepted", "accepted"]
    usage = await relay.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.routes) == (0, {"mailchimp": 2})
