"""Every failure path: nothing acknowledged that the upstream did not accept, nothing counted
that was not sent, and a temporary reply (never a hang) when Redis or the upstream is down."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib
import pytest
from structlog.testing import capture_logs

from relay.identity.accounts import AccountStore
from relay.store.client import connect_redis
from tests.conftest import (
    CapturingUpstream,
    RedisServer,
    RelayFactory,
    add_app,
    add_user,
    message,
    smtp_client,
    wait_for,
)
from tests.scraping import scrape


async def _used(app, user_id: str) -> int:
    return (await app.quota.usage(user_id, "2026-11")).used


@pytest.mark.parametrize("reply", ["450 4.2.1 Mailbox busy", "550 5.1.1 No such user"])
async def test_failures_upstream_refuses_recipient_refunds_it(relay, upstream, accounts, reply):
    """A recipient the upstream refuses is refused to the client with the upstream's class and
    status, and its unit is refunded; the others are delivered and counted."""
    user = await add_user(accounts)
    upstream.behaviour.rcpt_replies["bad@example.test"] = reply
    async with smtp_client(relay) as client:
        errors, _ = await client.sendmail("agent@kw.test", ["ok@example.test",
                                                             "bad@example.test"], message())
    code, status = int(reply[:3]), reply.split()[1]
    assert errors["bad@example.test"].code == code
    assert errors["bad@example.test"].message.startswith(status)
    assert upstream.messages[0].rcpt_tos == ["ok@example.test"]
    assert await _used(relay, user.id) == 1


@pytest.mark.parametrize("reply", ["451 4.3.0 Try later", "554 5.6.0 Content rejected"])
async def test_failures_upstream_refuses_data_refunds_all(relay, upstream, accounts, reply):
    """When the upstream refuses the message, the client gets that 4xx/5xx (never a 250) and
    none of the recipients is counted."""
    user = await add_user(accounts)
    upstream.behaviour.data_reply = reply
    with capture_logs() as logs:
        async with smtp_client(relay) as client:
            with pytest.raises(aiosmtplib.SMTPDataError) as refused:
                await client.sendmail("agent@kw.test", ["a@example.test", "b@example.test"],
                                      message())
    assert refused.value.code == int(reply[:3])
    assert refused.value.message.startswith(reply.split()[1] + " Upstream:")
    assert await _used(relay, user.id) == 0
    outcome = [e["outcome"] for e in logs if e["event"] == "delivery.finished"]
    assert outcome == ["deferred" if reply[0] == "4" else "failed"]


async def test_failures_rset_refunds_open_reservations(relay, upstream, accounts):
    """RSET after RCPT gives the units back; a following transaction is unaffected."""
    user = await add_user(accounts)
    async with smtp_client(relay) as client:
        await client.mail("agent@kw.test")
        await client.rcpt("a@example.test")
        await client.rcpt("b@example.test")
        assert await _used(relay, user.id) == 2
        await client.rset()
        await wait_for(lambda: _refunded(relay, user.id, 0))
        await client.sendmail("agent@kw.test", ["c@example.test"], message())
    assert await _used(relay, user.id) == 1
    assert [m.rcpt_tos for m in upstream.messages] == [["c@example.test"]]


async def _refunded(app, user_id: str, expected: int) -> bool:
    return await _used(app, user_id) == expected


async def test_failures_disconnect_before_data_refunds(relay, upstream, accounts):
    """A client that vanishes after RCPT is not charged."""
    user = await add_user(accounts)
    async with smtp_client(relay) as client:
        await client.mail("agent@kw.test")
        await client.rcpt("a@example.test")
        assert await _used(relay, user.id) == 1
        client.close()  # drop the TCP connection without QUIT
    await wait_for(lambda: _refunded(relay, user.id, 0))
    assert upstream.messages == []


@pytest.mark.parametrize("data_reply", [None, "554 5.6.0 Message refused"])
async def test_failures_disconnect_while_upstream_answers_data_is_settled_on_its_reply(
        relay, upstream, accounts, data_reply):
    """Cut off after the final dot, while the upstream holds its reply: the dot committed the
    message, so the relay still hears the upstream out and counts exactly its outcome (250:
    committed; a refusal: refunded), with the canonical line of a finished delivery."""
    user = await add_user(accounts)
    upstream.behaviour.data_gate = asyncio.Event()
    upstream.behaviour.data_reply = data_reply
    with capture_logs() as logs:
        async with smtp_client(relay) as client:
            await client.mail("agent@kw.test")
            await client.rcpt("a@example.test")
            sending = asyncio.create_task(client.data(message()))
            await upstream.handler.data_started.wait()  # the message is at the upstream
            client.close()
            with pytest.raises(aiosmtplib.SMTPException):
                await sending
        assert relay.handler.deliveries == 1  # outlived its client
        upstream.behaviour.data_gate.set()
        await relay.handler.drain()
    finished = [e for e in logs if e["event"] == "delivery.finished"]
    usage = await relay.quota.usage(user.id, "2026-11")
    if data_reply is None:
        assert [e["outcome"] for e in finished] == ["delivered"]
        assert (usage.used, usage.delivered, len(upstream.messages)) == (1, 1, 1)
    else:
        assert [e["outcome"] for e in finished] == ["failed"]
        assert (usage.used, usage.delivered) == (0, 0)
    assert not any(e["event"] == "quota.unreconciled" for e in logs)


async def test_failures_stop_cuts_a_delivery_that_outlives_the_drain(relay, upstream,
                                                                     accounts):
    """A delivery whose upstream never answers does not hold the relay's stop for ever: past
    the drain (and its short grace) it is cut, and its unit stays counted (high, never low:
    the upstream may have taken the message), logged for reconciliation."""
    user = await add_user(accounts)
    upstream.behaviour.data_gate = asyncio.Event()
    with capture_logs() as logs:
        async with smtp_client(relay) as client:
            await client.mail("agent@kw.test")
            await client.rcpt("a@example.test")
            sending = asyncio.create_task(client.data(message()))
            await upstream.handler.data_started.wait()
            client.close()
            with pytest.raises(aiosmtplib.SMTPException):
                await sending
        await relay.handler.drain(0.05)
        upstream.behaviour.data_gate.set()
    assert relay.handler.deliveries == 0
    assert [e["reason"] for e in logs if e["event"] == "quota.unreconciled"] == ["cancelled"]
    assert any(e["event"] == "relay.deliveries_cut" for e in logs)
    assert await _used(relay, user.id) == 1


async def test_failures_upstream_down_gives_451_and_counts_nothing(relay, upstream, accounts):
    """With the upstream unreachable MAIL gets 451 4.4.1; nothing is reserved."""
    user = await add_user(accounts)
    await upstream.stop()
    async with smtp_client(relay) as client:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.mail("agent@kw.test")
    assert (refused.value.code, refused.value.message[:5]) == (451, "4.4.1")
    assert await _used(relay, user.id) == 0


async def test_failures_upstream_pool_busy_gives_451_4_4_5(make_relay, upstream, accounts):
    """Every connection of the upstream pool stays busy for the whole wait (the upstream
    timeout): the upstream is reachable, the relay is congested, so MAIL gets 451 4.4.5
    (RFC 3463 system congestion), not 4.4.1 (unreachable). Nothing is reserved, the refusal
    is logged and counted like the other upstream refusals, and the transaction holding the
    connection is unaffected."""
    user = await add_user(accounts)
    relay = await make_relay(upstream=upstream, upstream_pool_size=1, upstream_timeout=2)
    with capture_logs() as logs:
        async with smtp_client(relay) as holder:
            await holder.mail("agent@kw.test")  # opens, and holds, the pool's one connection
            async with smtp_client(relay) as waiting:
                with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                    await waiting.mail("agent@kw.test")
            await holder.rcpt("a@example.test")
            await holder.data(message())
    assert (refused.value.code, refused.value.message) == (
        451, "4.4.5 Upstream connections all busy, try again later")
    assert [m.rcpt_tos for m in upstream.messages] == [["a@example.test"]]
    assert await _used(relay, user.id) == 1
    assert [e["reason"] for e in logs if e["event"] == "mail.refused"] == ["UpstreamBusyError"]
    finished = {e["outcome"]: e for e in logs if e["event"] == "delivery.finished"}
    assert sorted(finished) == ["deferred", "delivered"]
    assert (finished["deferred"]["smtp_code"], finished["deferred"]["reason"]) == (
        451, "UpstreamBusyError")
    scraped = await scrape(relay.metrics_port)
    assert scraped.value("relay_upstream_pool_timeouts_total", pool="default") == 1
    assert scraped.value("relay_mail_from_total", outcome="refused",
                         reason="UpstreamBusyError") == 1


async def test_failures_upstream_drops_idle_connection_is_reconnected(relay, upstream,
                                                                      accounts):
    """A pooled connection the upstream closed while idle is replaced transparently."""
    await add_user(accounts)
    async with smtp_client(relay) as client:
        await client.sendmail("agent@kw.test", ["a@example.test"], message())
    # Restart the upstream on the same port: the pooled connection is now dead.
    port = upstream.port
    await upstream.stop()
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    upstream.server = await loop.create_server(upstream._factory, "127.0.0.1", port)
    async with smtp_client(relay) as client:
        errors, _ = await client.sendmail("agent@kw.test", ["b@example.test"], message())
    assert errors == {}
    assert [m.rcpt_tos for m in upstream.messages] == [["a@example.test"], ["b@example.test"]]


async def test_failures_redis_down_mid_session_then_back(make_relay: RelayFactory,
                                                         upstream: CapturingUpstream,
                                                         tmp_path: Path):
    """Redis going away makes MAIL/RCPT answer 451 4.3.0 (fail closed, nothing relayed); when
    it is back the same session sends again, with no restart of the relay."""
    server = RedisServer(tmp_path / "redis-down")
    server.start()
    client = connect_redis(server.url, timeout=0.5)
    try:
        await add_user(AccountStore(client), user_id="u-fixed")
        app = await make_relay(upstream=upstream, redis=client)
        async with smtp_client(app) as smtp:
            await smtp.mail("agent@kw.test")
            server.stop()
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await smtp.rcpt("a@example.test")
            assert (refused.value.code, refused.value.message[:5]) == (451, "4.3.0")
            await smtp.rset()
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused_mail:
                await smtp.mail("agent@kw.test")
            assert refused_mail.value.code == 451
            await smtp.rset()
            server.start()
            # Persistence is off, so the restarted Redis is empty: the same user again.
            user = await add_user(AccountStore(client), user_id="u-fixed")
            errors, _ = await smtp.sendmail(user.email, ["b@example.test"], message())
            assert errors == {}
        assert [m.rcpt_tos for m in upstream.messages] == [["b@example.test"]]
    finally:
        await client.aclose()
        server.stop()


async def test_failures_internal_error_reply_hides_the_exception(relay):
    """A bug answers a generic 451 4.3.0; the exception text never reaches the client."""
    with capture_logs() as logs:
        reply = await relay.handler.handle_exception(RuntimeError("secret detail"))
    assert reply == "451 4.3.0 Internal error, try again later"
    assert logs[0]["event"] == "session.exception"


async def _refuse_mail(relay, upstream, accounts, case: str) -> tuple[str, int]:
    """Set up one kind of MAIL FROM refusal; returns the login and the expected code."""
    if case == "upstream_down":
        await add_user(accounts)
        await upstream.stop()
        return "agent@kw.test", 451
    if case == "sender_not_allowed":
        await add_user(accounts)
        await add_user(accounts, "other@kw.test")
        return "agent@kw.test", 553
    await add_app(accounts, "command")  # an app sending for an address nobody owns
    return "command", 550


@pytest.mark.parametrize(("case", "outcome"), [("upstream_down", "deferred"),
                                               ("sender_not_allowed", "rejected"),
                                               ("unknown_sender", "rejected")])
async def test_failures_mail_from_refusal_ends_in_one_canonical_line(relay, upstream, accounts,
                                                                     case, outcome):
    """A transaction refused at MAIL FROM (upstream unreachable, sender not the login's, a
    sender nobody owns) still ends in exactly one delivery.finished line, with the outcome
    by the reply's class, its code and the session's fields, and counts in
    relay_messages_total; so the jq recipe for non-delivered outcomes sees an outage."""
    login, code = await _refuse_mail(relay, upstream, accounts, case)
    sender = "other@kw.test" if case == "sender_not_allowed" else (
        "nobody@kw.test" if case == "unknown_sender" else "agent@kw.test")
    before = relay.metrics.messages(outcome, "none")._value.get()
    with capture_logs() as logs:
        async with smtp_client(relay, login=login) as client:
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await client.mail(sender)
    assert refused.value.code == code
    finished = [e for e in logs if e["event"] == "delivery.finished"]
    assert len(finished) == 1, finished
    line = finished[0]
    assert (line["outcome"], line["smtp_code"], line["rcpt_accepted"]) == (outcome, code, 0)
    assert line["log_level"] == "info"
    assert line["login"] == login and line["sender_domain"] == "kw.test"
    assert len(line["txn_id"]) == 16
    assert isinstance(line["duration_ms"], float)
    if case == "upstream_down":
        assert line["reason"] == "UpstreamUnavailableError"
        assert line["route"] == "command" and line["plan"] == "free"
        assert line["user_id"] and line["period"]
    assert relay.metrics.messages(outcome, "none")._value.get() == before + 1


async def test_failures_refused_mail_then_a_sent_message_are_two_lines(relay, upstream,
                                                                      accounts):
    """A refused MAIL FROM and the next, delivered transaction on the same connection end in
    one canonical line each (no line is doubled, none is missing)."""
    await add_user(accounts)
    await add_user(accounts, "other@kw.test")
    with capture_logs() as logs:
        async with smtp_client(relay) as client:
            with pytest.raises(aiosmtplib.SMTPSenderRefused):
                await client.mail("other@kw.test")
            await client.sendmail("agent@kw.test", ["a@example.test"], message())
    finished = [e for e in logs if e["event"] == "delivery.finished"]
    assert [e["outcome"] for e in finished] == ["rejected", "delivered"]
    assert finished[0]["txn_id"] != finished[1]["txn_id"]
