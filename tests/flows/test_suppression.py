"""The suppression list on the SMTP path, end to end: a real relay, a real capturing
upstream, real smtplib and aiosmtplib clients, a real redis-server. A suppressed recipient is
refused at RCPT with a 550 5.7.1 naming the reason (user's list and global list), never
counted, never shown to the upstream, while the message's other recipients are delivered; on
an uncounted route; at the end of DATA (SmartPlans: dropped, timeline.email_failed with
reason suppressed; refused whole when nobody is left); the Redis commands a RCPT costs; and
the month's count in `usage` (CLI, text and JSON) and in the admin API."""

from __future__ import annotations

import asyncio
import json
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from relay.config.endpoints import Endpoint, UpstreamTarget
from relay.decisions.suppression import SuppressionReason, SuppressionStore
from relay.events.stream import TIMELINE_EMAIL_FAILED, EventLog
from relay.identity.accounts import AccountStore, User
from relay.process.wiring import RelayApp
from relay.store import keys
from relay.store.client import connect_redis
from tests.conftest import (
    PASSWORD,
    CapturingUpstream,
    RedisServer,
    RelayFactory,
    add_app,
    add_user,
    smtp_client,
)
from tests.policy_files import policies_copy
from tests.serving import LineClient, clean_env

PERIOD = "2026-11"  # the conftest clock's month
SENDER = "agent@kw.test"
UNSUBSCRIBED = "550 5.7.1 Recipient has unsubscribed from this sender"
BOUNCED = "550 5.7.1 Recipient address bounced permanently before"
COMPLAINED = "550 5.7.1 Recipient has reported earlier mail as spam"
SMARTPLAN_HEADERS = ("X-KW-SmartPlan-Id: sp-17", "X-KW-SmartPlan-Step: 3",
                     "X-KW-Contact-Id: contact-99")
TOKEN = "t" * 32  # the admin API tests' token, known to the secret scan (tests/secretscan.py)


def compose(*extra: str, subject: str = "Hello") -> bytes:
    lines = [f"From: {SENDER}", "To: client@example.test", f"Subject: {subject}", *extra]
    return ("".join(line + "\r\n" for line in lines) + "\r\nBody line\r\n").encode()


def smtplib_send(app: RelayApp, rcpts: list[str], content: bytes,
                 login: str = SENDER) -> dict[str, tuple[int, bytes]]:
    """One message with smtplib (run in a thread); its refused recipients."""
    with smtplib.SMTP("127.0.0.1", app.port, local_hostname="client.test",
                      timeout=10) as client:
        client.login(login, PASSWORD)
        return client.sendmail(SENDER, rcpts, content)


async def suppress(redis_client: aioredis.Redis, address: str, reason: SuppressionReason,
                   user: User | None) -> None:
    await SuppressionStore(redis_client).add(address, user_id=user.id if user else None,
                                             reason=reason, source="test")


def reply_of(refused: tuple[int, bytes]) -> str:
    return f"{refused[0]} {refused[1].decode()}"


def sample(app: RelayApp, name: str, **labels: str) -> float:
    return app.metrics.registry.get_sample_value(name, labels) or 0.0


async def recorded(redis_client: aioredis.Redis, kind: str) -> list[dict[str, Any]]:
    return [json.loads(e.to_json()) for _, e in await EventLog(redis_client).recent(1000)
            if e.kind == kind]


# -- at RCPT, on a counted route ----------------------------------------------------------------
async def test_suppression_users_entry_refused_at_rcpt_the_rest_delivered(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """A contact who unsubscribed from this agent (written in another case) is refused at
    RCPT with 550 5.7.1 naming the unsubscribe; the other recipients of the same message
    are delivered and counted; the refused one costs no unit, never reaches the upstream,
    and is logged (rcpt.refused with the reason and scope), counted by reason and scope, and
    counted in the month's usage."""
    user = await add_user(accounts, limit=10)
    await suppress(redis_client, "gone@example.test", SuppressionReason.UNSUBSCRIBE, user)
    with capture_logs() as logs:
        refused = await asyncio.to_thread(
            smtplib_send, relay, ["kept@example.test", "Gone@Example.test",
                                  "other@example.test"], compose())
    assert {address: reply_of(r) for address, r in refused.items()} == {
        "Gone@Example.test": UNSUBSCRIBED}
    assert [m.rcpt_tos for m in upstream.messages] == [["kept@example.test",
                                                        "other@example.test"]]
    assert upstream.handler.rcpt_seen == ["kept@example.test", "other@example.test"]
    usage = await relay.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.delivered, usage.in_flight) == (2, 2, 0)
    assert (usage.suppressed, usage.suppressed_reasons) == (1, {"unsubscribe": 1})
    lines = [e for e in logs if e["event"] == "rcpt.refused"]
    assert [(e["reason"], e["suppression"], e["scope"], e["smtp_code"], e["rcpt_domain"])
            for e in lines] == [("RecipientSuppressedError", "unsubscribe", "user", 550,
                                 "example.test")]
    assert "Gone@Example.test" not in json.dumps(lines)  # recipients as domains only
    assert sample(relay, "relay_recipients_suppressed_total", reason="unsubscribe",
                  scope="user") == 1
    assert sample(relay, "relay_recipients_total", outcome="refused",
                  reason="RecipientSuppressedError") == 1


async def test_suppression_global_entry_refused_for_every_user_nothing_counted(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """A hard bounce on the global list is refused for any user, even one with no unit left
    (the list comes before the quota): every recipient refused, nothing sent, nothing
    counted but the suppressed refusal itself."""
    user = await add_user(accounts, limit=1)
    await redis_client.hset(keys.usage(user.id, PERIOD), "used", 1)
    await suppress(redis_client, "bounced@example.test", SuppressionReason.BOUNCE, None)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await asyncio.to_thread(smtplib_send, relay, ["bounced@example.test"], compose())
    assert {a: reply_of(r) for a, r in refused.value.recipients.items()} == {
        "bounced@example.test": BOUNCED}
    assert upstream.messages == [] and upstream.handler.rcpt_seen == []
    usage = await relay.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.delivered) == (1, 0)
    assert (usage.suppressed, usage.suppressed_reasons) == (1, {"bounce": 1})
    assert sample(relay, "relay_recipients_suppressed_total", reason="bounce",
                  scope="global") == 1
    assert sample(relay, "relay_quota_reservations_total", result="reserved") == 0


async def test_suppression_another_users_entry_does_not_refuse(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """A contact who unsubscribed from one agent is still sent to by another."""
    await add_user(accounts)
    other = await add_user(accounts, "colleague@kw.test")
    await suppress(redis_client, "contact@example.test", SuppressionReason.UNSUBSCRIBE, other)
    refused = await asyncio.to_thread(smtplib_send, relay, ["contact@example.test"], compose())
    assert refused == {}
    assert [m.rcpt_tos for m in upstream.messages] == [["contact@example.test"]]


async def commands_sent(redis_server: RedisServer, redis_client: aioredis.Redis,
                        step: Any) -> list[str]:
    """The commands clients sent Redis (MONITOR, on a client of its own; not those a script
    ran) while ``step`` ran, up to a marker sent after it on the relay's own client (which
    then has a connection idle: no new one to open)."""
    marker = "end-of-step"
    watcher = connect_redis(redis_server.url, timeout=5)
    try:
        async with watcher.monitor() as monitor:
            await step()
            await redis_client.echo(marker)
            seen: list[str] = []
            while (entry := await monitor.next_command())["command"] != f"ECHO {marker}":
                if entry["client_type"] != "lua":
                    seen.append(entry["command"].split()[0].upper())
    finally:
        await watcher.aclose()
    return seen


async def test_suppression_costs_a_counted_rcpt_one_round_trip_more(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, redis_server: RedisServer) -> None:
    """What one RCPT asks of Redis on a counted route: one HGET of the global list, then the
    reservation script (which reads the user's own list): one round trip more than the
    reservation alone. A recipient on the global list costs the HGET and its count."""
    await add_user(accounts)
    await suppress(redis_client, "bounced@example.test", SuppressionReason.BOUNCE, None)
    client = await LineClient.connect(relay.port)
    replies: list[int] = []

    async def rcpt(address: str) -> None:
        replies.append((await client.command(f"RCPT TO:<{address}>"))[0])

    try:
        await client.login()
        assert (await client.command(f"MAIL FROM:<{SENDER}>"))[0] == 250
        await rcpt("first@example.test")  # loads reserve.lua into Redis if it is not yet
        kept = await commands_sent(redis_server, redis_client,
                                   lambda: rcpt("kept@example.test"))
        bounced = await commands_sent(redis_server, redis_client,
                                      lambda: rcpt("bounced@example.test"))
        assert (await client.command("RSET"))[0] == 250
    finally:
        await client.aclose()
    assert replies == [250, 250, 550]
    assert kept == ["HGET", "EVALSHA"]
    assert bounced == ["HGET", "HINCRBY", "HINCRBY", "EXPIRE"]  # the count: one pipeline


# -- at RCPT, on an uncounted route -------------------------------------------------------------
BULK_ROUTE = """
[routes.bulk]
counted = false
upstream = "setting"
credentials = "upstream"
pass_headers = []
failover = ""
"""
BULK_RULE = """[[rules]]
name = "command-app-bulk"
apps = ["command"]
route = "bulk"

"""


def bulk_policies(tmp_path: Path) -> Path:
    """The shipped policies with an uncounted route, chosen at MAIL FROM for the command
    app (decided at RCPT: no reservation to fold the user's list into)."""
    target = policies_copy(tmp_path)
    path = target / "routing.toml"
    text = path.read_text()
    last = '[[rules]]\nname = "everything-else-command"'
    assert last in text
    path.write_text(text.replace(last, BULK_RULE + last) + BULK_ROUTE)
    return target


async def test_suppression_uncounted_route_checks_both_lists_at_rcpt(
        make_relay: RelayFactory, upstream: CapturingUpstream,
        secondary: CapturingUpstream, accounts: AccountStore, redis_client: aioredis.Redis,
        tmp_path: Path) -> None:
    """On a route that is not counted the user's list and the global list are both checked
    at RCPT (one pipelined round trip): each suppressed recipient refused with its own
    reason, the rest delivered and tallied, nothing counted against the quota."""
    app: RelayApp = await make_relay(
        upstream=upstream, policies_dir=bulk_policies(tmp_path),
        route_urls={"bulk": UpstreamTarget("127.0.0.1", secondary.port, "none")})
    user = await add_user(accounts)
    await add_app(accounts, "command")
    await suppress(redis_client, "gone@example.test", SuppressionReason.UNSUBSCRIBE, user)
    await suppress(redis_client, "spam@example.test", SuppressionReason.COMPLAINT, None)
    refused = await asyncio.to_thread(
        smtplib_send, app, ["gone@example.test", "spam@example.test", "kept@example.test"],
        compose(), "command")
    assert {a: reply_of(r) for a, r in refused.items()} == {
        "gone@example.test": UNSUBSCRIBED, "spam@example.test": COMPLAINED}
    assert [m.rcpt_tos for m in secondary.messages] == [["kept@example.test"]]
    assert secondary.handler.rcpt_seen == ["kept@example.test"]
    assert upstream.messages == []
    usage = await app.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.routes) == (0, {"bulk": 1})
    assert (usage.suppressed, usage.suppressed_reasons) == (
        2, {"unsubscribe": 1, "complaint": 1})
    assert sample(app, "relay_recipients_suppressed_total", reason="unsubscribe",
                  scope="user") == 1
    assert sample(app, "relay_recipients_suppressed_total", reason="complaint",
                  scope="global") == 1


# -- at the end of DATA -------------------------------------------------------------------------
async def smartplan_send(app: RelayApp, rcpts: list[str]) -> tuple[dict[str, Any], str]:
    async with smtp_client(app, login="smartplans") as client:
        errors, reply = await client.sendmail(SENDER, rcpts, compose(*SMARTPLAN_HEADERS))
    return errors, reply


async def test_suppression_smartplan_drops_the_suppressed_contact_and_tells_the_timeline(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """A SmartPlan email (decided at the end of DATA) to a suppressed contact and another:
    the message goes to the other only (counted once); the suppressed one is never shown to
    the upstream, costs nothing, and yields timeline.email_failed with reason suppressed
    and the SmartPlan ids, so the SmartPlan moves on."""
    user = await add_user(accounts, limit=10)
    await add_app(accounts, "smartplans")
    await suppress(redis_client, "gone@example.test", SuppressionReason.UNSUBSCRIBE, user)
    with capture_logs() as logs:
        errors, reply = await smartplan_send(relay, ["gone@example.test", "kept@example.test"])
    assert errors == {} and reply.startswith("2.0.0 Message accepted")
    assert [m.rcpt_tos for m in upstream.messages] == [["kept@example.test"]]
    assert upstream.handler.rcpt_seen == ["kept@example.test"]
    usage = await relay.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.delivered, usage.suppressed) == (1, 1, 1)
    timeline = await recorded(redis_client, TIMELINE_EMAIL_FAILED)
    assert [(e["reason"], e["suppression"], e["recipient"], e["smtp_code"], e["reply"],
             e["smartplan_id"], e["smartplan_step"], e["contact_id"], e["route"])
            for e in timeline] == [("suppressed", "unsubscribe", "gone@example.test", 550,
                                    UNSUBSCRIBED, "sp-17", 3, "contact-99", "command")]
    assert [(e["reason"], e["suppression"], e["deferred"]) for e in logs
            if e["event"] == "rcpt.refused"] == [
        ("RecipientSuppressedError", "unsubscribe", True)]
    finished = [e for e in logs if e["event"] == "delivery.finished"]
    assert [(e["outcome"], e["rcpt_accepted"], e["rcpt_refused"]) for e in finished] == [
        ("delivered", 1, 1)]


async def test_suppression_smartplan_everyone_suppressed_is_refused_whole(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """A SmartPlan email whose every recipient is suppressed is refused at the end of DATA
    with the suppression reply (permanent: the app moves on); one timeline event per
    recipient (reason suppressed, none "refused"); the upstream is never contacted."""
    user = await add_user(accounts)
    await add_app(accounts, "smartplans")
    await suppress(redis_client, "spam@example.test", SuppressionReason.COMPLAINT, None)
    await suppress(redis_client, "gone@example.test", SuppressionReason.UNSUBSCRIBE, user)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await smartplan_send(relay, ["spam@example.test", "gone@example.test"])
    assert f"{refused.value.code} {refused.value.message}" == COMPLAINED
    timeline = await recorded(redis_client, TIMELINE_EMAIL_FAILED)
    assert sorted((e["recipient"], e["reason"], e["suppression"]) for e in timeline) == [
        ("gone@example.test", "suppressed", "unsubscribe"),
        ("spam@example.test", "suppressed", "complaint")]
    assert upstream.handler.connections == 0
    usage = await relay.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.suppressed, usage.suppressed_reasons) == (
        0, 2, {"complaint": 1, "unsubscribe": 1})


async def test_suppression_campaigns_drop_the_suppressed_recipient_without_timeline(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """Campaigns (decided at the end of DATA, no timeline): the suppressed recipient is
    dropped from the message and logged; no timeline event."""
    user = await add_user(accounts)
    await add_app(accounts, "campaigns")
    await suppress(redis_client, "gone@example.test", SuppressionReason.MANUAL, user)
    async with smtp_client(relay, login="campaigns") as client:
        errors, _ = await client.sendmail(SENDER, ["gone@example.test", "kept@example.test"],
                                          compose("X-KW-Route: command"))
    assert errors == {}
    assert [m.rcpt_tos for m in upstream.messages] == [["kept@example.test"]]
    assert await recorded(redis_client, TIMELINE_EMAIL_FAILED) == []
    assert (await relay.quota.usage(user.id, PERIOD)).suppressed_reasons == {"manual": 1}


# -- usage ----------------------------------------------------------------------------------------
async def test_suppression_usage_shows_the_months_refusals_in_the_cli_and_the_api(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, redis_server: RedisServer, tmp_path: Path) -> None:
    """After two refusals (one per list), `usage --json`, `usage` and the admin API's usage
    answer all show 2 refused as suppressed this month, by reason."""
    app: RelayApp = await make_relay(upstream=upstream, admin_token=TOKEN,
                                     admin_listen=Endpoint("127.0.0.1", 0))
    user = await add_user(accounts)
    await suppress(redis_client, "gone@example.test", SuppressionReason.UNSUBSCRIBE, user)
    await suppress(redis_client, "bounced@example.test", SuppressionReason.BOUNCE, None)
    refused = await asyncio.to_thread(
        smtplib_send, app, ["gone@example.test", "bounced@example.test", "kept@example.test"],
        compose())
    assert set(refused) == {"gone@example.test", "bounced@example.test"}

    env = clean_env(RELAY_REDIS_URL=redis_server.url, RELAY_STATE_DIR=str(tmp_path / "cli"))

    def cli(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "relay", "usage", SENDER,
                                 "--period", PERIOD, *args], env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, (result.stdout, result.stderr)
        return result.stdout

    report = json.loads(await asyncio.to_thread(cli, "--json"))
    assert (report["used"], report["suppressed"], report["suppressed_reasons"]) == (
        1, 2, {"bounce": 1, "unsubscribe": 1})
    text = await asyncio.to_thread(cli)
    assert "  refused as suppressed: 2 (bounce 1, unsubscribe 1)" in text.splitlines()

    assert app.admin_server is not None
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{app.admin_server.port}/v1/users/{SENDER}/usage",
            headers={"Authorization": f"Bearer {TOKEN}"}) as answer:
        assert answer.status == 200
        body = await answer.json()
    assert (body["suppressed"], body["suppressed_reasons"]) == (
        2, {"bounce": 1, "unsubscribe": 1})
