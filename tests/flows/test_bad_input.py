"""Bad SMTP input gets a clear reply and a log line, never a traceback, a hang or a crash; and
the SMTP-smuggling sequences cannot inject a second message upstream."""

from __future__ import annotations

import asyncio
import base64

from tests.conftest import add_user, message, smtp_client
from tests.rawsmtp import RawSMTP


async def test_bad_input_gets_clear_replies_and_server_survives(relay, upstream, accounts):
    """Garbage, overlong and out-of-order commands each get a 5xx reply; the relay still
    serves a normal session afterwards."""
    await add_user(accounts)
    raw = await RawSMTP.open(relay.port)
    try:
        cases = [
            (b"\r\n", "500"),
            (b"HELLO there\r\n", "500"),
            (b"\xff\xfe garbage\r\n", "500"),
            (b"MAIL FROM:<agent@kw.test>\r\n", "503"),  # before EHLO
            (b"EHLO raw.test\r\n", "250"),
            (b"MAIL FROM:<agent@kw.test>\r\n", "530"),  # before AUTH
            (b"RCPT TO:<a@example.test>\r\n", "503"),
            (b"DATA\r\n", "503"),
            (b"AUTH CRAM-MD5\r\n", "504"),
            (b"X" * 5000 + b"\r\n", "500"),
        ]
        for line, code in cases:
            reply = await raw.send(line)
            assert reply.startswith(code), (line[:30], reply)
        await raw.login()
        for line, code in [
            (b"MAIL FROM:agent@kw.test garbage=\r\n", "5"),
            (b"MAIL FROM:<not an address>\r\n", "5"),
            (b"MAIL FROM:<agent@kw.test> BODY=9BIT\r\n", "501"),
            (b"MAIL FROM:<agent@kw.test>\r\n", "250"),
            (b"MAIL FROM:<agent@kw.test>\r\n", "503"),  # nested MAIL
            (b"RCPT TO:<a@example.test> NOTIFY=NEVER\r\n", "555"),
            (b"RCPT TO:<>\r\n", "5"),
            (b"DATA\r\n", "503"),
        ]:
            reply = await raw.send(line)
            assert reply.startswith(code), (line[:40], reply)
            assert "Traceback" not in reply and "Error: (" not in reply
    finally:
        await raw.close()
    async with smtp_client(relay) as client:
        errors, _ = await client.sendmail("agent@kw.test", ["a@example.test"], message())
    assert errors == {}


async def test_bad_input_smuggling_cannot_inject_a_second_message(relay, upstream, accounts):
    """Bare-LF end-of-data sequences (<LF>.<LF>, <LF>.<CR><LF>) are message content, not the
    end of DATA: the upstream receives one message, with no smuggled MAIL FROM acted on, and
    the lone dots stuffed so they cannot end DATA upstream either."""
    user = await add_user(accounts)
    raw = await RawSMTP.open(relay.port)
    try:
        await raw.login()
        assert (await raw.send(b"MAIL FROM:<agent@kw.test>\r\n")).startswith("250")
        assert (await raw.send(b"RCPT TO:<a@example.test>\r\n")).startswith("250")
        assert (await raw.send(b"DATA\r\n")).startswith("354")
        body = (b"Subject: one\r\n\r\nfirst\n.\nMAIL FROM:<agent@kw.test>\n"
                b"RCPT TO:<victim@example.test>\nDATA\n\nsmuggled\r\n"
                b"more\n.\r\nstill one\r\n.\r\n")
        reply = await raw.send(body)
        assert reply.startswith("250 2.0.0"), reply
        assert (await raw.send(b"QUIT\r\n")).startswith("221")
    finally:
        await raw.close()
    assert len(upstream.messages) == 1
    assert upstream.messages[0].rcpt_tos == ["a@example.test"]
    assert upstream.handler.rcpt_seen == ["a@example.test"]
    assert b"smuggled" in upstream.messages[0].content
    assert (await relay.quota.usage(user.id, "2026-11")).used == 1


async def test_bad_input_dot_stuffing_round_trips(relay, upstream, accounts):
    """Lines that start with dots (stuffed by the client) arrive with exactly the dots the
    author wrote."""
    await add_user(accounts)
    raw = await RawSMTP.open(relay.port)
    try:
        await raw.login()
        await raw.send(b"MAIL FROM:<agent@kw.test>\r\n")
        await raw.send(b"RCPT TO:<a@example.test>\r\n")
        await raw.send(b"DATA\r\n")
        reply = await raw.send(b"Subject: dots\r\n\r\n..\r\n...two\r\n..one\r\nnone\r\n.\r\n")
        assert reply.startswith("250")
    finally:
        await raw.close()
    assert upstream.messages[0].content.endswith(b"\r\n\r\n.\r\n..two\r\n.one\r\nnone\r\n")


async def test_bad_input_idle_client_is_disconnected(make_relay, upstream, accounts):
    """A client that stops talking gets 421 4.4.2 and is disconnected after the idle timeout,
    with its reservations refunded (no hang, no leak)."""
    user = await add_user(accounts)
    app = await make_relay(upstream=upstream, idle_timeout=1.5)
    raw = await RawSMTP.open(app.port)
    try:
        await raw.login()
        await raw.send(b"MAIL FROM:<agent@kw.test>\r\n")
        await raw.send(b"RCPT TO:<a@example.test>\r\n")
        assert (await app.quota.usage(user.id, "2026-11")).used == 1
        closed = await asyncio.wait_for(raw.reader.read(), 10)  # all until closed
        assert closed == b"421 4.4.2 Timeout, closing connection\r\n"
    finally:
        await raw.close()
    await app.handler.drain()
    assert (await app.quota.usage(user.id, "2026-11")).used == 0


async def test_bad_input_auth_attempts_are_limited_per_connection(relay, accounts):
    """After five AUTH attempts on one connection the relay answers 421 and hangs up."""
    await add_user(accounts)
    raw = await RawSMTP.open(relay.port)
    try:
        assert (await raw.send(b"EHLO raw.test\r\n")).startswith("250")
        bad = base64.b64encode(b"\0agent@kw.test\0wrong")
        for _ in range(5):
            assert (await raw.send(b"AUTH PLAIN " + bad + b"\r\n")).startswith("535")
        assert (await raw.send(b"AUTH PLAIN " + bad + b"\r\n")).startswith("421")
        assert await asyncio.wait_for(raw.reader.read(), 10) == b""
    finally:
        await raw.close()
