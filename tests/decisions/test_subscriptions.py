"""Plan changes (plan_change.lua through SubscriptionStore and Admin): upgrades at once,
downgrades and cancellations at the user's next month, the audit trail, and what the SMTP
path sees while a change races with sends."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from datetime import UTC, datetime
from typing import Any

import aiosmtplib
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from relay.admin.operations import Admin, AdminError
from relay.config.policies import load_policies
from relay.config.zones import zone
from relay.decisions.months import period_at
from relay.decisions.quota import QuotaStore, ReserveStatus
from relay.decisions.subscriptions import PlanChangeError, SubscriptionStore, terms_in_force
from relay.events.stream import EventLog
from relay.identity.accounts import AccountStore, User
from relay.process.wiring import RelayApp
from relay.store import keys
from tests.conftest import (
    PASSWORD,
    POLICIES,
    CapturingUpstream,
    MutableClock,
    RelayFactory,
    add_app,
    add_user,
    message,
    smtp_client,
)

POLICY = load_policies(POLICIES)
LIMITS = POLICY.plan_limits()
NOV, DEC, JAN = "2026-11", "2026-12", "2027-01"


def make_admin(redis_client: aioredis.Redis, clock: MutableClock) -> Admin:
    return Admin(redis_client, POLICY, clock, "UTC")


async def limit_at(redis_client: aioredis.Redis, user_id: str, period: str) -> int | None:
    """The limit reserve.lua applies in ``period`` (one unit taken), None for an unknown plan."""
    quota = QuotaStore(redis_client)
    result = await quota.reserve(user_id, period, f"probe-{secrets.token_hex(4)}", 1, LIMITS)
    if result.status is ReserveStatus.UNKNOWN_PLAN:
        return None
    assert result.status in (ReserveStatus.RESERVED, ReserveStatus.OVER_LIMIT), result
    return result.limit


async def reload(accounts: AccountStore, user_id: str) -> User:
    user = await accounts.get_user(user_id)
    assert user is not None
    return user


async def plan_events(redis_client: aioredis.Redis) -> list[dict[str, Any]]:
    return [json.loads(e.to_json()) for _, e in await EventLog(redis_client).recent(1000)
            if e.kind == "plan.changed"]


# -- the rules -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("start_plan", "start_limit", "new_plan", "new_limit", "outcome", "effective_from",
     "old_limit", "expected_new_limit", "nov_limit", "dec_limit"), [
        ("free", None, "plus", None, "upgrade", NOV, 5000, 10_000, 10_000, 10_000),
        ("plus", None, "free", None, "downgrade", DEC, 10_000, 5000, 10_000, 5000),
        ("free", 10_000, "plus", None, "change", NOV, 10_000, 10_000, 10_000, 10_000),
        ("plus", None, "plus", None, "unchanged", NOV, 10_000, 10_000, 10_000, 10_000),
        ("free", None, "free", 8000, "upgrade", NOV, 5000, 8000, 8000, 8000),
        ("plus", 8000, "plus", 6000, "downgrade", DEC, 8000, 6000, 8000, 6000),
        ("plus", 8000, "plus", None, "upgrade", NOV, 8000, 10_000, 10_000, 10_000),
        ("pro", None, "team", 100, "downgrade", DEC, 25_000, 100, 25_000, 100),
        ("free", 300, "free", 300, "unchanged", NOV, 300, 300, 300, 300),
    ])
async def test_subscriptions_change_cases(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock,
        start_plan: str, start_limit: int | None, new_plan: str, new_limit: int | None,
        outcome: str, effective_from: str, old_limit: int, expected_new_limit: int,
        nov_limit: int, dec_limit: int) -> None:
    """Each change gets its outcome and month; reserve.lua sees the right limit in each month."""
    user = await add_user(accounts, plan=start_plan, limit=start_limit)
    admin = make_admin(redis_client, clock)
    result = await admin.change_plan(user.id, new_plan, custom_limit=new_limit, by="billing")
    assert result == {"user_id": user.id, "email": "agent@kw.test", "outcome": outcome,
                      "effective_from": effective_from, "old_plan": start_plan,
                      "old_limit": old_limit, "new_plan": new_plan,
                      "new_limit": expected_new_limit, "by": "billing"}
    assert await limit_at(redis_client, user.id, NOV) == nov_limit
    assert await limit_at(redis_client, user.id, DEC) == dec_limit
    stored = await reload(accounts, user.id)
    if outcome == "downgrade":
        assert (stored.plan, stored.custom_limit) == (start_plan, start_limit)
        assert stored.pending is not None
        assert (stored.pending.plan, stored.pending.custom_limit,
                stored.pending.effective_from) == (new_plan, new_limit, DEC)
    else:
        assert (stored.plan, stored.custom_limit, stored.pending) == (new_plan, new_limit, None)
    published = await plan_events(redis_client)
    assert len(published) == (0 if outcome == "unchanged" else 1)
    for event in published:
        assert (event["outcome"], event["new_limit"], event["by"]) == (
            outcome, expected_new_limit, "billing")
    assert await redis_client.xlen(keys.audit(user.id)) == 1


async def test_subscriptions_cancel_is_a_pending_downgrade_to_the_default_plan(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """cancel_plan on a paid plan schedules the default plan for the next month."""
    user = await add_user(accounts, plan="pro")
    result = await make_admin(redis_client, clock).cancel_plan("agent@kw.test", by="billing")
    assert (result["outcome"], result["new_plan"], result["effective_from"]) == (
        "downgrade", POLICY.default_plan, DEC)
    assert await limit_at(redis_client, user.id, NOV) == 25_000
    assert await limit_at(redis_client, user.id, DEC) == 5000
    pending = (await reload(accounts, user.id)).pending
    assert pending is not None and pending.plan == "free" and pending.effective_from == DEC


@pytest.mark.parametrize(("plan", "custom_limit", "text"), [
    ("gold", None, "unknown plan 'gold'; plans: free, plus, pro, team"),
    ("gold", 100, "unknown plan 'gold'"),
    ("plus", 0, "the custom limit must be a positive integer"),
    ("plus", -3, "the custom limit must be a positive integer"),
])
async def test_subscriptions_refuses_a_bad_plan(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock, plan: str,
        custom_limit: int | None, text: str) -> None:
    """An unknown plan or a non-positive limit is an AdminError (400), and nothing changes."""
    user = await add_user(accounts, plan="plus")
    before = await redis_client.hgetall(keys.user(user.id))
    with pytest.raises(AdminError) as raised:
        await make_admin(redis_client, clock).change_plan(user.id, plan,
                                                          custom_limit=custom_limit, by="x")
    assert text in str(raised.value)
    assert not raised.value.not_found
    assert await redis_client.hgetall(keys.user(user.id)) == before
    assert await redis_client.xlen(keys.audit(user.id)) == 0
    assert await plan_events(redis_client) == []


async def test_subscriptions_refuses_an_unknown_user(
        redis_client: aioredis.Redis, clock: MutableClock) -> None:
    """Changing the plan of nobody is AdminError with not_found (404), for set and cancel."""
    admin = make_admin(redis_client, clock)
    with pytest.raises(AdminError, match=re.escape("no user 'nobody@kw.test'")) as raised:
        await admin.change_plan("nobody@kw.test", "plus", by="billing")
    assert raised.value.not_found
    with pytest.raises(AdminError, match=re.escape("no user 'u-missing'")) as raised:
        await admin.cancel_plan("u-missing", by="billing")
    assert raised.value.not_found
    assert await plan_events(redis_client) == []


async def test_subscriptions_store_refuses_a_vanished_user(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """A user deleted between lookup and change: the script writes nothing, nothing audited."""
    user = await add_user(accounts)
    await redis_client.delete(keys.user(user.id))
    with pytest.raises(PlanChangeError, match=f"no user {user.id}"):
        await SubscriptionStore(redis_client).change_plan(
            user, "plus", custom_limit=None, by="x", now=clock.now(),
            period=period_at(clock.now(), zone("UTC")), policies=POLICY)
    assert await redis_client.exists(keys.user(user.id), keys.audit(user.id)) == 0


# -- end to end: what the SMTP path sees ----------------------------------------------------
async def test_subscriptions_upgrade_unblocks_the_next_recipient_on_the_same_connection(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, clock: MutableClock) -> None:
    """At 5,000 of 5,000 a RCPT gets 550; after an upgrade mid-transaction the next RCPT of
    the same transaction is accepted, and the refused one never reaches the upstream."""
    user = await add_user(accounts, plan="free")
    await redis_client.hset(keys.usage(user.id, NOV), mapping={"used": 5000,
                                                              "delivered": 5000})
    async with smtp_client(relay) as client:
        await client.mail("agent@kw.test")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt("blocked@example.test")
        assert refused.value.code == 550
        assert ("Monthly Command Email limit reached (5000 of 5000 sends used); the limit "
                "resets on December 1, 2026") in refused.value.message

        change = await make_admin(redis_client, clock).change_plan(user.id, "plus",
                                                                    by="billing")
        assert change["outcome"] == "upgrade"

        accepted = await client.rcpt("next@example.test")
        assert accepted.code == 250
        assert (await client.data(message(to="next@example.test"))).code == 250
    assert [m.rcpt_tos for m in upstream.messages] == [["next@example.test"]]
    assert "blocked@example.test" not in upstream.handler.rcpt_seen
    usage = await QuotaStore(redis_client).usage(user.id, NOV)
    assert (usage.used, usage.delivered) == (5001, 5001)


async def test_subscriptions_downgrade_while_over_the_new_limit(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, clock: MutableClock) -> None:
    """7,000 used on plus, downgraded to free: November still allows up to 10,000; on
    December 1 the month starts at 0 against 5,000, and the 5,001st send is refused."""
    user = await add_user(accounts, plan="plus")
    await redis_client.hset(keys.usage(user.id, NOV), mapping={"used": 7000,
                                                              "delivered": 7000})
    admin = make_admin(redis_client, clock)
    change = await admin.change_plan(user.id, "free", by="billing")
    assert (change["outcome"], change["effective_from"]) == ("downgrade", DEC)
    with capture_logs() as logs:
        async with smtp_client(relay) as client:
            errors, _ = await client.sendmail("agent@kw.test", ["nov@example.test"], message())
    assert errors == {}
    accepted = [e for e in logs if e["event"] == "rcpt.accepted"]
    assert [(e["used"], e["limit"]) for e in accepted] == [(7001, 10_000)]

    clock.current = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
    report = await admin.usage(user.id)
    assert (report["period"], report["plan"], report["limit"], report["used"]) == (
        DEC, "free", 5000, 0)
    assert report["pending_change"] is None
    await redis_client.hset(keys.usage(user.id, DEC), mapping={"used": 4999,
                                                              "delivered": 4999})
    async with smtp_client(relay) as client:
        errors, _ = await client.sendmail("agent@kw.test", ["dec@example.test"], message())
        assert errors == {}
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await client.sendmail("agent@kw.test", ["over@example.test"], message())
    reply = refused.value.recipients[0]
    assert reply.code == 550
    assert "(5000 of 5000 sends used); the limit resets on January 1, 2027" in reply.message
    assert (await QuotaStore(redis_client).usage(user.id, NOV)).used == 7001
    assert (await QuotaStore(redis_client).usage(user.id, DEC)).used == 5000
    assert [m.rcpt_tos for m in upstream.messages] == [["nov@example.test"],
                                                       ["dec@example.test"]]


async def test_subscriptions_upgrade_cancels_a_pending_downgrade(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """plus -> free is pending for December; an upgrade to pro applies now and drops it."""
    user = await add_user(accounts, plan="plus")
    admin = make_admin(redis_client, clock)
    assert (await admin.change_plan(user.id, "free", by="a"))["outcome"] == "downgrade"
    change = await admin.change_plan(user.id, "pro", by="b")
    assert (change["outcome"], change["effective_from"], change["old_plan"],
            change["old_limit"]) == ("upgrade", NOV, "plus", 10_000)
    assert (await reload(accounts, user.id)).pending is None
    assert await limit_at(redis_client, user.id, NOV) == 25_000
    assert await limit_at(redis_client, user.id, DEC) == 25_000


async def test_subscriptions_setting_the_current_plan_cancels_a_pending_downgrade(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """Re-choosing the plan in force is "unchanged", drops the pending downgrade, publishes
    nothing, and is still audited."""
    user = await add_user(accounts, plan="plus")
    admin = make_admin(redis_client, clock)
    await admin.cancel_plan(user.id, by="a")
    assert (await reload(accounts, user.id)).pending is not None
    change = await admin.change_plan(user.id, "plus", by="b")
    assert (change["outcome"], change["effective_from"]) == ("unchanged", NOV)
    assert (await reload(accounts, user.id)).pending is None
    assert await limit_at(redis_client, user.id, DEC) == 10_000
    assert [e["outcome"] for e in await plan_events(redis_client)] == ["downgrade"]
    assert [e["outcome"] for e in await admin.plan_history(user.id)] == ["downgrade",
                                                                         "unchanged"]


async def test_subscriptions_due_pending_change_is_kept_when_a_new_one_is_scheduled(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """pro -> plus pending for December; in December a downgrade to free keeps plus for
    December (the due change is promoted, not lost) and schedules free for January."""
    user = await add_user(accounts, plan="pro")
    admin = make_admin(redis_client, clock)
    first = await admin.change_plan(user.id, "plus", by="a")
    assert (first["outcome"], first["effective_from"]) == ("downgrade", DEC)

    clock.current = datetime(2026, 12, 10, 9, 0, tzinfo=UTC)
    second = await admin.change_plan(user.id, "free", by="b")
    assert (second["outcome"], second["effective_from"], second["old_plan"],
            second["old_limit"]) == ("downgrade", JAN, "plus", 10_000)
    stored = await reload(accounts, user.id)
    assert (stored.plan, stored.custom_limit) == ("plus", None)
    assert stored.pending is not None
    assert (stored.pending.plan, stored.pending.effective_from) == ("free", JAN)
    assert await limit_at(redis_client, user.id, DEC) == 10_000
    assert await limit_at(redis_client, user.id, JAN) == 5000


async def test_subscriptions_due_pending_change_then_an_upgrade_compares_with_it(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """In December, after pro -> free came due, choosing plus is an upgrade from free (the
    terms in force), applied at once."""
    user = await add_user(accounts, plan="pro")
    admin = make_admin(redis_client, clock)
    await admin.cancel_plan(user.id, by="a")
    clock.current = datetime(2026, 12, 2, tzinfo=UTC)
    change = await admin.change_plan(user.id, "plus", by="b")
    assert (change["outcome"], change["effective_from"], change["old_plan"],
            change["old_limit"]) == ("upgrade", DEC, "free", 5000)
    assert await limit_at(redis_client, user.id, DEC) == 10_000


@pytest.mark.parametrize(("tz", "now", "current", "following"), [
    # 2026-11-30 12:00 UTC is already 2026-12-01 01:00 in Auckland (UTC+13 in summer).
    ("Pacific/Auckland", datetime(2026, 11, 30, 12, 0, tzinfo=UTC), DEC, JAN),
    ("UTC", datetime(2026, 11, 30, 12, 0, tzinfo=UTC), NOV, DEC),
    # 2026-12-01 05:00 UTC is still 2026-11-30 21:00 in Los Angeles.
    ("America/Los_Angeles", datetime(2026, 12, 1, 5, 0, tzinfo=UTC), NOV, DEC),
])
async def test_subscriptions_months_follow_the_users_time_zone(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock, tz: str,
        now: datetime, current: str, following: str) -> None:
    """An upgrade takes effect in the user's current month and a downgrade in the user's
    next one, both computed in the user's zone."""
    clock.current = now
    admin = make_admin(redis_client, clock)
    user = await add_user(accounts, plan="plus", tz=tz)
    upgrade = await admin.change_plan(user.id, "pro", by="a")
    assert (upgrade["outcome"], upgrade["effective_from"]) == ("upgrade", current)
    downgrade = await admin.change_plan(user.id, "free", by="a")
    assert (downgrade["outcome"], downgrade["effective_from"]) == ("downgrade", following)
    assert await limit_at(redis_client, user.id, current) == 25_000
    assert await limit_at(redis_client, user.id, following) == 5000


async def test_subscriptions_auckland_user_sends_in_december_with_the_paid_limit(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, clock: MutableClock) -> None:
    """At 2026-11-30T12:00Z an Auckland user's downgrade waits for January, and a send
    counts in their December at the plus limit."""
    clock.current = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    user = await add_user(accounts, plan="plus", tz="Pacific/Auckland")
    change = await make_admin(redis_client, clock).change_plan(user.id, "free", by="a")
    assert change["effective_from"] == JAN
    with capture_logs() as logs:
        async with smtp_client(relay) as client:
            errors, _ = await client.sendmail("agent@kw.test", ["a@example.test"], message())
    assert errors == {}
    accepted = [e for e in logs if e["event"] == "rcpt.accepted"]
    assert [(e["period"], e["limit"]) for e in accepted] == [(DEC, 10_000)]
    assert (await QuotaStore(redis_client).usage(user.id, DEC)).used == 1
    assert (await QuotaStore(redis_client).usage(user.id, NOV)).used == 0


# -- a change racing with sends -------------------------------------------------------------
async def _logged_in_clients(app: RelayApp, count: int) -> list[aiosmtplib.SMTP]:
    """``count`` connections, each past EHLO and AUTH (scrypt) before the race starts."""

    async def one() -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.port, start_tls=False,
                                 local_hostname="client.test", timeout=30)
        await client.connect()
        await client.ehlo()
        # The CRM's own app: decided at RCPT, so each recipient is reserved as it arrives.
        await client.login("command", PASSWORD)
        return client

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def _until(predicate: Any, seconds: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


async def test_subscriptions_changes_in_flight_never_exceed_the_limit_in_force(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, clock: MutableClock) -> None:
    """Custom limit 20; while concurrent sends hold their units in flight (the upstream
    withholds its DATA reply), a downgrade to 10 (pending) changes nothing this month and an
    upgrade to 30 applies at once: every recipient is checked against the limit in force when
    it is reserved, exactly 30 go out, and the count equals what was accepted."""
    user = await add_user(accounts, limit=20)
    await add_app(accounts, "command")
    gate = asyncio.Event()
    upstream.behaviour.data_gate = gate
    app = await make_relay(upstream=upstream, upstream_pool_size=64, upstream_timeout=30)
    admin = make_admin(redis_client, clock)
    quota = QuotaStore(redis_client)
    clients = await _logged_in_clients(app, 45)
    refused: list[int] = []

    async def send(i: int) -> bool:
        try:
            await clients[i].sendmail("agent@kw.test", [f"r{i}@example.test"], message())
        except aiosmtplib.SMTPRecipientsRefused as exc:
            assert exc.recipients[0].code == 550
            refused.append(i)
            return False
        return True

    async def decided(count: int) -> bool:
        return len(upstream.handler.rcpt_seen) + len(refused) >= count

    async def used_at_least(count: int) -> bool:
        return (await quota.usage(user.id, NOV)).used >= count

    async def refused_at_least(count: int) -> bool:
        return len(refused) >= count

    tasks: list[asyncio.Task[bool]] = []
    try:
        with capture_logs() as logs:
            # Wave 1: 25 sends race with a downgrade to 10, which must wait for December.
            tasks += [asyncio.create_task(send(i)) for i in range(25)]
            await _until(lambda: used_at_least(5))
            down = await admin.change_plan(user.id, "free", custom_limit=10, by="billing")
            assert (down["outcome"], down["effective_from"]) == ("downgrade", DEC)
            await _until(lambda: decided(25))
            assert (len(upstream.handler.rcpt_seen), len(refused)) == (20, 5)
            assert (await quota.usage(user.id, NOV)).delivered == 0  # all still in flight

            # Wave 2: 10 sends race with an upgrade to 30, which applies at once.
            tasks += [asyncio.create_task(send(i)) for i in range(25, 35)]
            await _until(lambda: refused_at_least(7))
            up = await admin.change_plan(user.id, "free", custom_limit=30, by="billing")
            assert (up["outcome"], up["effective_from"]) == ("upgrade", NOV)
            await _until(lambda: decided(35))

            # Wave 3: after the upgrade, exactly enough get through to reach 30.
            tasks += [asyncio.create_task(send(i)) for i in range(35, 45)]
            await _until(lambda: decided(45))
            assert len(upstream.handler.rcpt_seen) == 30
            gate.set()
            results = await asyncio.gather(*tasks)
            await _until(lambda: _settled(quota, user.id))
    finally:
        gate.set()
        for client in clients:
            client.close()

    assert sum(results) == 30 and len(refused) == 15
    assert sum(len(m.rcpt_tos) for m in upstream.messages) == 30
    usage = await quota.usage(user.id, NOV)
    assert (usage.used, usage.delivered) == (30, 30)
    accepted = [e for e in logs if e["event"] == "rcpt.accepted"]
    assert len(accepted) == 30
    assert all(e["used"] <= e["limit"] and e["limit"] in (20, 30) for e in accepted)
    assert sorted(e["used"] for e in accepted) == list(range(1, 31))
    over = [e for e in logs if e["event"] == "rcpt.refused"]
    assert len(over) == 15
    assert all(e["reason"] == "QuotaExceededError" and e["used"] >= e["limit"]
               and e["limit"] in (20, 30) for e in over)
    stored = await reload_user(redis_client, user.id)
    assert (stored.custom_limit, stored.pending) == (30, None)
    assert await limit_at(redis_client, user.id, DEC) == 30


async def _settled(quota: QuotaStore, user_id: str) -> bool:
    usage = await quota.usage(user_id, NOV)
    return usage.delivered == usage.used


async def reload_user(redis_client: aioredis.Redis, user_id: str) -> User:
    return await reload(AccountStore(redis_client), user_id)


# -- the audit trail ------------------------------------------------------------------------
async def test_subscriptions_audit_trail_records_every_change_append_only(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """Each call (unchanged included) appends one entry, oldest first, with at, by, outcome,
    old, new and effective month; earlier entries are never rewritten."""
    user = await add_user(accounts, plan="free")
    admin = make_admin(redis_client, clock)
    steps: list[tuple[str, int | None, str, int]] = [
        ("plus", None, "billing", 15),
        ("plus", None, "support", 16),
        ("free", None, "billing", 17),
        ("plus", 12_000, "ops", 18),
    ]
    snapshots: list[list[Any]] = []
    for plan, custom, by, day in steps:
        clock.current = datetime(2026, 11, day, 8, 30, tzinfo=UTC)
        await admin.change_plan(user.id, plan, custom_limit=custom, by=by)
        snapshots.append(await redis_client.xrange(keys.audit(user.id)))
    for count, snapshot in enumerate(snapshots, start=1):
        assert len(snapshot) == count
        assert snapshot == snapshots[-1][:count]  # earlier entries unchanged
    assert await redis_client.xlen(keys.audit(user.id)) == 4

    history = await admin.plan_history("agent@kw.test")
    assert [{k: v for k, v in entry.items() if k != "id"} for entry in history] == [
        {"at": "2026-11-15T08:30:00+00:00", "by": "billing", "outcome": "upgrade",
         "old_plan": "free", "old_limit": 5000, "new_plan": "plus", "new_limit": 10_000,
         "effective_from": NOV},
        {"at": "2026-11-16T08:30:00+00:00", "by": "support", "outcome": "unchanged",
         "old_plan": "plus", "old_limit": 10_000, "new_plan": "plus", "new_limit": 10_000,
         "effective_from": NOV},
        {"at": "2026-11-17T08:30:00+00:00", "by": "billing", "outcome": "downgrade",
         "old_plan": "plus", "old_limit": 10_000, "new_plan": "free", "new_limit": 5000,
         "effective_from": DEC},
        {"at": "2026-11-18T08:30:00+00:00", "by": "ops", "outcome": "upgrade",
         "old_plan": "plus", "old_limit": 10_000, "new_plan": "plus", "new_limit": 12_000,
         "effective_from": NOV},
    ]
    assert [entry["id"] for entry in history] == [entry_id for entry_id, _ in snapshots[-1]]
    published = await plan_events(redis_client)
    assert [(e["outcome"], e["by"]) for e in published] == [
        ("upgrade", "billing"), ("downgrade", "billing"), ("upgrade", "ops")]
    assert published[1] | {"id": "", "at": ""} == {
        "id": "", "at": "", "kind": "plan.changed", "user_id": user.id,
        "email": "agent@kw.test", "outcome": "downgrade", "effective_from": DEC,
        "old_plan": "plus", "old_limit": 10_000, "new_plan": "free", "new_limit": 5000,
        "by": "billing"}


async def test_subscriptions_audit_trail_of_a_user_whose_plan_left_plans_toml(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """A user on a plan no longer in plans.toml (no limit) moving to a real plan is an
    upgrade applied now; the audit entry shows no old limit."""
    user = await add_user(accounts, plan="legacy")
    change = await make_admin(redis_client, clock).change_plan(user.id, "free", by="ops")
    assert (change["outcome"], change["old_plan"], change["old_limit"]) == (
        "upgrade", "legacy", None)
    [entry] = await make_admin(redis_client, clock).plan_history(user.id)
    assert (entry["old_plan"], entry["old_limit"], entry["new_limit"]) == ("legacy", None, 5000)
    assert await limit_at(redis_client, user.id, NOV) == 5000


# -- Python and Lua agree -------------------------------------------------------------------
@pytest.mark.parametrize(("record", "expected"), [
    ({"plan": "free"}, {NOV: 5000, DEC: 5000, JAN: 5000}),
    ({"plan": "pro", "limit": "77"}, {NOV: 77, DEC: 77, JAN: 77}),
    ({"plan": "plus", "limit": ""}, {NOV: 10_000, DEC: 10_000, JAN: 10_000}),
    ({"plan": "plus", "pending_plan": "free", "pending_limit": "", "pending_from": DEC},
     {NOV: 10_000, DEC: 5000, JAN: 5000}),
    ({"plan": "plus", "pending_plan": "free", "pending_limit": "", "pending_from": "2026-10"},
     {NOV: 5000, DEC: 5000, JAN: 5000}),
    ({"plan": "free", "limit": "300", "pending_plan": "team", "pending_limit": "",
      "pending_from": JAN}, {NOV: 300, DEC: 300, JAN: 50_000}),
    ({"plan": "pro", "pending_plan": "plus", "pending_limit": "123", "pending_from": DEC},
     {NOV: 25_000, DEC: 123, JAN: 123}),
    ({"plan": "gold"}, {NOV: None, DEC: None, JAN: None}),
    ({"plan": "gold", "limit": "42"}, {NOV: 42, DEC: 42, JAN: 42}),
    ({"plan": "plus", "pending_plan": "gold", "pending_limit": "", "pending_from": DEC},
     {NOV: 10_000, DEC: None, JAN: None}),
])
async def test_subscriptions_terms_in_force_agrees_with_reserve_lua(
        redis_client: aioredis.Redis, accounts: AccountStore, record: dict[str, str],
        expected: dict[str, int | None]) -> None:
    """terms_in_force (Python) and terms.lua via reserve.lua give the same limit for every
    user record and month (before, at and after a pending change's month)."""
    user = await add_user(accounts)
    await redis_client.hdel(keys.user(user.id), "plan", "limit")
    await redis_client.hset(keys.user(user.id), mapping=record)
    stored = await reload(accounts, user.id)
    for period, limit in expected.items():
        assert terms_in_force(stored, period, POLICY).limit == limit, period
        assert await limit_at(redis_client, user.id, period) == limit, period
