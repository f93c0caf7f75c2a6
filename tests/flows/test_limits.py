"""Client protections with real clients: connection limits (per address and in total) and
AUTH failure throttling per address and per login (in Redis, so shared by relays). Each
refusal is asserted by its reply and its log line. The limiter and the throttle on their
own are in tests/smtp/test_admission.py and tests/identity/test_throttle.py, the timers in
tests/smtp/test_timeouts.py.

Clients connect from several loopback addresses (127.0.0.1, .2, .3) to be different
clients on one machine.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import smtplib
from typing import Any

import aiosmtplib
import pytest
from structlog.testing import capture_logs

from relay.errors import AuthThrottledError
from relay.process.wiring import RelayApp
from tests.conftest import PASSWORD, add_user, wait_for
from tests.proxyheaders import v1
from tests.rawsmtp import RawSMTP


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def connect(app: RelayApp, source: str = "127.0.0.1") -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.port, start_tls=False,
                             local_hostname="client.test", source_address=(source, 0),
                             timeout=10)
    await client.connect()
    return client


async def auth(app: RelayApp, login: str, password: str, source: str = "127.0.0.1") -> int:
    """One AUTH PLAIN on a fresh connection; the reply code."""
    client = await connect(app, source)
    try:
        await client.ehlo()
        token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        reply = await client.execute_command(b"AUTH", b"PLAIN", token.encode())
        return reply.code
    finally:
        client.close()


# -- connection limits --------------------------------------------------------------------------
async def test_limits_per_ip_refuses_with_421_and_frees_on_close(make_relay, upstream):
    """Over max_connections_per_ip, a client gets 421 4.7.0 and a session.refused line; another
    address is still served; once a connection closes, the client may connect again."""
    app = await make_relay(upstream=upstream, max_connections_per_ip=2)
    first, second = await connect(app), await connect(app)
    try:
        with capture_logs() as logs:
            with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
                await connect(app)
        assert refused.value.code == 421
        assert refused.value.message == \
            "4.7.0 Too many connections from your address, try again later"
        (line,) = events(logs, "session.refused")
        assert (line["peer"], line["scope"], line["limit"], line["smtp_code"],
                line["log_level"]) == ("127.0.0.1", "ip", 2, 421, "warning")
        other = await connect(app, "127.0.0.2")
        await other.quit()
    finally:
        await first.quit()
    # Only the second connection is left (first and other have closed): 127.0.0.1 has one.
    await wait_for(lambda: app.connections.total == 1)
    third = await connect(app)
    await third.quit()
    await second.quit()
    await wait_for(lambda: app.connections.total == 0)


async def test_limits_total_counts_every_address(make_relay, upstream):
    """max_connections counts connections from all addresses together."""
    app = await make_relay(upstream=upstream, max_connections=2, max_connections_per_ip=0)
    clients = [await connect(app, "127.0.0.2"), await connect(app, "127.0.0.3")]
    try:
        with capture_logs() as logs:
            with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
                await connect(app, "127.0.0.4")
        assert refused.value.code == 421
        assert refused.value.message == "4.7.0 Too many connections, try again later"
        (line,) = events(logs, "session.refused")
        assert (line["peer"], line["scope"]) == ("127.0.0.4", "total")
    finally:
        for client in clients:
            await client.quit()


async def test_limits_refusal_with_smtplib(make_relay, upstream):
    """smtplib sees the refusal as SMTPConnectError 421."""
    app = await make_relay(upstream=upstream, max_connections_per_ip=1)
    held = await connect(app)
    try:
        def attempt() -> None:
            smtplib.SMTP("127.0.0.1", app.port, local_hostname="client.test", timeout=10)
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            await asyncio.to_thread(attempt)
        assert refused.value.smtp_code == 421
    finally:
        await held.quit()


# -- AUTH throttling ---------------------------------------------------------------------------
async def test_limits_auth_per_login_throttled_then_released(make_relay, upstream, accounts):
    """After auth_max_failures_per_login failures, AUTH for that login gets 454 4.7.0, even
    with the right password and from another address, with an auth.throttled line; other
    logins are unaffected; when the window ends the right password works again."""
    await add_user(accounts)
    await add_user(accounts, "other@kw.test")
    app = await make_relay(upstream=upstream, auth_max_failures_per_login=3,
                           auth_max_failures_per_ip=0, auth_failure_window=4.0)
    with capture_logs() as logs:
        for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            assert await auth(app, "agent@kw.test", "wrong", source) == 535
        assert await auth(app, "agent@kw.test", PASSWORD, "127.0.0.4") == 454
        assert await auth(app, "other@kw.test", PASSWORD) == 235
    failed = events(logs, "auth.failed")
    assert [entry["failures_login"] for entry in failed] == [1, 2, 3]
    (throttled,) = events(logs, "auth.throttled")
    assert (throttled["login"], throttled["scope"], throttled["failures"],
            throttled["smtp_code"], throttled["peer"], throttled["log_level"]) == \
        ("agent@kw.test", "login", 3, 454, "127.0.0.4", "warning")

    async def released() -> bool:
        return await auth(app, "agent@kw.test", PASSWORD) == 235
    await wait_for(released, 15)


async def test_limits_auth_reply_text(make_relay, upstream, accounts):
    """The throttled reply is errors.AuthThrottledError's, word for word, via aiosmtplib."""
    await add_user(accounts)
    app = await make_relay(upstream=upstream, auth_max_failures_per_login=1)
    assert await auth(app, "agent@kw.test", "wrong") == 535
    client = await connect(app)
    try:
        await client.ehlo()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
            await client.login("agent@kw.test", PASSWORD)
        assert refused.value.code == 454
        assert refused.value.message == AuthThrottledError("login", 1).reply[4:]
    finally:
        client.close()


async def test_limits_auth_per_ip_throttles_every_login(make_relay, upstream, accounts):
    """After auth_max_failures_per_ip failures from one address (any logins), AUTH from that
    address is refused with 454; other addresses still authenticate."""
    await add_user(accounts)
    app = await make_relay(upstream=upstream, auth_max_failures_per_ip=3,
                           auth_max_failures_per_login=0)
    with capture_logs() as logs:
        for login in ("a@kw.test", "b@kw.test", "c@kw.test"):
            assert await auth(app, login, "guess", "127.0.0.2") == 535
        assert await auth(app, "agent@kw.test", PASSWORD, "127.0.0.2") == 454
        assert await auth(app, "agent@kw.test", PASSWORD, "127.0.0.3") == 235
    (throttled,) = events(logs, "auth.throttled")
    assert (throttled["scope"], throttled["peer"]) == ("ip", "127.0.0.2")


async def test_limits_auth_success_clears_the_login_count(make_relay, upstream, accounts):
    """A successful AUTH forgets the login's earlier failures, so its owner mistyping again
    later starts from zero."""
    await add_user(accounts)
    app = await make_relay(upstream=upstream, auth_max_failures_per_login=3,
                           auth_max_failures_per_ip=0)
    for _ in range(2):
        assert await auth(app, "agent@kw.test", "typo") == 535
    assert await auth(app, "agent@kw.test", PASSWORD) == 235
    for _ in range(2):
        assert await auth(app, "agent@kw.test", "typo") == 535
    assert await auth(app, "agent@kw.test", PASSWORD) == 235


async def test_limits_auth_shared_by_relays(make_relay, upstream, accounts):
    """The counts live in Redis: failures on one relay throttle the login on another."""
    await add_user(accounts)
    first = await make_relay(upstream=upstream, auth_max_failures_per_login=2)
    second = await make_relay(upstream=upstream, auth_max_failures_per_login=2)
    assert await auth(first, "agent@kw.test", "wrong") == 535
    assert await auth(second, "agent@kw.test", "wrong") == 535
    assert await auth(first, "agent@kw.test", PASSWORD) == 454
    assert await auth(second, "agent@kw.test", PASSWORD) == 454


async def test_limits_auth_counts_the_real_client_behind_proxy(make_relay, upstream, accounts):
    """Behind a PROXY balancer the per-address count is the client's, not the balancer's:
    one client's failures do not lock out the others."""
    await add_user(accounts)
    app = await make_relay(upstream=upstream, proxy_protocol=True,
                           trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
                           auth_max_failures_per_ip=2, auth_max_failures_per_login=0)

    async def attempt(client: str, password: str) -> str:
        raw = await RawSMTP.connect(app.port, v1(src=client))
        try:
            assert (await raw.reply()).startswith("220 ")
            assert (await raw.send(b"EHLO client.test\r\n")).startswith("250")
            token = base64.b64encode(b"\0agent@kw.test\0" + password.encode())
            return await raw.send(b"AUTH PLAIN " + token + b"\r\n")
        finally:
            await raw.close()

    with capture_logs() as logs:
        for _ in range(2):
            assert (await attempt("198.51.100.66", "guess")).startswith("535")
        assert (await attempt("198.51.100.66", PASSWORD)).startswith("454 4.7.0")
        assert (await attempt("198.51.100.7", PASSWORD)).startswith("235")
    (throttled,) = events(logs, "auth.throttled")
    assert (throttled["peer"], throttled["proxy"]) == ("198.51.100.66", "127.0.0.1")
