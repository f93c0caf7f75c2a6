"""Every failure path: nothing acknowledged that the upstream did not accept, nothing counted
that was not sent, and a temporary reply (never a hang) when Redis or the upstream is down."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib
import pytest
from structlog.testing import capture_logs

from relay.accounts import AccountStore
from relay.store import connect_redis
from tests.conftest import (
    CapturingUpstream,
    RedisServer,
    RelayFactory,
    add_user,
    message,
    smtp_client,
    wait_for,
)


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


async def test_failures_disconnect_while_upstream_answers_data_stays_counted(
        relay, upstream, accounts):
    """Cut off after the message went upstream and before its reply: the upstream may have
    accepted it, so the unit stays counted (high, never low) and the case is logged."""
    user = await add_user(accounts)
    upstream.behaviour.data_gate = asyncio.Event()
    with capture_logs() as logs:
        async with smtp_client(relay) as client:
            await client.mail("agent@kw.test")
            await client.rcpt("a@example.test")
            sending = asyncio.create_task(client.data(message()))
            await upstream.handler.data_started.wait()  # the message is at the upstream
            client.close()
            with pytest.raises(aiosmtplib.SMTPException):
                await sending
        upstream.behaviour.data_gate.set()
        await wait_for(lambda: any(e["event"] == "quota.unreconciled" for e in logs))
        await relay.handler.drain()
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
