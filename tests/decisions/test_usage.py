"""Usage reports (usage.py through Admin): the numbers ``usage`` prints and the admin API
returns, for one user and for all of them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from relay.admin.operations import Admin, AdminError
from relay.cli.usage import format_report
from relay.config.policies import load_policies
from relay.decisions.quota import QuotaStore
from relay.decisions.usage import usage_report, user_period
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
)

POLICY = load_policies(POLICIES)


def make_admin(redis_client: aioredis.Redis, clock: MutableClock) -> Admin:
    return Admin(redis_client, POLICY, clock, "UTC")


async def seed(redis_client: aioredis.Redis, user_id: str, period: str,
               **fields: int) -> None:
    """Write a usage hash as reserve.lua/commit.lua would (n_<limit>_<p> -> n:<limit>:<p>)."""
    mapping = {name.replace("_", ":") if name.startswith("n_") else name: value
               for name, value in fields.items()}
    await redis_client.hset(keys.usage(user_id, period), mapping=mapping)


async def test_usage_report_has_every_field(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """Plan, limit, used, delivered, in flight, remaining, percent, reset, thresholds of the
    current limit, the pending change, the forecast and six previous months (each with its
    plan and limit: none recorded here, so today's, said so), exactly."""
    user = await add_user(accounts, plan="plus")
    admin = make_admin(redis_client, clock)
    assert (await admin.change_plan(user.id, "free", by="billing"))["outcome"] == "downgrade"
    await seed(redis_client, user.id, "2026-11", used=8600, delivered=8500, n_5000_80=4000,
               n_5000_85=4250, n_5000_90=4500, n_10000_80=8000, n_10000_85=8500)
    await seed(redis_client, user.id, "2026-10", used=4000, delivered=4000)
    await seed(redis_client, user.id, "2026-08", used=12, delivered=10)
    await seed(redis_client, user.id, "2026-05", used=1, delivered=1)
    await seed(redis_client, user.id, "2026-04", used=999, delivered=999)  # 7 months back
    await seed(redis_client, user.id, "2026-12", used=7, delivered=7)  # the future

    report = await admin.usage("agent@kw.test")
    plus = {"plan": "plus", "custom_limit": None, "limit": 10_000, "terms_source": "fallback"}
    assert report == {
        "user_id": user.id, "email": "agent@kw.test", "status": "active",
        "plan": "plus", "custom_limit": None, "limit": 10_000, "terms_source": "in_force",
        "period": "2026-11", "tz": "UTC",
        "used": 8600, "delivered": 8500, "in_flight": 100, "routes": {},
        "remaining": 1400, "percent": 86.0,
        "resets_at": "2026-12-01T00:00:00+00:00",
        "thresholds_notified": [80, 85],
        "pending_change": {"plan": "free", "custom_limit": None, "effective_from": "2026-12"},
        # 8,500 delivered in 14.5 days: 10,000 after 14.5 * 10,000 / 8,500 days = 17 d 1:24:42.
        "forecast": {"limit": 10_000, "reaches_at": "2026-11-18T01:24:42+00:00",
                     "date": "2026-11-18",
                     "text": "At this pace you will reach your 10,000-send limit around "
                             "November 18."},
        "history": [
            {"period": "2026-10", "used": 4000, "delivered": 4000, "routes": {}} | plus,
            {"period": "2026-09", "used": 0, "delivered": 0, "routes": {}} | plus,
            {"period": "2026-08", "used": 12, "delivered": 10, "routes": {}} | plus,
            {"period": "2026-07", "used": 0, "delivered": 0, "routes": {}} | plus,
            {"period": "2026-06", "used": 0, "delivered": 0, "routes": {}} | plus,
            {"period": "2026-05", "used": 1, "delivered": 1, "routes": {}} | plus,
        ],
    }


async def test_usage_pending_change_shows_only_before_its_month(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """From the pending change's month on, the report shows its terms and no pending change;
    before it, the old terms and the pending change."""
    user = await add_user(accounts, plan="pro")
    admin = make_admin(redis_client, clock)
    await admin.change_plan(user.id, "plus", custom_limit=1234, by="billing")
    await seed(redis_client, user.id, "2026-12", used=617, delivered=617)
    pending = {"plan": "plus", "custom_limit": 1234, "effective_from": "2026-12"}

    november = await admin.usage(user.id)
    assert (november["plan"], november["limit"], november["pending_change"]) == (
        "pro", 25_000, pending)
    october = await admin.usage(user.id, "2026-10")
    assert (october["plan"], october["limit"], october["pending_change"]) == (
        "pro", 25_000, pending)
    december = await admin.usage(user.id, "2026-12")
    assert (december["plan"], december["custom_limit"], december["limit"]) == (
        "plus", 1234, 1234)
    assert (december["used"], december["remaining"], december["percent"]) == (617, 617, 50.0)
    assert december["pending_change"] is None

    clock.current = datetime(2027, 1, 3, tzinfo=UTC)
    january = await admin.usage(user.id)
    assert (january["period"], january["plan"], january["limit"]) == ("2027-01", "plus", 1234)
    assert january["pending_change"] is None
    # December's terms were recorded by the change that scheduled them.
    assert january["history"][0] == {"period": "2026-12", "used": 617, "delivered": 617,
                                      "routes": {}, "plan": "plus", "custom_limit": 1234,
                                      "limit": 1234, "terms_source": "recorded"}


@pytest.mark.parametrize(("plan", "custom", "used", "limit", "remaining", "percent"), [
    ("free", None, 0, 5000, 5000, 0.0),
    ("free", None, 1234, 5000, 3766, 24.7),
    ("free", 3, 1, 3, 2, 33.3),
    ("team", None, 50_000, 50_000, 0, 100.0),
    ("free", 100, 120, 100, 0, 120.0),
    ("gold", None, 5, None, None, None),
    ("gold", 40, 5, 40, 35, 12.5),
])
async def test_usage_report_limit_remaining_and_percent(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock, plan: str,
        custom: int | None, used: int, limit: int | None, remaining: int | None,
        percent: float | None) -> None:
    """Remaining never goes below 0, percent has one decimal, an unknown plan has no limit."""
    user = await add_user(accounts, plan=plan, limit=custom)
    await seed(redis_client, user.id, "2026-11", used=used, delivered=used)
    report = await make_admin(redis_client, clock).usage(user.id)
    assert (report["limit"], report["remaining"], report["percent"]) == (
        limit, remaining, percent)
    assert report["custom_limit"] == custom


async def test_usage_thresholds_notified_are_those_of_the_current_limit(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, clock: MutableClock) -> None:
    """Sends through the relay mark 80/85/90 % of a limit of 10; after an upgrade to 20 the
    report lists none of them (they belong to the old limit)."""
    user = await add_user(accounts, limit=10)
    async with smtp_client(relay) as client:
        for i in range(9):
            errors, _ = await client.sendmail("agent@kw.test", [f"r{i}@example.test"],
                                              message())
            assert errors == {}
    admin = make_admin(redis_client, clock)
    report = await admin.usage(user.id)
    assert (report["used"], report["delivered"], report["in_flight"]) == (9, 9, 0)
    assert report["thresholds_notified"] == [80, 85, 90]
    assert "notified at 80%, 85%, 90%" in format_report(report)

    await admin.change_plan(user.id, "free", custom_limit=20, by="billing")
    report = await admin.usage(user.id)
    assert (report["limit"], report["percent"], report["thresholds_notified"]) == (20, 45.0, [])
    assert "notified" not in format_report(report)
    assert (await QuotaStore(redis_client).usage(user.id, "2026-11")).notified == {
        10: (80, 85, 90)}


async def test_usage_months_are_the_users_own(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """At 2026-12-01 03:00 UTC a Chicago user is still in November, resetting at local
    midnight; a user with a zone that no longer exists falls back to the default zone."""
    clock.current = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
    chicago = await add_user(accounts, "chi@kw.test", tz="America/Chicago")
    await seed(redis_client, chicago.id, "2026-11", used=3, delivered=3)
    admin = make_admin(redis_client, clock)
    report = await admin.usage(chicago.id)
    assert (report["period"], report["tz"], report["used"]) == (
        "2026-11", "America/Chicago", 3)
    assert report["resets_at"] == "2026-12-01T00:00:00-06:00"

    lost = await add_user(accounts, "lost@kw.test", tz="Mars/Olympus_Mons")
    assert (await admin.usage(lost.id))["period"] == "2026-12"


@pytest.mark.parametrize("period", ["2026-13", "Nov", "2026/11", "", "26-11"])
async def test_usage_rejects_a_bad_period(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock,
        period: str) -> None:
    """A period that is not YYYY-MM is an AdminError (400) saying what is expected."""
    await add_user(accounts)
    with pytest.raises(AdminError, match="period must look like YYYY-MM") as raised:
        await make_admin(redis_client, clock).usage("agent@kw.test", period)
    assert not raised.value.not_found


async def test_usage_rejects_an_unknown_user(
        redis_client: aioredis.Redis, clock: MutableClock) -> None:
    """usage of nobody is AdminError with not_found (404)."""
    with pytest.raises(AdminError) as raised:
        await make_admin(redis_client, clock).usage("nobody@kw.test")
    assert raised.value.not_found
    assert "no user 'nobody@kw.test'" in str(raised.value)


async def test_usage_report_history_length_is_a_parameter(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """usage_report(history=N) lists N previous months across a year boundary."""
    user = await add_user(accounts)
    await seed(redis_client, user.id, "2025-12", used=5, delivered=5)
    now = datetime(2026, 2, 10, tzinfo=UTC)
    period = user_period(user, now, "UTC")
    report = await usage_report(user, period, quota=QuotaStore(redis_client), policies=POLICY,
                                now=now, history=3)
    free = {"routes": {}, "plan": "free", "custom_limit": None, "limit": 5000,
            "terms_source": "fallback"}
    assert report["history"] == [{"period": "2026-01", "used": 0, "delivered": 0} | free,
                                 {"period": "2025-12", "used": 5, "delivered": 5} | free,
                                 {"period": "2025-11", "used": 0, "delivered": 0} | free]


async def test_usage_all_is_sorted_by_percent_descending(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """usage_all lists every user's current month, highest percentage first (ties and
    unknown limits by email), without history."""
    rows: list[tuple[str, str, int | None, int]] = [
        ("b-plus@kw.test", "plus", None, 1000),        # 10 %
        ("a-free@kw.test", "free", None, 4500),        # 90 %
        ("e-pro@kw.test", "pro", None, 0),             # 0 %
        ("c-custom@kw.test", "free", 10, 10),          # 100 %
        ("d-gold@kw.test", "gold", None, 5),           # no limit
        ("f-team@kw.test", "team", None, 25_000),      # 50 %
    ]
    for email, plan, custom, used in rows:
        user = await add_user(accounts, email, plan=plan, limit=custom)
        await seed(redis_client, user.id, "2026-11", used=used, delivered=used)
    reports = await make_admin(redis_client, clock).usage_all()
    assert [(r["email"], r["percent"]) for r in reports] == [
        ("c-custom@kw.test", 100.0), ("a-free@kw.test", 90.0), ("f-team@kw.test", 50.0),
        ("b-plus@kw.test", 10.0), ("d-gold@kw.test", None), ("e-pro@kw.test", 0.0)]
    assert all(r["history"] == [] and r["period"] == "2026-11" for r in reports)


async def test_usage_all_of_no_users_is_empty(
        redis_client: aioredis.Redis, clock: MutableClock) -> None:
    """With no users, usage_all is an empty list."""
    assert await make_admin(redis_client, clock).usage_all() == []


def _month(period: str, used: int, delivered: int, plan: str = "plus",
           limit: int | None = 10_000, source: str = "recorded") -> dict[str, Any]:
    return {"period": period, "used": used, "delivered": delivered, "routes": {},
            "plan": plan, "custom_limit": None, "limit": limit, "terms_source": source}


def _report(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "user_id": "u-1", "email": "agent@kw.test", "status": "active", "plan": "plus",
        "custom_limit": None, "limit": 10_000, "terms_source": "in_force",
        "period": "2026-11", "tz": "UTC",
        "used": 8600, "delivered": 8500, "in_flight": 100, "routes": {}, "remaining": 1400,
        "percent": 86.0, "resets_at": "2026-12-01T00:00:00+00:00",
        "thresholds_notified": [80, 85],
        "pending_change": {"plan": "free", "custom_limit": None, "effective_from": "2026-12"},
        "forecast": None,
        "history": [_month("2026-10", 4000, 4000), _month("2026-09", 0, 0),
                    _month("2026-08", 12, 10, "free", 5000)],
    }
    return base | changes


def test_usage_format_report_mentions_everything_an_operator_needs() -> None:
    """The text form names the plan, the count, the reset, the thresholds notified, what is
    in flight, the pending change and the non-empty past months."""
    assert format_report(_report()).splitlines() == [
        "agent@kw.test (u-1), plan plus, active",
        "  2026-11 (UTC): used 8,600 of 10,000 (86.0%), 1,400 remaining",
        "  resets 2026-12-01T00:00:00+00:00",
        "  notified at 80%, 85%",
        "  100 reserved, not yet confirmed delivered",
        "  pending: plan free from 2026-12",
        "  history: 2026-10 4,000 of 10,000 (plus), 2026-08 12 of 5,000 (free)",
    ]


def test_usage_format_report_forecast_and_terms_not_on_record() -> None:
    """The forecast's sentence has a line of its own; a month whose terms were not recorded
    says so (the report's month in words, a past one with a star and a footnote)."""
    sentence = "At this pace you will reach your 10,000-send limit around November 18."
    lines = format_report(_report(
        forecast={"limit": 10_000, "reaches_at": "2026-11-18T01:24:42+00:00",
                  "date": "2026-11-18", "text": sentence},
        history=[_month("2026-10", 4000, 4000),
                 _month("2026-09", 3, 3, "gold", None, "fallback")])).splitlines()
    assert f"  {sentence}" in lines
    assert lines[-2:] == ["  history: 2026-10 4,000 of 10,000 (plus), 2026-09 3 of ? (gold*)",
                          "  * no plan recorded for that month: today's terms shown"]
    august = format_report(_report(period="2026-08", terms_source="fallback", history=[]))
    assert "  no plan recorded for 2026-08: today's terms shown" in august.splitlines()
    assert "no plan recorded" not in format_report(_report())


def test_usage_format_report_custom_limits_and_unknown_plans() -> None:
    """Custom limits (current and pending) are shown; an unknown plan's limit is '?'; lines
    with nothing to say are left out."""
    text = format_report(_report(
        custom_limit=1500, pending_change={"plan": "free", "custom_limit": 1200,
                                           "effective_from": "2026-12"}))
    assert "plan plus (custom limit 1,500), active" in text
    assert "  pending: plan free (custom limit 1,200) from 2026-12" in text.splitlines()
    bare = format_report(_report(plan="gold", limit=None, percent=None, remaining=None,
                                 used=5, delivered=5, in_flight=0, thresholds_notified=[],
                                 pending_change=None, history=[]))
    assert bare.splitlines() == [
        "agent@kw.test (u-1), plan gold, active",
        "  2026-11 (UTC): used 5 of ? (plan not in plans.toml)",
        "  resets 2026-12-01T00:00:00+00:00",
    ]


async def test_usage_format_report_of_a_real_pending_downgrade(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock) -> None:
    """After plan cancel, the printed report says which plan comes and from when."""
    user = await add_user(accounts, plan="team")
    admin = make_admin(redis_client, clock)
    await admin.cancel_plan(user.id, by="billing")
    text = format_report(await admin.usage(user.id))
    assert "plan team, active" in text
    assert "  pending: plan free from 2026-12" in text.splitlines()
