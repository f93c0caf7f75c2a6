"""Bulk onboarding end to end: agents imported with ``command-relay users import`` (a real
subprocess) send through the SmartPlans app credential from the addresses the file gave
them, counted against their own limit; a second import that raises a limit, swaps a sender
and disables an agent takes effect on the next SMTP transaction of the running relay."""

from __future__ import annotations

import aiosmtplib
import pytest

from relay.config.zones import zone
from relay.decisions.months import period_at
from relay.decisions.quota import QuotaStore
from tests.cli.test_commands import cli, ok
from tests.conftest import PASSWORD, POLICIES, add_app, message, smtp_client
from tests.serving import clean_env

HEADER = "email,id,plan,limit,tz,senders,status"


async def send_as_app(relay, sender: str, to: list[str]) -> tuple[dict[str, object], str]:
    """One message from ``sender`` through the smartplans credential: aiosmtplib's refused
    recipients and reply."""
    async with smtp_client(relay, login="smartplans", password=PASSWORD) as client:
        return await client.sendmail(sender, to, message(sender=sender))


async def test_onboarding_imported_agents_send_and_a_reimport_applies_at_once(
        relay, upstream, accounts, redis_server, redis_client, clock, tmp_path):
    await add_app(accounts)
    env = clean_env(RELAY_REDIS_URL=redis_server.url, RELAY_POLICIES_DIR=str(POLICIES),
                    RELAY_STATE_DIR=str(tmp_path / "state"))
    path = tmp_path / "agents.csv"
    path.write_text(f"{HEADER}\n"
                    "ann@kw.test,u-ann,free,2,UTC,listings.ann@kw.test,active\n"
                    "bob@kw.test,u-bob,plus,,UTC,,active\n")
    assert ok(await cli(["users", "import", str(path)], env)).startswith(
        "2 lines: 2 created")

    refused, _ = await send_as_app(relay, "listings.ann@kw.test",
                                   ["c1@example.test", "c2@example.test"])
    assert refused == {}
    period = period_at(clock.now(), zone("UTC")).label
    assert (await QuotaStore(redis_client).usage("u-ann", period)).used == 2
    with pytest.raises(aiosmtplib.SMTPDataError) as over:  # SmartPlans: decided at DATA
        await send_as_app(relay, "listings.ann@kw.test", ["c3@example.test"])
    assert "(2 of 2 sends used)" in over.value.message  # the custom limit, not the plan's

    path.write_text(f"{HEADER}\n"
                    "ann@kw.test,u-ann,free,3,UTC,homes.ann@kw.test,active\n"
                    "bob@kw.test,u-bob,plus,,UTC,,disabled\n")
    assert ok(await cli(["users", "import", str(path)], env)).startswith(
        "2 lines: 0 created, 2 updated")
    refused, _ = await send_as_app(relay, "homes.ann@kw.test", ["c3@example.test"])
    assert refused == {}  # the raised limit applies now, from the new address
    assert (await QuotaStore(redis_client).usage("u-ann", period)).used == 3
    for sender in ("listings.ann@kw.test", "bob@kw.test"):  # dropped; disabled
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as failed:
            await send_as_app(relay, sender, ["c4@example.test"])
        assert failed.value.code == 550
    assert [m.mail_from for m in upstream.messages] == \
        ["listings.ann@kw.test", "homes.ann@kw.test"]
