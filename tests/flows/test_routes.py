"""Routes end to end over SMTP: two real upstreams (Command Email = the plain capturing
``upstream``; MailChimp = a capturing upstream that offers AUTH only after STARTTLS and
records the login), the routing rules, what is counted, per-user credentials, failover,
decisions at the end of DATA, and SmartPlan failures written to the Contact Timeline."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from structlog.testing import capture_logs

from relay.config.endpoints import UpstreamTarget
from relay.config.policies import load_policies
from relay.delivery.credentials import RouteCredentials
from relay.events.channels import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookChannel, sign
from relay.events.notifier import Notifier
from relay.events.stream import REJECTED, TIMELINE_EMAIL_FAILED, EventLog
from relay.identity.accounts import AccountStore, User
from relay.process.wiring import RelayApp
from relay.smtp.tls import server_context
from relay.store import keys
from tests.conftest import (
    PASSWORD,
    POLICIES,
    CapturingUpstream,
    RelayFactory,
    UpstreamBehaviour,
    add_app,
    add_user,
    free_port,
    smtp_client,
    wait_for,
)
from tests.policy_files import SECONDARY_ROUTE, policies_copy

MC_LOGIN = ("mcuser", "KEY")
PERIOD = "2026-11"  # the conftest clock's month
SENDER = "agent@kw.test"
APPS = ("smartplans", "campaigns", "command")


# -- fixtures and helpers ----------------------------------------------------------------------
@pytest.fixture
async def mailchimp(tls_files: tuple[Path, Path]) -> AsyncIterator[CapturingUpstream]:
    """A MailChimp-like upstream: STARTTLS required, AUTH (only over TLS) as mcuser/KEY."""
    server = CapturingUpstream(UpstreamBehaviour(credentials=MC_LOGIN),
                               tls=server_context(*tls_files))
    await server.start()
    yield server
    await server.stop()


def mc_urls(mailchimp: CapturingUpstream) -> dict[str, UpstreamTarget]:
    return {"mailchimp": UpstreamTarget("127.0.0.1", mailchimp.port, "starttls")}


@pytest.fixture
async def routed(make_relay: RelayFactory, upstream: CapturingUpstream,
                 mailchimp: CapturingUpstream, tls_files: tuple[Path, Path]) -> RelayApp:
    """The relay with both routes configured."""
    app: RelayApp = await make_relay(upstream=upstream, route_urls=mc_urls(mailchimp),
                                     upstream_ca_file=tls_files[0])
    return app


async def setup_user(accounts: AccountStore, app: RelayApp | None = None, *,
                     limit: int | None = None, credentials: bool = True) -> User:
    """The agent, the three app credentials, and (with ``app``) the agent's MailChimp key."""
    user = await add_user(accounts, limit=limit)
    for name in APPS:
        await add_app(accounts, name)
    if app is not None and credentials:
        await app.credentials.save(user.id, "mailchimp", RouteCredentials(*MC_LOGIN))
    return user


def compose(*extra: str, to: str = "client@example.test", body: str = "Body line\r\n") -> bytes:
    lines = [f"From: {SENDER}", f"To: {to}", "Subject: Routed", *extra]
    return ("".join(line + "\r\n" for line in lines) + "\r\n" + body).encode()


def after_received(content: bytes) -> bytes:
    """The forwarded bytes without the one Received: header the relay adds."""
    assert content.startswith(b"Received: from ")
    end = content.index(b"\r\n", content.index(b"\r\n\t", content.index(b" id ")) + 1)
    return content[end + 2:]


def without(content: bytes, *prefixes: bytes) -> bytes:
    """``content`` without the header lines (and their folded continuations) starting with
    one of ``prefixes`` (compared in lower case): what the relay should forward."""
    head, sep, body = content.partition(b"\r\n\r\n")
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.lower().startswith(prefixes)
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept) + sep + body


async def send(app: RelayApp, login: str, content: bytes,
               rcpts: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """One message through the relay, logged in as ``login`` (an app name, or the agent)."""
    async with smtp_client(app, login=login) as client:
        errors, reply = await client.sendmail(SENDER, rcpts or ["client@example.test"],
                                              content)
    return errors, reply


async def recorded(redis_client: aioredis.Redis, kind: str) -> list[dict[str, Any]]:
    return [json.loads(e.to_json()) for _, e in await EventLog(redis_client).recent(10_000)
            if e.kind == kind]


def failover_policies(tmp_path: Path) -> Path:
    """The shipped policies with a counted ``secondary`` route the command route fails over
    to."""
    target = policies_copy(tmp_path)
    path = target / "routing.toml"
    text = path.read_text()
    command = '[routes.command]\ncounted = true\nupstream = "default"\ncredentials = "upstream"' \
              '\npass_headers = []\nfailover = ""\n'
    assert command in text
    text = text.replace(command, command.replace('failover = ""', 'failover = "secondary"')
                        + SECONDARY_ROUTE)
    path.write_text(text)
    assert load_policies(target).routing.routes["command"].failover == "secondary"
    return target


# -- which rule routes where -------------------------------------------------------------------
@pytest.mark.parametrize(("login", "headers", "preference", "expected"), [
    pytest.param("smartplans", ["X-KW-Route: mailchimp"], "mailchimp", "command",
                 id="smartplans-always-command"),
    pytest.param("campaigns", ["X-KW-Route: mailchimp"], None, "mailchimp",
                 id="campaigns-header-mailchimp"),
    pytest.param("campaigns", ["X-KW-Route: Command"], "mailchimp", "command",
                 id="campaigns-header-command-beats-preference"),
    pytest.param("campaigns", [], "mailchimp", "mailchimp", id="campaigns-preference-mailchimp"),
    pytest.param("campaigns", [], None, "command", id="campaigns-default-command"),
    pytest.param("command", ["X-KW-Route: mailchimp"], "mailchimp", "command",
                 id="command-app-ignores-header"),
    pytest.param(SENDER, ["X-KW-Route: mailchimp"], "mailchimp", "command",
                 id="direct-ignores-header"),
])
async def test_routes_each_rule_reaches_its_upstream(
        routed: RelayApp, upstream: CapturingUpstream, mailchimp: CapturingUpstream,
        accounts: AccountStore, login: str, headers: list[str], preference: str | None,
        expected: str) -> None:
    """Each rule of the shipped routing.toml sends the message to the upstream it names, and
    only there."""
    user = await setup_user(accounts, routed)
    if preference is not None:
        app_name = "direct" if login == SENDER else login
        await accounts.set_preference(user.id, app_name, preference)
    with capture_logs() as logs:
        errors, _ = await send(routed, login, compose(*headers, "X-MC-Tags: spring"))
    assert errors == {}
    chosen, other = (mailchimp, upstream) if expected == "mailchimp" else (upstream, mailchimp)
    assert len(chosen.messages) == 1 and other.messages == []
    assert chosen.messages[0].rcpt_tos == ["client@example.test"]
    finished = [e for e in logs if e["event"] == "delivery.finished"]
    assert [(e["outcome"], e["route"]) for e in finished] == [("delivered", expected)]


async def test_routes_campaigns_unknown_header_refused_whole(
        routed: RelayApp, upstream: CapturingUpstream, mailchimp: CapturingUpstream,
        accounts: AccountStore) -> None:
    """Campaigns asking for a route that is not offered get 550 5.7.1 with the rule's text
    at the end of DATA; nothing is sent anywhere."""
    await setup_user(accounts, routed)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(routed, "campaigns", compose("X-KW-Route: sendgrid"))
    assert refused.value.code == 550
    assert refused.value.message == "5.7.1 X-KW-Route must be command or mailchimp"
    assert upstream.messages == [] and mailchimp.messages == []


# -- what is counted ---------------------------------------------------------------------------
async def test_routes_mailchimp_not_counted_but_tallied_command_counted(
        routed: RelayApp, upstream: CapturingUpstream, mailchimp: CapturingUpstream,
        accounts: AccountStore) -> None:
    """Two recipients via MailChimp leave the quota untouched and are tallied under
    route:mailchimp; three via Command Email are counted and tallied under route:command."""
    user = await setup_user(accounts, routed, limit=10)
    await send(routed, "campaigns", compose("X-KW-Route: mailchimp"),
               ["a@example.test", "b@example.test"])
    usage = await routed.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.delivered, usage.routes) == (0, 0, {"mailchimp": 2})
    assert mailchimp.messages[0].rcpt_tos == ["a@example.test", "b@example.test"]

    await send(routed, SENDER, compose(), ["c@example.test", "d@example.test", "e@example.test"])
    usage = await routed.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.delivered, usage.in_flight) == (3, 3, 0)
    assert usage.routes == {"mailchimp": 2, "command": 3}


async def test_routes_mailchimp_sends_pass_a_user_at_the_limit(
        routed: RelayApp, upstream: CapturingUpstream, mailchimp: CapturingUpstream,
        accounts: AccountStore, redis_client: aioredis.Redis) -> None:
    """A user with no units left still sends through MailChimp (uncounted) but not through
    Command Email."""
    user = await setup_user(accounts, routed, limit=1)
    await redis_client.hset(keys.usage(user.id, PERIOD), "used", 1)
    errors, _ = await send(routed, "campaigns", compose("X-KW-Route: mailchimp"))
    assert errors == {} and len(mailchimp.messages) == 1
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(routed, "campaigns", compose("X-KW-Route: command"))
    assert refused.value.code == 550
    assert upstream.messages == []
    assert (await routed.quota.usage(user.id, PERIOD)).used == 1


# -- what each upstream sees -------------------------------------------------------------------
async def test_routes_mailchimp_gets_the_users_login_and_x_mc_headers(
        routed: RelayApp, upstream: CapturingUpstream, mailchimp: CapturingUpstream,
        accounts: AccountStore) -> None:
    """MailChimp is logged in to with the user's own saved credentials and receives the
    X-MC-* headers; only the X-KW-* control headers are removed."""
    await setup_user(accounts, routed)
    original = compose("X-KW-Route: mailchimp", "X-MC-Tags: spring,sale",
                       "X-MC-Metadata: {\"a\":", "\t\"1\"}", "X-KW-Campaign-Id: cmp-7",
                       "x-mc-track: opens")
    await send(routed, "campaigns", original)
    assert mailchimp.handler.auth_logins == ["mcuser"]
    forwarded = after_received(mailchimp.messages[0].content)
    assert forwarded == without(original, b"x-kw-")
    assert b"X-MC-Metadata: {\"a\":\r\n\t\"1\"}\r\n" in forwarded
    assert b"x-mc-track: opens" in forwarded
    assert upstream.messages == []


async def test_routes_command_never_sees_x_mc_or_x_kw_headers(
        routed: RelayApp, upstream: CapturingUpstream, mailchimp: CapturingUpstream,
        accounts: AccountStore) -> None:
    """On the command route X-MC-* (folded lines too) and X-KW-* are stripped and every other
    byte arrives unchanged."""
    await setup_user(accounts, routed)
    original = compose("X-KW-Route: command", "X-MC-Tags: spring", "X-Mc-Metadata: {\"a\":",
                       " \"1\"}", "X-KW-Campaign-Id: cmp-7", "X-Custom: kept",
                       body="..leading dots\r\nX-MC-Body: not a header\r\n")
    await send(routed, "campaigns", original)
    forwarded = after_received(upstream.messages[0].content)
    assert forwarded == without(original, b"x-kw-", b"x-mc-")
    head = forwarded.partition(b"\r\n\r\n")[0].lower()
    assert b"x-mc-" not in head and b"x-kw-" not in head
    assert forwarded.endswith(b"\r\n\r\n..leading dots\r\nX-MC-Body: not a header\r\n")
    assert mailchimp.messages == [] and mailchimp.handler.auth_logins == []


async def test_routes_mailchimp_with_wrong_saved_credentials_is_temporary(
        make_relay: RelayFactory, upstream: CapturingUpstream, mailchimp: CapturingUpstream,
        accounts: AccountStore, tls_files: tuple[Path, Path]) -> None:
    """Saved credentials MailChimp refuses give a 451 (the mail is kept), never a send via
    Command Email."""
    # A short timeout: after the refused AUTH PLAIN, aiosmtplib's AUTH LOGIN retry against
    # aiosmtpd waits for a reply until the timeout, and either way the login has failed.
    routed: RelayApp = await make_relay(upstream=upstream, route_urls=mc_urls(mailchimp),
                                        upstream_ca_file=tls_files[0], upstream_timeout=1)
    user = await setup_user(accounts, routed, credentials=False)
    await routed.credentials.save(user.id, "mailchimp", RouteCredentials("mcuser", "OLD-KEY"))
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(routed, "campaigns", compose("X-KW-Route: mailchimp"))
    assert refused.value.code == 451
    assert upstream.messages == [] and mailchimp.messages == []
    assert mailchimp.handler.auth_logins == []
    assert (await routed.quota.usage(user.id, PERIOD)).used == 0


# -- missing credentials and unconfigured routes -----------------------------------------------
@pytest.mark.parametrize("how", ["header", "preference"])
async def test_routes_mailchimp_without_credentials_refused_naming_the_fix(
        routed: RelayApp, upstream: CapturingUpstream, mailchimp: CapturingUpstream,
        accounts: AccountStore, how: str) -> None:
    """A Campaigns send routed to MailChimp for a user without saved credentials gets 550
    5.7.1 naming `command-relay route credentials`; nothing reaches either upstream (never
    silently via Command Email) and nothing is counted."""
    user = await setup_user(accounts, routed, credentials=False)
    if how == "preference":
        await accounts.set_preference(user.id, "campaigns", "mailchimp")
    headers = ["X-KW-Route: mailchimp"] if how == "header" else []
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(routed, "campaigns", compose(*headers), ["a@example.test", "b@example.test"])
    assert refused.value.code == 550
    assert refused.value.message.startswith("5.7.1 ")
    assert "`command-relay route credentials USER mailchimp`" in refused.value.message
    assert upstream.messages == [] and upstream.handler.rcpt_seen == []
    assert mailchimp.messages == [] and mailchimp.handler.connections == 0
    usage = await routed.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.routes) == (0, {})


async def test_routes_unconfigured_route_answers_451_4_3_5(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore) -> None:
    """Without RELAY_ROUTE_MAILCHIMP_URL, a message routed there gets 451 4.3.5 (kept by the
    app) even with credentials saved, and is not sent via Command Email."""
    app: RelayApp = await make_relay(upstream=upstream)
    user = await setup_user(accounts, app)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(app, "campaigns", compose("X-KW-Route: mailchimp"))
    assert refused.value.code == 451
    assert refused.value.message.startswith("4.3.5 ")
    assert upstream.messages == []
    assert (await app.quota.usage(user.id, PERIOD)).used == 0


# -- failover ----------------------------------------------------------------------------------
@pytest.mark.parametrize("login", [SENDER, "campaigns"])
async def test_routes_failover_when_the_primary_is_unreachable(
        make_relay: RelayFactory, upstream: CapturingUpstream, secondary: CapturingUpstream,
        accounts: AccountStore, tmp_path: Path, login: str) -> None:
    """With the command upstream stopped, mail goes via its failover route (decided at RCPT
    or at the end of DATA alike), counted and tallied under that route."""
    app: RelayApp = await make_relay(
        upstream=upstream, policies_dir=failover_policies(tmp_path),
        route_urls={"secondary": UpstreamTarget("127.0.0.1", secondary.port, "none")})
    user = await setup_user(accounts)
    await upstream.stop()
    with capture_logs() as logs:
        errors, _ = await send(app, login, compose(), ["a@example.test", "b@example.test"])
    assert errors == {}
    assert upstream.messages == []
    assert [m.rcpt_tos for m in secondary.messages] == [["a@example.test", "b@example.test"]]
    usage = await app.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.routes) == (2, {"secondary": 2})
    assert [(e["route"], e["failover"]) for e in logs if e["event"] == "route.failover"] == \
        [("command", "secondary")]


async def test_routes_no_failover_when_the_primary_refuses_a_recipient(
        make_relay: RelayFactory, upstream: CapturingUpstream, secondary: CapturingUpstream,
        accounts: AccountStore, tmp_path: Path) -> None:
    """A primary that accepts MAIL but refuses recipients is reachable: its refusals stand and
    nothing goes via the failover route."""
    upstream.behaviour.rcpt_replies["bad@example.test"] = "550 5.1.1 No such user"
    upstream.behaviour.rcpt_replies["worse@example.test"] = "550 5.1.1 No such user"
    app: RelayApp = await make_relay(
        upstream=upstream, policies_dir=failover_policies(tmp_path),
        route_urls={"secondary": UpstreamTarget("127.0.0.1", secondary.port, "none")})
    user = await setup_user(accounts)
    errors, _ = await send(app, SENDER, compose(), ["ok@example.test", "bad@example.test"])
    assert list(errors) == ["bad@example.test"] and errors["bad@example.test"].code == 550
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(app, SENDER, compose(), ["worse@example.test"])
    assert [m.rcpt_tos for m in upstream.messages] == [["ok@example.test"]]
    assert secondary.messages == [] and secondary.handler.connections == 0
    usage = await app.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.routes) == (1, {"command": 1})


async def test_routes_no_failover_when_the_primary_pool_is_busy(
        make_relay: RelayFactory, upstream: CapturingUpstream, secondary: CapturingUpstream,
        accounts: AccountStore, tmp_path: Path) -> None:
    """The primary's one pooled connection held by another transaction for the whole wait:
    the primary is reachable, only busy, so the client gets 451 4.4.5 and nothing goes via
    the failover route (which is for an unreachable upstream)."""
    app: RelayApp = await make_relay(
        upstream=upstream, policies_dir=failover_policies(tmp_path), upstream_pool_size=1,
        upstream_timeout=2,
        route_urls={"secondary": UpstreamTarget("127.0.0.1", secondary.port, "none")})
    user = await setup_user(accounts)
    with capture_logs() as logs:
        async with smtp_client(app, login=SENDER) as holder:
            await holder.mail(SENDER)  # the command pool's one connection, held
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await send(app, SENDER, compose())
    assert (refused.value.code, refused.value.message[:6]) == (451, "4.4.5 ")
    assert secondary.messages == [] and secondary.handler.connections == 0
    assert not [e for e in logs if e["event"] == "route.failover"]
    assert (await app.quota.usage(user.id, PERIOD)).used == 0


async def test_routes_no_failover_configured_gives_451(
        make_relay: RelayFactory, accounts: AccountStore) -> None:
    """With the shipped policy (no failover) an unreachable command upstream is a 451 at MAIL
    FROM, and nothing is counted."""
    app: RelayApp = await make_relay(target=UpstreamTarget("127.0.0.1", free_port(), "none"))
    user = await setup_user(accounts)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await send(app, SENDER, compose())
    assert (refused.value.code, refused.value.message[:6]) == (451, "4.4.1 ")
    assert (await app.quota.usage(user.id, PERIOD)).used == 0


# -- decided at the end of DATA ----------------------------------------------------------------
@pytest.mark.parametrize("login", ["campaigns", "smartplans"])
async def test_routes_deferred_over_limit_refuses_the_whole_message(
        routed: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, login: str) -> None:
    """Three recipients with two units left: every RCPT gets 250, DATA gets the over-limit
    550, nothing is sent or counted (all or nothing), one quota.rejected per recipient."""
    user = await setup_user(accounts, routed, limit=5)
    await redis_client.hset(keys.usage(user.id, PERIOD), mapping={"used": 3, "delivered": 3})
    rcpts = ["a@example.test", "b@example.test", "c@example.test"]
    async with smtp_client(routed, login=login) as client:
        await client.mail(SENDER)
        for rcpt in rcpts:
            assert (await client.rcpt(rcpt)).code == 250
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.data(compose())
    assert refused.value.code == 550
    assert refused.value.message.startswith("5.7.1 Monthly Command Email limit reached")
    assert upstream.messages == [] and upstream.handler.rcpt_seen == []
    usage = await routed.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.delivered, usage.routes) == (3, 3, {})
    assert sorted(e["recipient"] for e in await recorded(redis_client, REJECTED)) == rcpts


@pytest.mark.parametrize("login", ["campaigns", "smartplans"])
async def test_routes_deferred_recipient_refused_upstream_refuses_all(
        routed: RelayApp, upstream: CapturingUpstream, accounts: AccountStore, login: str
        ) -> None:
    """One recipient refused upstream refuses the whole message at DATA with that code; the
    units are refunded and no recipient is delivered."""
    upstream.behaviour.rcpt_replies["b@example.test"] = "550 5.1.1 No such user here"
    user = await setup_user(accounts, routed, limit=10)
    rcpts = ["a@example.test", "b@example.test", "c@example.test"]
    async with smtp_client(routed, login=login) as client:
        await client.mail(SENDER)
        for rcpt in rcpts:
            assert (await client.rcpt(rcpt)).code == 250
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.data(compose())
    assert refused.value.code == 550
    assert refused.value.message.startswith("5.1.1 ")
    assert "No such user here" in refused.value.message
    assert upstream.messages == []
    usage = await routed.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.in_flight, usage.delivered) == (0, 0, 0)


@pytest.mark.parametrize("ending", ["rset", "disconnect"])
@pytest.mark.parametrize("login", ["campaigns", "smartplans"])
async def test_routes_deferred_rset_or_disconnect_before_data_touches_nothing(
        routed: RelayApp, upstream: CapturingUpstream, accounts: AccountStore, login: str,
        ending: str) -> None:
    """Deferred recipients reserve nothing and open no upstream before DATA, so a RSET or a
    dropped connection leaves usage untouched."""
    user = await setup_user(accounts, routed, limit=10)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=routed.port, start_tls=False,
                             local_hostname="client.test", timeout=10)
    await client.connect()
    try:
        await client.ehlo()
        await client.login(login, PASSWORD)
        await client.mail(SENDER)
        await client.rcpt("a@example.test")
        await client.rcpt("b@example.test")
        usage = await routed.quota.usage(user.id, PERIOD)
        assert (usage.used, usage.in_flight) == (0, 0)
        if ending == "rset":
            await client.rset()
            await client.quit()
    finally:
        client.close()
    await routed.handler.drain()
    assert upstream.handler.connections == 0
    usage = await routed.quota.usage(user.id, PERIOD)
    assert (usage.used, usage.in_flight, usage.routes) == (0, 0, {})


# -- SmartPlans and the Contact Timeline -------------------------------------------------------
SMARTPLAN_HEADERS = ("X-KW-SmartPlan-Id: sp-17", "X-KW-SmartPlan-Step: 3",
                     "X-KW-Contact-Id: contact-99")


@pytest.mark.parametrize("policy_code", [550, 452])
async def test_routes_smartplan_over_limit_writes_timeline_and_is_permanent(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, tmp_path: Path, policy_code: int) -> None:
    """A SmartPlan email over the limit gets a permanent 550 even when plans.toml makes the
    over-limit reply 452, and one timeline.email_failed per recipient carries the ids."""
    policies = policies_copy(tmp_path)
    plans = policies / "plans.toml"
    plans.write_text(plans.read_text().replace("code = 550", f"code = {policy_code}")
                     .replace('status = "5.7.1"',
                              'status = "4.5.3"' if policy_code < 500 else 'status = "5.7.1"'))
    assert load_policies(policies).over_limit.code == policy_code
    app: RelayApp = await make_relay(upstream=upstream, policies_dir=policies)
    user = await setup_user(accounts, limit=1)
    await redis_client.hset(keys.usage(user.id, PERIOD), "used", 1)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(app, "smartplans", compose(*SMARTPLAN_HEADERS),
                   ["a@example.test", "b@example.test"])
    assert refused.value.code == 550
    assert refused.value.message.startswith("5.7.1 ")
    timeline = await recorded(redis_client, TIMELINE_EMAIL_FAILED)
    assert sorted(e["recipient"] for e in timeline) == ["a@example.test", "b@example.test"]
    for event in timeline:
        assert (event["reason"], event["smtp_code"], event["smartplan_id"],
                event["smartplan_step"], event["contact_id"]) == \
            ("quota", 550, "sp-17", 3, "contact-99")
        assert event["user_id"] == user.id and event["app"] == "smartplans"
        assert event["reply"].startswith("550 5.7.1 ")
        # Refused before the route was opened, the event still names the route chosen.
        assert event["route"] == "command"
    for event in await recorded(redis_client, REJECTED):
        assert event["route"] == "command"
    assert upstream.messages == []


async def test_routes_campaigns_over_limit_writes_no_timeline(
        routed: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """Only timeline apps write to the Contact Timeline: a Campaigns email over the limit
    records quota.rejected with its campaign id, and no timeline.email_failed."""
    user = await setup_user(accounts, routed, limit=1)
    await redis_client.hset(keys.usage(user.id, PERIOD), "used", 1)
    with pytest.raises(aiosmtplib.SMTPDataError):
        await send(routed, "campaigns", compose("X-KW-Campaign-Id: cmp-7"))
    assert await recorded(redis_client, TIMELINE_EMAIL_FAILED) == []
    rejected = await recorded(redis_client, REJECTED)
    assert [e["campaign_id"] for e in rejected] == ["cmp-7"]


async def test_routes_smartplan_refused_permanently_upstream_writes_timeline(
        routed: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """An upstream 554 to DATA refuses the SmartPlan email with that code, refunds its unit,
    and writes timeline.email_failed with reason "refused"."""
    upstream.behaviour.data_reply = "554 5.6.0 Message content rejected"
    user = await setup_user(accounts, routed, limit=10)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(routed, "smartplans", compose(*SMARTPLAN_HEADERS))
    assert refused.value.code == 554
    assert refused.value.message.startswith("5.6.0 ")
    timeline = await recorded(redis_client, TIMELINE_EMAIL_FAILED)
    assert [(e["reason"], e["recipient"], e["smtp_code"], e["smartplan_id"],
             e["smartplan_step"], e["contact_id"]) for e in timeline] == \
        [("refused", "client@example.test", 554, "sp-17", 3, "contact-99")]
    assert "Message content rejected" in timeline[0]["reply"]
    assert (await routed.quota.usage(user.id, PERIOD)).used == 0


@pytest.mark.parametrize("where", ["data", "rcpt"])
async def test_routes_smartplan_temporary_failure_writes_no_timeline(
        routed: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, where: str) -> None:
    """A temporary upstream failure (451) is passed on for a retry: no timeline entry, no
    unit kept."""
    if where == "data":
        upstream.behaviour.data_reply = "451 4.3.0 Try again later"
    else:
        upstream.behaviour.rcpt_replies["client@example.test"] = "451 4.3.0 Try again later"
    user = await setup_user(accounts, routed, limit=10)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(routed, "smartplans", compose(*SMARTPLAN_HEADERS))
    assert refused.value.code == 451
    assert await recorded(redis_client, TIMELINE_EMAIL_FAILED) == []
    assert (await routed.quota.usage(user.id, PERIOD)).used == 0


class TimelineReceiver:
    """The CRM's Contact Timeline endpoint: aiohttp on 127.0.0.1, port 0, answers 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        app = web.Application()
        app.router.add_post("/timeline", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        return web.Response(status=200)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        await self._runner.cleanup()


async def test_routes_smartplan_failure_reaches_the_timeline_webhook(
        routed: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis) -> None:
    """The full loop: a SmartPlan email over the limit is posted, signed, by the notifier's
    timeline channel to the CRM with the SmartPlan and contact ids."""
    secret = "timeline-secret-0123456789abcdef"
    user = await setup_user(accounts, routed, limit=1)
    await redis_client.hset(keys.usage(user.id, PERIOD), "used", 1)
    receiver = TimelineReceiver()
    await receiver.start()
    stop = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as http:
            channel = WebhookChannel(f"http://127.0.0.1:{receiver.port}/timeline", secret,
                                     timeout=5, session=http, name="timeline")
            notifier = Notifier(redis_client, {"timeline": channel},
                                load_policies(POLICIES).notifications, consumer="n-test")
            task = asyncio.create_task(notifier.run(stop))
            try:
                with pytest.raises(aiosmtplib.SMTPDataError):
                    await send(routed, "smartplans", compose(*SMARTPLAN_HEADERS))
                await wait_for(lambda: receiver.requests, seconds=10)
            finally:
                stop.set()
                await task
    finally:
        await receiver.stop()
    assert len(receiver.requests) == 1
    headers, body = receiver.requests[0]
    event = json.loads(body)
    assert event["kind"] == TIMELINE_EMAIL_FAILED
    assert (event["reason"], event["recipient"], event["smtp_code"], event["smartplan_id"],
            event["smartplan_step"], event["contact_id"], event["user_id"]) == \
        ("quota", "client@example.test", 550, "sp-17", 3, "contact-99", user.id)
    assert headers["X-Relay-Event"] == TIMELINE_EMAIL_FAILED
    assert headers["Idempotency-Key"] == event["id"]
    assert headers[SIGNATURE_HEADER] == sign(secret.encode(), headers[TIMESTAMP_HEADER], body)


# -- bad control headers -----------------------------------------------------------------------
@pytest.mark.parametrize(("header", "problem"), [
    ("X-KW-SmartPlan-Step: abc", "invalid X-KW-smartplan-step"),
    ("X-KW-SmartPlan-Step: \u00b2", "invalid X-KW-smartplan-step"),
    ("X-KW-Contact-Id: not valid!", "invalid X-KW-contact-id"),
    ("X-KW-Colour: blue", "unknown header X-KW-colour"),
])
async def test_routes_invalid_control_header_is_ignored_and_logged(
        routed: RelayApp, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, header: str, problem: str) -> None:
    """A bad control value never fails the message: it is delivered (control headers
    stripped), counted once, and controls.ignored names the problem."""
    user = await setup_user(accounts, routed, limit=10)
    original = compose("X-KW-SmartPlan-Id: sp-17", header)
    with capture_logs() as logs:
        errors, _ = await send(routed, "smartplans", original)
    assert errors == {}
    assert after_received(upstream.messages[0].content) == without(original, b"x-kw-")
    ignored = [e for e in logs if e["event"] == "controls.ignored"]
    assert [e["problems"] for e in ignored] == [[problem]]
    finished = [e for e in logs if e["event"] == "delivery.finished"]
    assert finished[0]["outcome"] == "delivered" and finished[0]["smartplan_id"] == "sp-17"
    assert (await routed.quota.usage(user.id, PERIOD)).used == 1


async def test_routes_mailchimp_deliveries_set_its_upstream_up_gauge(
        routed: RelayApp, upstream: CapturingUpstream, mailchimp: CapturingUpstream,
        accounts: AccountStore) -> None:
    """relay_upstream_up{pool="mailchimp"} follows the MailChimp route's own connections: 1
    after a delivery through it, 0 once a connection to it fails; the default pool's gauge
    is its own."""
    from tests.scraping import scrape

    await setup_user(accounts, routed)
    before = await scrape(routed.metrics_port)
    assert before.value("relay_upstream_up", pool="mailchimp") == 0
    errors, _ = await send(routed, "campaigns", compose("X-KW-Route: mailchimp"))
    assert errors == {} and len(mailchimp.messages) == 1
    after = await scrape(routed.metrics_port)
    assert after.value("relay_upstream_up", pool="mailchimp") == 1
    await mailchimp.stop()
    # Stopping the server leaves the pooled connection open: drop the pools, so the next
    # send has to connect.
    await routed.routes.close()
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(routed, "campaigns", compose("X-KW-Route: mailchimp"))
    assert refused.value.code == 451
    assert (await scrape(routed.metrics_port)).value("relay_upstream_up", pool="mailchimp") == 0
