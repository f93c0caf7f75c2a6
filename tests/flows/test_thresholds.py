"""Threshold and over-limit events from the SMTP path. Thresholds are decided inside
commit.lua, by delivered sends, so each fires exactly once per user, month and limit, even
under concurrency on several relays, and never for a send the upstream refused."""

from __future__ import annotations

import asyncio
import json

import aiosmtplib
import pytest

from relay.admin.operations import Admin
from relay.events.stream import EventLog
from relay.store import keys
from relay.store.client import connect_redis
from tests.conftest import (
    MutableClock,
    RelayFactory,
    add_app,
    add_user,
    message,
    smtp_client,
)


async def _events(redis_client) -> list[dict]:
    return [json.loads(e.to_json()) for _, e in await EventLog(redis_client).recent(10_000)]


async def _sent_already(redis_client, user_id: str, count: int) -> None:
    """``count`` sends delivered this month already (used == delivered: none in flight)."""
    await redis_client.hset(keys.usage(user_id, "2026-11"),
                            mapping={"used": count, "delivered": count})


async def _send_one(app, i: int, login: str = "smartplans") -> bool:
    try:
        async with smtp_client(app, login=login) as client:
            errors, _ = await client.sendmail("agent@kw.test", [f"r{i}@example.test"],
                                              message())
        return not errors
    except (aiosmtplib.SMTPRecipientsRefused, aiosmtplib.SMTPDataError):
        # SmartPlans are decided at the end of DATA: over the limit, DATA gets the 550.
        return False


async def test_thresholds_fire_once_under_concurrency_on_two_relays(
        make_relay: RelayFactory, upstream, accounts, redis_client, redis_server):
    """Limit 50, 20 used: 40 concurrent sends on two relay instances cross 80/85/90/95 and
    reach 100 %; each threshold event appears exactly once, and exactly 30 sends go out."""
    user = await add_user(accounts, limit=50)
    await add_app(accounts)
    await _sent_already(redis_client, user.id, 20)
    other = connect_redis(redis_server.url, timeout=2)
    try:
        first = await make_relay(upstream=upstream)
        second = await make_relay(upstream=upstream, redis=other)
        results = await asyncio.gather(*(_send_one(first if i % 2 else second, i)
                                         for i in range(40)))
    finally:
        await other.aclose()
    assert sum(results) == 30
    found = await _events(redis_client)
    thresholds = sorted(e["percent"] for e in found if e["kind"] == "quota.threshold")
    assert thresholds == [80, 85, 90, 95]
    reached = [e for e in found if e["kind"] == "quota.reached"]
    assert len(reached) == 1 and reached[0]["used"] == 50 and reached[0]["limit"] == 50
    rejected = [e for e in found if e["kind"] == "quota.rejected"]
    assert len(rejected) == 10
    assert all(e["app"] == "smartplans" and e["sender"] == "agent@kw.test"
               and e["recipient"].endswith("@example.test") and e["smtp_code"] == 550
               for e in rejected)
    crossing = {e["percent"]: e for e in found if e["kind"] == "quota.threshold"}
    assert crossing[80]["used"] == 40 and crossing[95]["used"] == 48
    assert crossing[80]["email"] == "agent@kw.test"
    assert crossing[80]["resets_on"] == "December 1, 2026"


async def test_thresholds_rearm_after_an_upgrade(relay, upstream, accounts, redis_client,
                                                 clock: MutableClock):
    """4,500 of 5,000 notified up to 90 %; after upgrading to 10,000 the 80 % alert fires
    again at 8,000, and not before."""
    user = await add_user(accounts, plan="free")
    await _sent_already(redis_client, user.id, 4499)
    async with smtp_client(relay) as client:
        await client.sendmail("agent@kw.test", ["a@example.test"], message())  # 4,500: 90 %
    admin = Admin(redis_client, relay.policies, clock, "UTC")
    change = await admin.change_plan(user.id, "plus", by="billing")
    assert (change["outcome"], change["new_limit"]) == ("upgrade", 10_000)
    await _sent_already(redis_client, user.id, 7998)
    async with smtp_client(relay) as client:
        await client.sendmail("agent@kw.test", ["b@example.test"], message())  # 7,999: 79.99 %
        await client.sendmail("agent@kw.test", ["c@example.test"], message())  # 8,000: 80 %
    found = await _events(redis_client)
    crossings = [(e["limit"], e["percent"], e["used"]) for e in found
                 if e["kind"] == "quota.threshold"]
    assert crossings == [(5000, 90, 4500), (10_000, 80, 8000)]
    assert [e["kind"] for e in found].count("plan.changed") == 1
    report = await admin.usage(user.id)
    assert report["thresholds_notified"] == [80]


async def test_thresholds_a_jump_reports_only_the_highest(relay, upstream, accounts,
                                                          redis_client):
    """A count that jumps past several thresholds at once (a downgrade took effect, say)
    yields one event, for the highest; the lower ones never fire later this month."""
    user = await add_user(accounts, limit=100)
    await _sent_already(redis_client, user.id, 92)
    async with smtp_client(relay) as client:
        await client.sendmail("agent@kw.test", ["a@example.test", "b@example.test"], message())
    found = [e for e in await _events(redis_client) if e["kind"] == "quota.threshold"]
    assert [(e["percent"], e["used"]) for e in found] == [(90, 94)]


async def test_thresholds_event_failure_never_changes_the_reply(relay, upstream, accounts,
                                                                redis_client):
    """The SMTP reply does not wait on or depend on the event stream: with the stream key
    made unwritable (wrong type), the send still succeeds and the failure is logged."""
    from structlog.testing import capture_logs

    user = await add_user(accounts, limit=10)
    await _sent_already(redis_client, user.id, 7)
    await redis_client.set(keys.events(), "not a stream")
    with capture_logs() as logs:
        async with smtp_client(relay) as client:
            errors, _ = await client.sendmail("agent@kw.test", ["a@example.test"], message())
    assert errors == {}
    failed = [e for e in logs if e["event"] == "event.publish_failed"]
    assert len(failed) == 1 and json.loads(failed[0]["event_json"])["percent"] == 80


async def test_thresholds_a_refused_send_crosses_nothing(relay, upstream, accounts,
                                                         redis_client):
    """Limit 20, 15 sent: the 16th is refused by the upstream at DATA (reserved, then
    refunded): no 80 % notice for it. The next 16th, delivered, gets it, naming 16."""
    user = await add_user(accounts, limit=20)
    await _sent_already(redis_client, user.id, 15)
    upstream.behaviour.data_reply = "554 5.6.0 Message refused"
    async with smtp_client(relay) as client:
        with pytest.raises(aiosmtplib.SMTPDataError):
            await client.sendmail("agent@kw.test", ["a@example.test"], message())
    assert [e for e in await _events(redis_client) if e["kind"] == "quota.threshold"] == []
    upstream.behaviour.data_reply = None
    async with smtp_client(relay) as client:
        await client.sendmail("agent@kw.test", ["b@example.test"], message())
    found = [e for e in await _events(redis_client) if e["kind"] == "quota.threshold"]
    assert [(e["percent"], e["used"], e["limit"]) for e in found] == [(80, 16, 20)]
    usage = await relay.quota.usage(user.id, "2026-11")
    assert (usage.used, usage.delivered, usage.notified) == (16, 16, {20: (80,)})
