"""Honest history (relay/decisions/history.py): a past month reports the plan and limit that
governed it, recorded by reserve.lua (sends through a real relay) and plan_change.lua,
not today's; a month with nothing recorded falls back to today's terms and says so."""

from __future__ import annotations

from datetime import UTC, datetime

import redis.asyncio as aioredis

from relay.admin.operations import Admin
from relay.cli.usage import format_report
from relay.config.policies import load_policies
from relay.decisions.quota import QuotaStore, RecordedTerms
from relay.identity.accounts import AccountStore
from relay.process.wiring import RelayApp
from relay.store import keys
from tests.conftest import POLICIES, MutableClock, add_user, message, smtp_client

POLICY = load_policies(POLICIES)


async def send(relay: RelayApp, count: int) -> None:
    async with smtp_client(relay) as client:
        for i in range(count):
            errors, _ = await client.sendmail("agent@kw.test", [f"r{i}@example.test"],
                                              message())
            assert errors == {}


def terms(report: dict, period: str) -> tuple:
    """(plan, custom_limit, limit, terms_source) of ``period`` in a report or its history."""
    month = report if report["period"] == period else \
        next(h for h in report["history"] if h["period"] == period)
    return month["plan"], month["custom_limit"], month["limit"], month["terms_source"]


async def test_history_a_downgraded_users_past_months_keep_their_own_terms(
        relay: RelayApp, accounts: AccountStore, redis_client: aioredis.Redis,
        clock: MutableClock) -> None:
    """Plus in October (downgraded then, to free from November), free in November, then an
    upgrade to pro in December: October still reports plus and 10,000, November free and
    5,000; the user record alone would show pro for both."""
    admin = Admin(redis_client, relay.policies, clock, "UTC")
    user = await add_user(accounts, plan="plus")
    clock.current = datetime(2026, 10, 20, 9, 0, tzinfo=UTC)
    await send(relay, 2)
    assert (await admin.change_plan(user.id, "free", by="billing"))["outcome"] == "downgrade"
    clock.current = datetime(2026, 11, 10, 9, 0, tzinfo=UTC)
    await send(relay, 3)
    clock.current = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
    assert (await admin.change_plan(user.id, "pro", by="billing"))["outcome"] == "upgrade"

    december = await admin.usage(user.id)
    assert terms(december, "2026-12") == ("pro", None, 25_000, "in_force")
    assert terms(december, "2026-11") == ("free", None, 5000, "recorded")
    assert terms(december, "2026-10") == ("plus", None, 10_000, "recorded")
    october = await admin.usage(user.id, "2026-10")
    assert terms(october, "2026-10") == ("plus", None, 10_000, "recorded")
    assert (october["used"], october["remaining"], october["percent"]) == (2, 9998, 0.0)
    assert october["forecast"] is None  # a past month has no pace to project
    november = await admin.usage(user.id, "2026-11")
    assert (november["limit"], november["remaining"]) == (5000, 4997)
    text = format_report(december)
    assert "history: 2026-11 3 of 5,000 (free), 2026-10 2 of 10,000 (plus)" in text
    assert "no plan recorded" not in text
    # What reserve.lua wrote in November's hash, with the units.
    assert (await QuotaStore(redis_client).usage(user.id, "2026-11")).terms == \
        RecordedTerms("free", None, 5000)


async def test_history_a_downgraded_month_without_sends_keeps_its_terms(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """A downgrade in October records November's terms at once (plan_change.lua writes the
    current and the next month), so a November without a single send still reports free
    after a later upgrade, and October the plan it kept."""
    admin = Admin(redis_client, POLICY, clock, "UTC")
    user = await add_user(accounts, plan="team")
    clock.current = datetime(2026, 10, 3, tzinfo=UTC)
    await admin.change_plan(user.id, "plus", custom_limit=7000, by="billing")
    clock.current = datetime(2026, 12, 2, tzinfo=UTC)
    await admin.change_plan(user.id, "pro", by="billing")
    report = await admin.usage(user.id)
    assert terms(report, "2026-11") == ("plus", 7000, 7000, "recorded")
    assert terms(report, "2026-10") == ("team", None, 50_000, "recorded")
    assert terms(report, "2026-09") == ("pro", None, 25_000, "fallback")


async def test_history_an_upgrade_mid_month_reports_the_terms_the_month_ended_with(
        relay: RelayApp, accounts: AccountStore, redis_client: aioredis.Redis,
        clock: MutableClock) -> None:
    """Free until November 10, plus from then, a custom 12,000 from November 20 (no send
    after it): November, seen in December, reports its latest terms (custom 12,000); its
    thresholds are those of that limit."""
    admin = Admin(redis_client, relay.policies, clock, "UTC")
    user = await add_user(accounts, plan="free")
    clock.current = datetime(2026, 11, 5, tzinfo=UTC)
    await send(relay, 1)
    clock.current = datetime(2026, 11, 10, tzinfo=UTC)
    await admin.change_plan(user.id, "plus", by="billing")
    await send(relay, 1)
    assert terms(await admin.usage(user.id), "2026-11") == ("plus", None, 10_000, "in_force")
    clock.current = datetime(2026, 11, 20, tzinfo=UTC)
    await admin.change_plan(user.id, "plus", custom_limit=12_000, by="billing")
    await redis_client.hset(keys.usage(user.id, "2026-11"), "n:12000:80", 9600)
    clock.current = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC)
    november = await admin.usage(user.id, "2026-11")
    assert terms(november, "2026-11") == ("plus", 12_000, 12_000, "recorded")
    assert (november["used"], november["thresholds_notified"]) == (2, [80])
    # December follows the terms in force (recorded for it by the last change too).
    assert terms(await admin.usage(user.id), "2026-12") == ("plus", 12_000, 12_000,
                                                           "in_force")


async def test_history_reservations_record_terms_without_any_plan_change(
        relay: RelayApp, accounts: AccountStore, redis_client: aioredis.Redis,
        clock: MutableClock) -> None:
    """A user created with a custom limit of 300 who never changed plan: the October sends
    record it, so after a change in November October still shows 300."""
    admin = Admin(redis_client, relay.policies, clock, "UTC")
    user = await add_user(accounts, plan="free", limit=300)
    clock.current = datetime(2026, 10, 30, tzinfo=UTC)
    await send(relay, 1)
    clock.current = datetime(2026, 11, 2, tzinfo=UTC)
    await admin.change_plan(user.id, "pro", by="billing")
    report = await admin.usage(user.id)
    assert terms(report, "2026-10") == ("free", 300, 300, "recorded")
    assert terms(report, "2026-11") == ("pro", None, 25_000, "in_force")


async def test_history_a_month_with_nothing_recorded_falls_back_and_says_so(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """Counts from before the months kept their terms (no plan, limit fields): the month
    shows today's terms, marked ``fallback``, and the text says so."""
    admin = Admin(redis_client, POLICY, clock, "UTC")
    user = await add_user(accounts, plan="plus")
    await redis_client.hset(keys.usage(user.id, "2026-08"),
                            mapping={"used": 40, "delivered": 40})
    august = await admin.usage(user.id, "2026-08")
    assert terms(august, "2026-08") == ("plus", None, 10_000, "fallback")
    assert "  no plan recorded for 2026-08: today's terms shown" in \
        format_report(august).splitlines()
    text = format_report(await admin.usage(user.id))
    assert "history: 2026-08 40 of 10,000 (plus*)" in text
    assert "  * no plan recorded for that month: today's terms shown" in text.splitlines()


async def test_history_plan_change_keys_stay_in_the_users_slot(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """The usage hashes plan_change.lua writes carry the user's hash tag (one Cluster slot
    with the user and audit keys) and expire like any usage hash."""
    admin = Admin(redis_client, POLICY, clock, "UTC")
    user = await add_user(accounts, plan="plus")
    await admin.change_plan(user.id, "free", by="billing")
    written = sorted(await redis_client.keys(keys.usage(user.id, "*")))
    assert written == [keys.usage(user.id, "2026-11"), keys.usage(user.id, "2026-12")]
    tag = "{" + user.id + "}"
    assert all(tag in key for key in [*written, keys.user(user.id), keys.audit(user.id)])
    for key in written:
        assert await redis_client.ttl(key) > 300 * 24 * 3600
    assert await redis_client.hgetall(keys.usage(user.id, "2026-11")) == {
        "plan": "plus", "limit": "10000", "custom_limit": ""}
