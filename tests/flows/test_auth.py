"""AUTH end to end: required, only over TLS (or loopback with the development switch), both
credential kinds, sender ownership, and Redis outages during AUTH."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import ssl
from pathlib import Path

import aiosmtplib
import pytest
from structlog.testing import capture_logs

from relay.identity.accounts import DISABLED, AccountStore
from tests.conftest import (
    PASSWORD,
    CapturingUpstream,
    RedisServer,
    RelayFactory,
    add_app,
    add_user,
    message,
    smtp_client,
)


def _unverified() -> ssl.SSLContext:
    # The relay's development certificate is self-signed.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def test_auth_mail_without_auth_is_refused(relay, upstream, accounts):
    """MAIL before AUTH gets 530 5.7.0 and nothing reaches the upstream."""
    await add_user(accounts)
    async with smtp_client(relay, login=None) as client:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.mail("agent@kw.test")
    assert refused.value.code == 530
    assert refused.value.message.startswith("5.7.0")
    assert upstream.messages == []


async def test_auth_not_offered_before_starttls(make_relay: RelayFactory,
                                                upstream: CapturingUpstream, accounts):
    """Without the loopback switch, AUTH is neither advertised nor accepted before STARTTLS."""
    await add_user(accounts)
    app = await make_relay(upstream=upstream, allow_plaintext_auth=False)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.port, start_tls=False,
                             local_hostname="client.test")
    await client.connect()
    try:
        await client.ehlo()
        assert "auth" not in client.esmtp_extensions
        assert "starttls" in client.esmtp_extensions
        reply = await client.execute_command(b"AUTH", b"PLAIN",
                                             base64.b64encode(b"\0agent@kw.test\0" +
                                                              PASSWORD.encode()))
        assert reply.code == 538
        await client.starttls(validate_certs=False)
        await client.ehlo()
        assert set(client.esmtp_extensions["auth"].split()) == {"PLAIN", "LOGIN"}
        await client.login("agent@kw.test", PASSWORD)
        errors, _ = await client.sendmail("agent@kw.test", ["x@example.test"], message())
        assert errors == {}
    finally:
        client.close()
    assert len(upstream.messages) == 1


async def test_auth_plain_and_login_over_starttls_with_smtplib(make_relay: RelayFactory,
                                                               upstream: CapturingUpstream,
                                                               accounts):
    """smtplib (a real client in a thread) authenticates with PLAIN and LOGIN after STARTTLS."""
    await add_user(accounts)
    app = await make_relay(upstream=upstream, allow_plaintext_auth=False)

    def send(mechanism: str) -> None:
        with smtplib.SMTP("127.0.0.1", app.port, local_hostname="client.test",
                          timeout=10) as smtp:
            smtp.starttls(context=_unverified())
            smtp.ehlo()
            smtp.user, smtp.password = "agent@kw.test", PASSWORD
            code, _ = smtp.auth(mechanism, getattr(smtp, f"auth_{mechanism.lower()}"),
                                initial_response_ok=mechanism == "PLAIN")
            assert code == 235
            smtp.sendmail("agent@kw.test", ["client@example.test"], message())

    await asyncio.to_thread(send, "PLAIN")
    await asyncio.to_thread(send, "LOGIN")
    assert len(upstream.messages) == 2


async def test_auth_implicit_tls_listener(make_relay: RelayFactory, upstream: CapturingUpstream,
                                          accounts, base_settings):
    """On the implicit-TLS (SMTPS) listener AUTH works from the first command."""
    from relay.config.endpoints import Endpoint

    await add_user(accounts)
    app = await make_relay(upstream=upstream, allow_plaintext_auth=False,
                           smtps_listen=Endpoint("127.0.0.1", 0))
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.smtps_port, use_tls=True,
                             validate_certs=False, local_hostname="client.test")
    async with client:
        await client.login("agent@kw.test", PASSWORD)
        await client.sendmail("agent@kw.test", ["x@example.test"], message())
    assert b"with ESMTPSA" in upstream.messages[0].content


@pytest.mark.parametrize(("login", "password"), [
    ("agent@kw.test", "wrong password"),
    ("nobody@kw.test", PASSWORD),
    ("no-such-app", PASSWORD),
    ("", PASSWORD),
])
async def test_auth_bad_credentials_get_535(relay, accounts, login, password):
    """Wrong password, unknown user or unknown app: 535 5.7.8, logged without the password."""
    await add_user(accounts)
    await add_app(accounts)
    with capture_logs() as logs:
        async with smtp_client(relay, login=None) as client:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
                await client.auth_plain(login, password)
    assert failed.value.code == 535
    assert failed.value.message.startswith("5.7.8")
    events = [e for e in logs if e["event"] == "auth.failed"]
    assert len(events) == 1
    assert password not in repr(logs)


async def test_auth_disabled_user_cannot_log_in(relay, accounts):
    """A disabled user's credential is refused like a wrong password."""
    user = await add_user(accounts)
    await accounts.set_user_status(user.id, DISABLED)
    async with smtp_client(relay, login=None) as client:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
            await client.login("agent@kw.test", PASSWORD)
    assert failed.value.code == 535


async def test_auth_user_credential_only_sends_from_own_addresses(relay, upstream, accounts):
    """A user credential may use its own addresses (any case), not another user's."""
    await add_user(accounts, senders=("team@kw.test",))
    await add_user(accounts, "other@kw.test")
    async with smtp_client(relay) as client:
        await client.sendmail("Team@KW.test", ["x@example.test"], message())
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.mail("other@kw.test")
    assert refused.value.code == 553
    assert refused.value.message.startswith("5.7.1")
    assert [m.mail_from for m in upstream.messages] == ["Team@KW.test"]


async def test_auth_app_credential_sends_for_any_active_user(relay, upstream,
                                                             accounts: AccountStore, redis_client):
    """An app credential sends for whoever owns MAIL FROM, and the send counts against them."""
    alice = await add_user(accounts, "alice@kw.test", password=False)
    bob = await add_user(accounts, "bob@kw.test", password=False)
    await add_app(accounts, "smartplans")
    with capture_logs() as logs:
        async with smtp_client(relay, login="smartplans") as client:
            await client.sendmail("alice@kw.test", ["x@example.test"], message())
            await client.sendmail("bob@kw.test", ["x@example.test", "y@example.test"], message())
    assert len(upstream.messages) == 2
    assert (await relay.quota.usage(alice.id, "2026-11")).used == 1
    assert (await relay.quota.usage(bob.id, "2026-11")).used == 2
    finished = [e for e in logs if e["event"] == "delivery.finished"]
    assert {e["app"] for e in finished} == {"smartplans"}
    assert {e["user_id"] for e in finished} == {alice.id, bob.id}


async def test_auth_app_credential_refused_for_unknown_or_disabled_sender(relay, upstream,
                                                                          accounts):
    """An app may not send from an address nobody owns, nor for a disabled user (5.7.1)."""
    carol = await add_user(accounts, "carol@kw.test", password=False)
    await accounts.set_user_status(carol.id, DISABLED)
    await add_app(accounts, "campaigns")
    async with smtp_client(relay, login="campaigns") as client:
        for sender in ("stranger@example.test", "carol@kw.test"):
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await client.mail(sender)
            assert refused.value.code == 550
            assert refused.value.message.startswith("5.7.1")
            await client.rset()
    assert upstream.messages == []


async def test_auth_sasl_protocol_errors_get_clear_replies(relay, accounts):
    """Bad base64, a foreign authzid and a '*' abort each get a 501, and the session goes on."""
    await add_user(accounts)
    async with smtp_client(relay, login=None) as client:
        reply = await client.execute_command(b"AUTH", b"PLAIN", b"%%%not-base64")
        assert reply.code == 501
        foreign = base64.b64encode(b"boss@kw.test\0agent@kw.test\0" + PASSWORD.encode())
        reply = await client.execute_command(b"AUTH", b"PLAIN", foreign)
        assert reply.code == 501
        reply = await client.execute_command(b"AUTH", b"LOGIN")
        assert reply.code == 334
        reply = await client.execute_command(b"*")
        assert reply.code == 501
        await client.login("agent@kw.test", PASSWORD)


async def test_auth_redis_down_gives_454_then_recovers(make_relay: RelayFactory,
                                                       upstream: CapturingUpstream,
                                                       tmp_path: Path):
    """With Redis unreachable AUTH answers 454 4.7.0 (temporary), and works once it is back."""
    from relay.store.client import connect_redis

    server = RedisServer(tmp_path / "redis-auth")
    server.start()
    client = connect_redis(server.url, timeout=0.5)
    try:
        await add_user(AccountStore(client))
        app = await make_relay(upstream=upstream, redis=client)
        server.stop()
        async with smtp_client(app, login=None) as smtp:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
                await smtp.login("agent@kw.test", PASSWORD)
        assert failed.value.code == 454
        # Persistence is off, so the restarted server is empty: recreate the user.
        server.start()
        await add_user(AccountStore(client))
        async with smtp_client(app) as smtp:
            await smtp.sendmail("agent@kw.test", ["x@example.test"], message())
        assert len(upstream.messages) == 1
    finally:
        await client.aclose()
        server.stop()
