"""relay/smtp/timeouts.py with real clients on a relay started in process: the idle timeout,
the transaction deadline (on a slow transaction and on a DATA body that never ends) and its
end with the transaction; each cut is a 421 4.4.2, a session.timeout line and a refund."""

from __future__ import annotations

import asyncio
from typing import Any

from structlog.testing import capture_logs

from tests.conftest import add_user, message, smtp_client
from tests.rawsmtp import RawSMTP


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def test_transaction_timeout_cuts_a_slow_transaction(make_relay, upstream,
                                                                   accounts):
    """A transaction still open after transaction_timeout (here: RCPTs then silence, well
    inside the idle timeout) gets 421 4.4.2, is closed and refunded, with session.timeout."""
    user = await add_user(accounts)
    app = await make_relay(upstream=upstream, idle_timeout=60, transaction_timeout=2)
    with capture_logs() as logs:
        raw = await RawSMTP.connect(app.port)
        try:
            assert (await raw.reply()).startswith("220")
            await raw.login("client.test")
            assert (await raw.send(b"MAIL FROM:<agent@kw.test>\r\n")).startswith("250")
            assert (await raw.send(b"RCPT TO:<a@example.test>\r\n")).startswith("250")
            assert await raw.rest() == b"421 4.4.2 Timeout, closing connection\r\n"
        finally:
            await raw.close()
        await app.handler.drain()
    (timeout,) = events(logs, "session.timeout")
    assert (timeout["timeout"], timeout["smtp_code"], timeout["log_level"]) == \
        ("transaction", 421, "info")
    assert (await app.quota.usage(user.id, "2026-11")).used == 0
    assert upstream.messages == []


async def test_transaction_timeout_cuts_a_slow_data(make_relay, upstream, accounts):
    """A DATA body that never ends is cut at the transaction deadline: 421 4.4.2, nothing
    delivered, the units refunded."""
    user = await add_user(accounts)
    app = await make_relay(upstream=upstream, idle_timeout=60, transaction_timeout=2)
    with capture_logs() as logs:
        raw = await RawSMTP.connect(app.port)
        try:
            assert (await raw.reply()).startswith("220")
            await raw.login("client.test")
            assert (await raw.send(b"MAIL FROM:<agent@kw.test>\r\n")).startswith("250")
            assert (await raw.send(b"RCPT TO:<a@example.test>\r\n")).startswith("250")
            assert (await raw.send(b"DATA\r\n")).startswith("354")
            raw.writer.write(b"Subject: slow\r\n\r\nfirst line of a body that never ends\r\n")
            assert await raw.rest() == b"421 4.4.2 Timeout, closing connection\r\n"
        finally:
            await raw.close()
        await app.handler.drain()
    assert [entry["timeout"] for entry in events(logs, "session.timeout")] == ["transaction"]
    assert (await app.quota.usage(user.id, "2026-11")).used == 0
    assert upstream.messages == []


async def test_idle_timeout_says_421(make_relay, upstream):
    """A silent client gets 421 4.4.2 at the idle timeout, logged as session.timeout idle."""
    app = await make_relay(upstream=upstream, idle_timeout=1.5)
    with capture_logs() as logs:
        raw = await RawSMTP.connect(app.port)
        try:
            assert (await raw.reply()).startswith("220")
            assert (await raw.send(b"EHLO client.test\r\n")).startswith("250")
            assert await raw.rest() == b"421 4.4.2 Timeout, closing connection\r\n"
        finally:
            await raw.close()
    assert [entry["timeout"] for entry in events(logs, "session.timeout")] == ["idle"]


async def test_transaction_deadline_ends_with_the_transaction(make_relay, upstream,
                                                                      accounts):
    """After a delivered message the transaction deadline no longer applies: the client may
    stay quiet past it (inside the idle timeout) and send another message."""
    await add_user(accounts)
    app = await make_relay(upstream=upstream, idle_timeout=60, transaction_timeout=2)
    async with smtp_client(app) as client:
        await client.sendmail("agent@kw.test", ["a@example.test"], message())
        await asyncio.sleep(2.5)  # past the first transaction's deadline, on purpose
        assert (await client.noop()).code == 250
        await client.sendmail("agent@kw.test", ["b@example.test"], message())
    assert len(upstream.messages) == 2
