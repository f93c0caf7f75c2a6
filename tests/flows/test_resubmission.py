"""Idempotent resubmission end to end (docs/resubmission.md): an app that lost the reply to
its DATA sends the same message again. Real relays on a real redis-server, a real capturing
upstream, real clients; every case ends with the ledger (tests/ledger.py): no recipient
delivered twice (beyond a copy the relay had to send again after an unknown outcome, which
the ledger calls resent), none counted twice.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace

import redis.asyncio as aioredis
from structlog.testing import capture_logs

from relay.errors import ResubmissionInProgressError, UpstreamOutcomeUnknownError
from relay.identity.accounts import AccountStore
from relay.process.wiring import RelayApp
from relay.store import keys
from relay.store.client import connect_redis
from tests.conftest import (
    CapturingUpstream,
    RedisServer,
    RelayFactory,
    add_app,
    add_user,
    wait_for,
)
from tests.ledger import LedgerUser
from tests.resubmit import PERIOD, attempt, attempt_losing_the_reply, compose, ledger, losing
from tests.scraping import scrape

A, B, C = "a@example.test", "b@example.test", "c@example.test"
IN_PROGRESS = ResubmissionInProgressError()
UNKNOWN = UpstreamOutcomeUnknownError()


async def agent(accounts: AccountStore, email: str = "agent@kw.test",
                limit: int | None = None) -> LedgerUser:
    user = await add_user(accounts, email, limit=limit)
    return LedgerUser(user.id, limit or 5000, (email,))


def txn_of(reply: str) -> str:
    """The transaction id a 250 after DATA names."""
    return reply.rsplit(" ", 1)[1]


def received_id(content: bytes) -> str:
    """The transaction id in the Received: header the relay put on a delivered message."""
    found = re.search(rb"Command Email Relay\) with \w+ id (\w+);", content)
    assert found
    return found.group(1).decode()


async def settled(app: RelayApp) -> None:
    """Deliveries finished and late settlements written."""
    await wait_for(lambda: app.handler.deliveries == 0 and len(app.settlements) == 0,
                   seconds=15)


async def test_resubmission_after_the_relays_reply_was_lost_is_a_duplicate(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """The app's connection dies after its final dot (it never hears the 250); it sends the
    message again: 250, nothing sent, nothing counted, and ``delivery.duplicate`` names both
    transactions."""
    user = await agent(accounts)
    content = compose("L1")
    first = await attempt_losing_the_reply(relay, "L1", [A, B], content)
    await wait_for(lambda: len(upstream.messages) == 1)
    await settled(relay)
    with capture_logs() as logs:
        second = await attempt(relay, "L1", [A, B], content)
    assert second.outcome == "acked"
    assert len(upstream.messages) == 1
    [duplicate] = [e for e in logs if e["event"] == "delivery.duplicate"]
    assert duplicate["earlier_txn_ids"] == [received_id(upstream.messages[0].content)]
    assert duplicate["txn_id"] == txn_of(second.data_reply) != duplicate["earlier_txn_ids"][0]
    assert duplicate["duplicates"] == 2
    [finished] = [e for e in logs if e["event"] == "delivery.finished"]
    assert finished["outcome"] == "duplicate"
    report = await ledger(redis_client, [user], [first, second], upstream)
    assert report.problems() == [], report.summary()
    assert (report.used, report.delivered, report.upstream_rcpts) == (2, 2, 2)
    metrics = await scrape(relay.metrics_port)
    assert metrics.value("relay_dedup_recipients_total", result="duplicate") == 2
    assert metrics.value("relay_dedup_recipients_total", result="claimed") == 2
    assert metrics.value("relay_messages_total", outcome="duplicate") == 1


async def test_resubmission_after_the_upstreams_reply_was_lost_is_sent_again_counted_once(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """The upstream takes the message and the connection dies before its reply: the app
    hears 451 4.4.2 (the outcome is unknown) and resubmits. The message is sent again (the
    upstream may not have it), and counted once: the second send gives back the first's
    units."""
    user = await agent(accounts)
    losing(upstream).lose_after = 1
    content = compose("L2")
    first = await attempt(relay, "L2", [A, B], content)
    assert f"{first.data_code} {first.data_reply}" == UNKNOWN.reply
    assert (await relay.quota.usage(user.id, PERIOD)).in_flight == 2  # high, never low
    with capture_logs() as logs:
        second = await attempt(relay, "L2", [A, B], content)
    assert second.outcome == "acked"
    assert [m.rcpt_tos for m in upstream.messages] == [[A, B], [A, B]]
    [resent] = [e for e in logs if e["event"] == "delivery.resent"]
    assert resent["earlier_txn_ids"] == [received_id(upstream.messages[0].content)]
    usage = await relay.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.delivered) == (2, 2)
    report = await ledger(redis_client, [user], [first, second], upstream)
    assert report.problems() == [], report.summary()
    assert (report.resent, report.duplicates) == (2, 0)
    # A third attempt is a duplicate of the second.
    third = await attempt(relay, "L2", [A, B], content)
    assert third.outcome == "acked" and len(upstream.messages) == 2
    metrics = await scrape(relay.metrics_port)
    assert metrics.value("relay_dedup_recipients_total", result="resent") == 2


async def test_resubmission_after_a_reply_lost_before_the_upstream_took_it_sends_it_once(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """The connection to the upstream dies before it took the message: 451 4.4.2 again (the
    relay cannot tell), the resubmission delivers it once, counted once."""
    user = await agent(accounts)
    losing(upstream).lose_before = 1
    content = compose("L3")
    first = await attempt(relay, "L3", [A], content)
    assert first.outcome == "uncertain"
    second = await attempt(relay, "L3", [A], content)
    assert second.outcome == "acked"
    assert [m.rcpt_tos for m in upstream.messages] == [[A]]
    report = await ledger(redis_client, [user], [first, second], upstream)
    assert report.problems() == [], report.summary()
    assert (report.used, report.delivered, report.resent) == (1, 1, 0)


async def test_resubmission_with_some_duplicates_at_rcpt_sends_only_the_others(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """Decided at RCPT, b was refused by the upstream the first time; the resubmission to a
    and b: the upstream transaction (which had both RCPTs) is reset and opened again with b
    alone; a is not sent again, b once, each counted once."""
    user = await agent(accounts)
    upstream.behaviour.rcpt_replies[B] = "450 4.2.1 Mailbox busy"
    content = compose("L4")
    first = await attempt(relay, "L4", [A, B], content)
    assert first.rcpts == [(A, 250), (B, 450)] and first.outcome == "acked"
    del upstream.behaviour.rcpt_replies[B]
    upstream.handler.rcpt_seen.clear()
    second = await attempt(relay, "L4", [A, B], content)
    assert second.outcome == "acked"
    assert [m.rcpt_tos for m in upstream.messages] == [[A], [B]]
    assert upstream.handler.rcpt_seen == [A, B, B]  # mirrored at RCPT, then b alone
    usage = await relay.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.delivered) == (2, 2)
    report = await ledger(redis_client, [user], [first, second], upstream)
    assert report.problems() == [], report.summary()


async def test_resubmission_decided_at_data_at_the_limit_is_not_refused(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """A SmartPlans email (decided at the end of DATA) used the user's last units; its
    resubmission gets 250, not the over-limit refusal (the claim comes before the
    reservation), and no event tells the Contact Timeline it failed. A resubmission with one
    more recipient asks a unit for that one alone: refused over the limit, with events for
    it alone; after an upgrade, sent to it alone."""
    user = await agent(accounts, limit=2)
    await add_app(accounts, "smartplans")
    relay = await make_relay(upstream=upstream)
    content = compose("L5", extra="X-KW-Contact-Id: c-1\r\n")

    async def events() -> list[tuple[str, str | None]]:
        found = [json.loads(fields["event"])
                 for _, fields in await redis_client.xrange(keys.events())]
        await redis_client.delete(keys.events())
        return [(e["kind"], e.get("recipient")) for e in found]

    first = await attempt(relay, "L5", [A, B], content, login="smartplans")
    assert first.outcome == "acked"
    assert await events() == [("quota.reached", None)]
    again = await attempt(relay, "L5", [A, B], content, login="smartplans")
    assert again.outcome == "acked"
    assert await events() == []
    more = await attempt(relay, "L5", [A, B, C], content, login="smartplans")
    assert more.data_code == 550
    assert await events() == [("quota.rejected", C), ("timeline.email_failed", C)]
    await redis_client.hset(keys.user(user.id), "limit", 3)  # an upgrade applies at once
    upgraded = await attempt(relay, "L5", [A, B, C], content, login="smartplans")
    assert upgraded.outcome == "acked"
    assert [m.rcpt_tos for m in upstream.messages] == [[A, B], [C]]
    usage = await relay.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.delivered) == (3, 3)
    report = await ledger(redis_client, [replace(user, limit=3)],
                          [first, again, more, upgraded], upstream)
    assert report.problems() == [], report.summary()


async def test_resubmission_while_another_relay_sends_it_waits(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, redis_server: RedisServer) -> None:
    """Relay 1 is sending the message (the upstream holds its DATA reply) when relay 2 gets
    the same message: 451 (in progress), nothing sent or counted by relay 2. Relay 1's send
    gets through; relay 2's retry is then a duplicate."""
    user = await agent(accounts)
    other = connect_redis(redis_server.url, timeout=2)
    try:
        first, second = await make_relay(upstream=upstream), await make_relay(
            upstream=upstream, redis=other)
        gate = upstream.behaviour.data_gate = asyncio.Event()
        content = compose("L6")
        sending = asyncio.ensure_future(attempt(first, "L6", [A, B], content, relay="1"))
        await upstream.handler.data_started.wait()
        waiting = await attempt(second, "L6", [A, B], content, relay="2")
        assert f"{waiting.data_code} {waiting.data_reply}" == IN_PROGRESS.reply
        gate.set()
        sent = await sending
        assert sent.outcome == "acked"
        retried = await attempt(second, "L6", [A, B], content, relay="2")
        assert retried.outcome == "acked"
        assert [m.rcpt_tos for m in upstream.messages] == [[A, B]]
        await settled(first)
        await settled(second)
        report = await ledger(redis_client, [user], [sent, waiting, retried], upstream)
        assert report.problems() == [], report.summary()
        assert (report.used, report.delivered) == (2, 2)
        metrics = await scrape(second.metrics_port)
        assert metrics.value("relay_dedup_recipients_total", result="in_progress") == 2
    finally:
        await other.aclose()


async def test_resubmission_to_two_relays_at_once_is_sent_at_most_once(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, redis_server: RedisServer) -> None:
    """The same message sent by eight clients at once, four through each of two relays on
    one Redis: whatever the interleaving, each recipient reaches the upstream once and is
    counted once; each client hears 250 or the in-progress 451, and every retry of a 451
    hears 250 without a second copy."""
    user = await agent(accounts)
    await add_app(accounts, "command")  # decided at RCPT
    other = connect_redis(redis_server.url, timeout=2)
    try:
        relays = [await make_relay(upstream=upstream),
                  await make_relay(upstream=upstream, redis=other)]
        content = compose("L7")
        attempts = await asyncio.gather(*(
            attempt(relays[i % 2], "L7", [A, B], content, login="command", relay=str(i % 2))
            for i in range(8)))
        replies = {f"{t.data_code} {t.data_reply}" for t in attempts if t.data_code != 250}
        assert replies <= {IN_PROGRESS.reply}
        retries = [await attempt(relays[int(t.relay)], "L7", [A, B], content, login="command")
                   for t in attempts if t.data_code != 250]
        assert all(t.outcome == "acked" for t in retries)
        assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == [A, B]
        for app in relays:
            await settled(app)
        report = await ledger(redis_client, [user], [*attempts, *retries], upstream)
        assert report.problems() == [], report.summary()
        assert (report.used, report.delivered, report.open_reservations) == (2, 2, 0)
    finally:
        await other.aclose()


async def test_resubmission_needs_a_message_id(relay: RelayApp, upstream: CapturingUpstream,
                                               accounts: AccountStore) -> None:
    """A message without a Message-ID is never deduplicated: sent and counted each time."""
    user = await agent(accounts)
    content = compose("L8", message_id=None)
    for _ in range(2):
        assert (await attempt(relay, "L8", [A], content)).outcome == "acked"
    assert len(upstream.messages) == 2
    assert (await relay.quota.usage(user.id, PERIOD)).delivered == 2


async def test_resubmission_never_crosses_users(relay: RelayApp, upstream: CapturingUpstream,
                                                accounts: AccountStore) -> None:
    """Two users sending the same Message-ID to the same recipient: two messages, each
    counted for its own user."""
    first = await agent(accounts)
    second = await agent(accounts, "other@kw.test")
    content = compose("L9", message_id="<same@app.test>")
    assert (await attempt(relay, "L9", [A], content)).outcome == "acked"
    again = await attempt(relay, "L9", [A], content, login="other@kw.test",
                          sender="other@kw.test")
    assert again.outcome == "acked"
    assert [m.mail_from for m in upstream.messages] == ["agent@kw.test", "other@kw.test"]
    for user in (first, second):
        assert (await relay.quota.usage(user.id, PERIOD)).delivered == 1


async def test_resubmission_window_zero_turns_it_off(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """RELAY_DEDUP_WINDOW=0: the same message is sent each time, and no dedup key is made."""
    await agent(accounts)
    relay = await make_relay(upstream=upstream, dedup_window=0)
    content = compose("L10")
    for _ in range(2):
        assert (await attempt(relay, "L10", [A], content)).outcome == "acked"
    assert len(upstream.messages) == 2
    assert [k async for k in redis_client.scan_iter(match="relay:dedup:*")] == []


async def test_resubmission_keys_expire_after_the_window(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """The message's key lives RELAY_DEDUP_WINDOW seconds after the last attempt; once it is
    gone the same message is sent again."""
    user = await agent(accounts)
    relay = await make_relay(upstream=upstream, dedup_window=3600)
    content = compose("L11")
    assert (await attempt(relay, "L11", [A], content)).outcome == "acked"
    [key] = [k async for k in redis_client.scan_iter(match=keys.dedup(user.id, "*"))]
    assert 3500 < await redis_client.ttl(key) <= 3600
    await redis_client.delete(key)  # what the expiry does
    assert (await attempt(relay, "L11", [A], content)).outcome == "acked"
    assert len(upstream.messages) == 2
