"""``command-relay usage`` and ``plan history`` with the forecast and the months' own terms:
the real command functions run in-process, against the test redis-server, with an Admin on
the relay's settable clock (the subprocess tests in test_commands.py run on the wall clock,
where no forecast can be asserted)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from relay.admin.operations import Admin
from relay.cli.commands import ADMIN_COMMANDS
from relay.cli.parser import build_parser
from relay.config.policies import load_policies
from relay.config.settings import Settings
from relay.identity.accounts import AccountStore
from relay.store import keys
from tests.conftest import POLICIES, MutableClock, add_user

POLICY = load_policies(POLICIES)
SENTENCE = "At this pace you will reach your 5,000-send limit around November 26."


async def run(argv: list[str], settings: Settings, admin: Admin,
              capsys: pytest.CaptureFixture[str]) -> str:
    args = build_parser().parse_args(argv)
    await ADMIN_COMMANDS[args.command](args, settings, admin)
    return capsys.readouterr().out


async def test_usage_shows_the_forecast_in_text_and_json(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock,
        base_settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """2,900 of 5,000 delivered by November 15, 12:00 (14.5 days): the limit comes after
    14.5 * 5,000 / 2,900 = 25 days, on November 26: ``usage`` prints the sentence,
    ``--json`` carries it."""
    user = await add_user(accounts)
    await redis_client.hset(keys.usage(user.id, "2026-11"),
                            mapping={"used": 2900, "delivered": 2900})
    admin = Admin(redis_client, POLICY, clock, "UTC")
    report = json.loads(await run(["usage", user.id, "--json"], base_settings, admin, capsys))
    assert report["forecast"] == {"limit": 5000, "reaches_at": "2026-11-26T00:00:00+00:00",
                                  "date": "2026-11-26", "text": SENTENCE}
    text = await run(["usage", user.id], base_settings, admin, capsys)
    assert f"  {SENTENCE}" in text.splitlines()


@pytest.mark.parametrize(("now", "delivered", "why"), [
    (datetime(2026, 11, 3, 23, 0, tzinfo=UTC), 4000, "less than three days in"),
    (datetime(2026, 11, 15, 12, 0, tzinfo=UTC), 1000, "the pace reaches 5,000 after the reset"),
    (datetime(2026, 11, 15, 12, 0, tzinfo=UTC), 5000, "the limit is reached"),
])
async def test_usage_says_nothing_when_the_rule_says_nothing(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock,
        base_settings: Settings, capsys: pytest.CaptureFixture[str], now: datetime,
        delivered: int, why: str) -> None:
    """No forecast line, and ``forecast`` null, early in the month, when the pace misses the
    reset, or once the limit is reached."""
    clock.current = now
    user = await add_user(accounts)
    await redis_client.hset(keys.usage(user.id, "2026-11"),
                            mapping={"used": delivered, "delivered": delivered})
    admin = Admin(redis_client, POLICY, clock, "UTC")
    report = json.loads(await run(["usage", user.id, "--json"], base_settings, admin, capsys))
    assert report["forecast"] is None, why
    assert "At this pace" not in await run(["usage", user.id], base_settings, admin, capsys)


async def test_usage_period_and_plan_history_show_each_months_own_terms(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock,
        base_settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """Downgraded from plus in October, upgraded to pro in November: ``usage --period
    2026-10`` reports plus and 10,000 and ``plan history`` lists the months' terms under the
    audit trail."""
    admin = Admin(redis_client, POLICY, clock, "UTC")
    user = await add_user(accounts, plan="plus")
    clock.current = datetime(2026, 10, 12, tzinfo=UTC)
    await admin.change_plan(user.id, "free", by="billing")
    clock.current = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
    await admin.change_plan(user.id, "pro", by="billing")
    october = json.loads(await run(["usage", user.id, "--json", "--period", "2026-10"],
                                   base_settings, admin, capsys))
    assert (october["plan"], october["limit"], october["terms_source"]) == (
        "plus", 10_000, "recorded")
    text = await run(["usage", user.id, "--period", "2026-10"], base_settings, admin, capsys)
    assert "  2026-10 (UTC): used 0 of 10,000 (0.0%), 10,000 remaining" in text.splitlines()
    lines = (await run(["plan", "history", user.id], base_settings, admin, capsys)).splitlines()
    assert lines[2:] == ["plan and limit by month:", "  2026-11  pro 25,000 (in force)",
                         "  2026-10  plus 10,000"]


async def test_usage_link_prints_a_signed_link_that_expires(
        redis_client: aioredis.Redis, accounts: AccountStore, clock: MutableClock,
        base_settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """``usage link USER --ttl 2h``: the page's URL under RELAY_PUBLIC_URL, its token made
    with the link secret for that user, expiring two hours from the relay's now."""
    from dataclasses import replace

    from relay.admin.usage_links import PURPOSE
    from relay.cli.commands import CommandError
    from relay.identity.signed_links import LinkExpiredError, LinkSigner

    user = await add_user(accounts)
    settings = replace(base_settings, link_secret="cli-usage-link-secret-0123456789",
                       public_url="https://relay.kw.test")
    admin = Admin(redis_client, POLICY, clock, "UTC")
    url = (await run(["usage", "link", "agent@kw.test", "--ttl", "2h"], settings, admin,
                     capsys)).strip()
    assert url.startswith("https://relay.kw.test/usage/")
    signer = LinkSigner(b"cli-usage-link-secret-0123456789")
    now = clock.now().timestamp()
    token = url.rsplit("/", 1)[1]
    assert signer.verify(PURPOSE, token, now=now + 7199) == {"u": user.id}
    with pytest.raises(LinkExpiredError):
        signer.verify(PURPOSE, token, now=now + 7200)
    shown = json.loads(await run(["usage", "link", user.id, "--json"], settings, admin,
                                 capsys))
    assert shown["user_id"] == user.id and shown["expires_at"] == "2026-11-16T12:00:00+00:00"
    for bad in (["usage", "link"], ["usage", "link", user.id, "--ttl", "1w"],
                ["usage", user.id, "extra"]):
        with pytest.raises(CommandError):
            await run(bad, settings, admin, capsys)
