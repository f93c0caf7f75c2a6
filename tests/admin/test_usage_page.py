"""The agent's usage page (relay/admin/usage_page.py): a signed link opens one user's figures,
in a real headless Chromium, in a narrow CRM panel and a full window; an expired or altered
link gets a 403 page."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from relay.admin.operations import Admin
from relay.admin.usage_links import LinkLifetimeError, parse_ttl, usage_link
from relay.admin.usage_page import HEADERS, UsagePage, usage_view
from relay.config.policies import load_policies
from relay.decisions.quota import QuotaStore
from relay.identity.signed_links import LinkSigner
from relay.store import keys
from tests.browser import screenshot
from tests.conftest import POLICIES, MutableClock, add_user

SIGNER = LinkSigner(b"usage-page-test-secret-0123456789")
NOW = datetime(2026, 12, 14, 15, 30, tzinfo=UTC)


class Served:
    def __init__(self, base: str, admin: Admin, clock: MutableClock) -> None:
        self.base, self.admin, self.clock = base, admin, clock


@pytest.fixture
async def served(redis_client: aioredis.Redis) -> AsyncIterator[Served]:
    clock = MutableClock(NOW)
    admin = Admin(redis_client, load_policies(POLICIES), clock, "UTC")
    app = web.Application()
    app.add_routes(UsagePage(admin, SIGNER).routes())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Served(f"http://127.0.0.1:{port}", admin, clock)
    finally:
        await runner.cleanup()


async def deliver(quota: QuotaStore, user_id: str, period: str, count: int, route: str,
                  plan_limits: list[str | int]) -> None:
    """``count`` sends through the real reserve and commit scripts."""
    txn = f"t-{period}-{route}"
    numbers = list(range(1, count + 1))
    result = await quota.reserve(user_id, period, txn, numbers, plan_limits)
    assert result.status.name == "RESERVED"
    await quota.commit(user_id, period, txn, route, plan_limits, "80 85 90 95 100", numbers)


async def known_user(admin: Admin, redis_client: aioredis.Redis) -> str:
    user = await add_user(admin.accounts, "ann@kw.test", tz="America/New_York",
                          user_id="u-ann")
    quota = QuotaStore(redis_client)
    limits = admin.policies.plan_limits()
    await deliver(quota, user.id, "2026-12", 4200, "command", limits)
    await quota.tally(user.id, "2026-12", "mailchimp", 310)
    await deliver(quota, user.id, "2026-11", 2600, "command", limits)
    await deliver(quota, user.id, "2026-09", 4999, "command", limits)
    # Three recipients refused as suppressed this month (the count reserve.lua keeps; how it
    # is kept is tested in tests/flows/test_suppression.py).
    await redis_client.hset(keys.usage(user.id, "2026-12"),
                            mapping={"suppressed": 3, "suppressed:unsubscribe": 3})
    # Someone else's figures, which the page must never show.
    other = await add_user(admin.accounts, "bob@kw.test", user_id="u-bob")
    await deliver(quota, other.id, "2026-12", 17, "command", limits)
    return user.id


def text(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By
    return str(driver.find_element(By.ID, element_id).text)


def console_errors(driver: Any, *, refused: bool = False) -> list[Any]:
    """The console's errors; for a refused link, less the page's own 403 (Chromium logs the
    status of the document it was asked for)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"
            and not (refused and entry["source"] == "network" and "status of 403" in
                     entry["message"])]


async def test_page_shows_the_users_figures_in_a_real_browser(
        served: Served, redis_client: aioredis.Redis, browser: Any) -> None:
    user_id = await known_user(served.admin, redis_client)
    url = usage_link(SIGNER, served.base, user_id, ttl=3600, now=NOW.timestamp())
    # WebDriver calls block: off the event loop, which serves the page meanwhile.
    await asyncio.to_thread(check_known_user_page, browser, url)


def check_known_user_page(browser: Any, url: str) -> None:
    for name, size in (("usage-page-panel", (380, 900)), ("usage-page-window", (1280, 1000))):
        browser.set_window_size(*size)
        browser.get(url)
        assert text(browser, "used") == "4,200"
        assert text(browser, "limit") == "5,000"
        assert text(browser, "remaining") == "800"
        assert text(browser, "percent") == "84%"
        assert text(browser, "plan") == "Free"
        # The reset in the agent's own zone: midnight of January 1 in New York.
        assert text(browser, "resets") == "January 1, 2027 at 12:00 AM"
        assert "Command Email 4,200" in text(browser, "routes")
        assert "MailChimp (not counted) 310" in text(browser, "routes")
        assert "80%" in text(browser, "notified")
        assert text(browser, "suppressed") == "3"
        history = text(browser, "history")
        # Each past month with the plan and limit that applied in it.
        assert "December 2026 Free 4,200 5,000" in history
        assert "November 2026 Free 2,600 5,000" in history
        assert "September 2026 Free 4,999 5,000" in history
        # 4,200 sends in the first 13.6 days of December: the limit comes before the reset.
        assert text(browser, "forecast") == ("At this pace you will reach your 5,000-send "
                                             "limit around December 16.")
        assert "17" not in text(browser, "this-month")  # bob's count is not here
        # Reads well in a narrow panel: nothing wider than the window.
        assert browser.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth")
        assert console_errors(browser) == []
        assert screenshot(browser, name).stat().st_size > 0


async def test_expired_and_altered_links_are_refused(served: Served,
                                                      redis_client: aioredis.Redis,
                                                      browser: Any) -> None:
    user_id = await known_user(served.admin, redis_client)
    expired = usage_link(SIGNER, served.base, user_id, ttl=60,
                         now=NOW.timestamp() - 3600)
    good = usage_link(SIGNER, served.base, user_id, ttl=3600, now=NOW.timestamp())
    await asyncio.to_thread(check_refusals, browser, expired, good)


def check_refusals(browser: Any, expired: str, good: str) -> None:
    browser.get(expired)
    assert "expired" in text(browser, "denied")
    assert "4,200" not in browser.page_source
    screenshot(browser, "usage-page-expired")
    altered = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    browser.get(altered)
    assert "not valid" in text(browser, "denied")
    assert console_errors(browser, refused=True) == []
    screenshot(browser, "usage-page-altered")


async def test_status_codes_and_headers(served: Served, redis_client: aioredis.Redis) -> None:
    import aiohttp
    user_id = await known_user(served.admin, redis_client)
    other_secret = LinkSigner(b"not-the-relays-secret-0123456789")
    async with aiohttp.ClientSession() as http:
        ok = await http.get(usage_link(SIGNER, served.base, user_id, ttl=60,
                                       now=NOW.timestamp()))
        assert ok.status == 200 and "4,200" in await ok.text()
        for header, value in HEADERS.items():
            assert ok.headers[header] == value
        for bad in (usage_link(SIGNER, served.base, user_id, ttl=1, now=0),
                    usage_link(other_secret, served.base, user_id, ttl=60,
                               now=NOW.timestamp()),
                    # A token for another purpose (an unsubscribe link) never opens the page.
                    f"{served.base}/usage/{SIGNER.sign('unsubscribe', {'u': user_id})}",
                    usage_link(SIGNER, served.base, "u-nobody", ttl=60,
                               now=NOW.timestamp())):
            refused = await http.get(bad)
            assert refused.status == 403
            assert "4,200" not in await refused.text()


def test_link_lifetimes_are_bounded() -> None:
    with pytest.raises(LinkLifetimeError):
        usage_link(SIGNER, "http://127.0.0.1:8026", "u-1", ttl=0)
    with pytest.raises(LinkLifetimeError):
        usage_link(SIGNER, "http://127.0.0.1:8026", "u-1", ttl=40 * 86400)
    assert [parse_ttl(t) for t in ("90", "90s", "30m", "12h", "7d")] == [
        90, 90, 1800, 43200, 604800]
    for bad in ("", "1w", "-5", "1.5h", "12 h"):
        with pytest.raises(LinkLifetimeError):
            parse_ttl(bad)
    assert usage_link(SIGNER, "http://127.0.0.1:8026/", "u-1").startswith(
        "http://127.0.0.1:8026/usage/")


def test_view_of_a_user_over_the_limit_with_a_pending_downgrade() -> None:
    policies = load_policies(POLICIES)
    report = {
        "email": "c@kw.test", "plan": "free", "limit": 5000, "used": 5000, "delivered": 5000,
        "in_flight": 0, "remaining": 0, "percent": 100.0, "period": "2026-12",
        "resets_at": "2027-01-01T00:00:00+00:00", "tz": "UTC", "routes": {"command": 5000},
        "thresholds_notified": [80, 85, 90, 95, 100],
        "pending_change": {"plan": "free", "custom_limit": None,
                           "effective_from": "2027-01"},
        "history": [],
    }
    view = usage_view(report, policies, NOW)
    assert view["meter_class"] == "stop" and view["bar_percent"] == 100
    assert view["pending_text"] == "Your plan changes to Free on January 2027's reset."
    assert [b.period for b in view["chart"]["bars"]] == ["2026-12"]
    assert view["notified"][-1] == "100%"
