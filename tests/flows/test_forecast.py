"""The forecast in the threshold notices, end to end: sends through a real relay cross 80 %,
and the notifier's real webhook POST (tests/webhooks.py) and email notice (through a real
SMTP upstream) carry "At this pace you will reach …" when the pace reaches the limit
before the reset, and nothing early in the month or when the pace misses the reset. Time
is the relay's clock (MutableClock)."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from relay.config.endpoints import UpstreamTarget
from relay.config.policies import load_policies
from relay.delivery.pool import SmtpUpstream
from relay.events.channels import EmailChannel, WebhookChannel
from relay.events.notifier import GROUP, Notifier
from relay.identity.accounts import AccountStore
from relay.process.wiring import RelayApp
from relay.store import keys
from tests.conftest import (
    POLICIES,
    CapturingUpstream,
    MutableClock,
    add_user,
    message,
    smtp_client,
    wait_for,
)
from tests.webhooks import WEBHOOK_SECRET, Receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def channels(receiver: Receiver,
                   upstream: CapturingUpstream) -> AsyncIterator[dict[str, Any]]:
    """The notifier's two channels, as ``run_notifier`` builds them: the webhook to the
    receiver, the email notice through its own pool to the capturing upstream."""
    pool = SmtpUpstream(UpstreamTarget("127.0.0.1", upstream.port, "none"), size=2, timeout=5,
                        local_hostname="relay.test")
    async with aiohttp.ClientSession() as http:
        yield {"in_app": WebhookChannel(receiver.url(), WEBHOOK_SECRET, timeout=5,
                                        session=http),
               "email": EmailChannel(pool, sender="Command Email <no-reply@kw.test>",
                                     hostname="relay.test")}
    await pool.close()


async def cross_80_percent(relay: RelayApp, accounts: AccountStore,
                           redis_client: aioredis.Redis, channels: dict[str, Any],
                           receiver: Receiver, upstream: CapturingUpstream
                           ) -> tuple[dict[str, Any], str]:
    """Limit 100, 79 delivered this month: one more send through the relay crosses 80 %.
    Returns the webhook's JSON body and the email notice's text."""
    user = await add_user(accounts, limit=100)
    label = relay.clock.now().strftime("%Y-%m")
    await redis_client.hset(keys.usage(user.id, label), mapping={"used": 79, "delivered": 79})
    async with smtp_client(relay) as client:
        errors, _ = await client.sendmail("agent@kw.test", ["a@example.test"], message())
    assert errors == {}
    policy = dataclasses.replace(load_policies(POLICIES).notifications, backoff_base=0.01,
                                 backoff_max=0.05)
    stop = asyncio.Event()
    notifier = Notifier(redis_client, channels, policy, consumer="n1", jitter=lambda: 1.0)
    task = asyncio.create_task(notifier.run(stop))
    try:
        await wait_for(lambda: receiver.delivered())
        await wait_for(lambda: len(upstream.messages) == 2)  # the send and the notice
        await wait_for(lambda: _settled(redis_client))
    finally:
        stop.set()
        await task
    [request] = receiver.delivered()
    body = json.loads(request.body)
    assert (request.headers["X-Relay-Event"], body["percent"], body["used"]) == (
        "quota.threshold", 80, 80)
    [notice] = [email.message_from_bytes(m.content, policy=email.policy.default)
                for m in upstream.messages if m.rcpt_tos == ["agent@kw.test"]]
    return body, notice.get_content().replace("\r\n", "\n")  # as sent: CRLF lines


async def _settled(redis_client: aioredis.Redis) -> bool:
    return int((await redis_client.xpending(keys.events(), GROUP))["pending"]) == 0


async def test_forecast_in_the_threshold_webhook_and_email(
        relay: RelayApp, accounts: AccountStore, redis_client: aioredis.Redis,
        channels: dict[str, Any], receiver: Receiver, upstream: CapturingUpstream,
        clock: MutableClock) -> None:
    """November 15, 12:00 UTC: 80 of 100 delivered in 14.5 days reach 100 after
    14.5 * 100 / 80 = 18.125 days, November 19 at 03:00: the webhook payload carries the
    forecast, the email says it between the count and the upgrade hint."""
    assert clock.now() == datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
    body, text = await cross_80_percent(relay, accounts, redis_client, channels, receiver,
                                        upstream)
    sentence = "At this pace you will reach your 100-send limit around November 19."
    assert body["forecast"] == {"limit": 100, "reaches_at": "2026-11-19T03:00:00+00:00",
                                "date": "2026-11-19", "text": sentence}
    assert text.startswith(
        "You have used 80 of 100 Command Email sends this month; they reset on December 1."
        f"\n\n{sentence}\n\nIf you need more this month, you can upgrade")


@pytest.mark.parametrize(("now", "why"), [
    (datetime(2026, 11, 2, 12, 0, tzinfo=UTC), "a day and a half into the month"),
    (datetime(2026, 11, 28, 12, 0, tzinfo=UTC), "80 in 27.5 days reach 100 on day 34.4"),
])
async def test_forecast_notices_say_nothing_when_the_rule_says_nothing(
        relay: RelayApp, accounts: AccountStore, redis_client: aioredis.Redis,
        channels: dict[str, Any], receiver: Receiver, upstream: CapturingUpstream,
        clock: MutableClock, now: datetime, why: str) -> None:
    """Too early in the month, or a pace that reaches the limit only after the reset: the
    payload's forecast is null and the email has no forecast sentence."""
    clock.current = now
    body, text = await cross_80_percent(relay, accounts, redis_client, channels, receiver,
                                        upstream)
    assert body["forecast"] is None, why
    assert "At this pace" not in text, why
    assert text.startswith("You have used 80 of 100 Command Email sends this month; they "
                           "reset on December 1.\n\nIf you need more this month")
