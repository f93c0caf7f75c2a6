"""relay/smtp/shutdown.py: the drain of the SMTP sessions when a running relay stops, in
process (RelayApp.stop, what SIGTERM calls) with real clients on real sockets. An idle
session is told 421 and closed at once; a transaction may finish first; what outlasts the
drain timeout is cut and its units given back. The SIGTERM path through ``command-relay
serve`` is in tests/flows/test_lifecycle.py."""

from __future__ import annotations

import asyncio
from typing import Any

import aiosmtplib
import pytest
from structlog.testing import capture_logs

from relay.decisions.quota import QuotaStore
from relay.identity.accounts import AccountStore
from relay.process.wiring import RelayApp
from tests.conftest import (
    PASSWORD,
    CapturingUpstream,
    RelayFactory,
    add_user,
    smtp_client,
    wait_for,
)
from tests.serving import LineClient, body, refused

SHUTTING_DOWN = (421, "4.3.2 Service shutting down")


def stopped(logs: list[dict[str, Any]]) -> dict[str, Any]:
    [line] = [e for e in logs if e["event"] == "relay.stopped"]
    return line


async def used(app: RelayApp, user_id: str) -> int:
    return (await QuotaStore(app.redis).usage(user_id, "2026-11")).used


async def test_an_idle_session_is_told_421_and_closed_without_waiting(
        relay: RelayApp, accounts: AccountStore) -> None:
    """Between transactions (just connected, or logged in): 421 4.3.2 and closed at once,
    so even a drain of no time at all cuts nobody."""
    await add_user(accounts)
    fresh = await LineClient.connect(relay.port)
    logged_in = await LineClient.connect(relay.port)
    await logged_in.login()
    port = relay.port
    with capture_logs() as logs:
        await relay.stop(drain_timeout=0)
    for client in (fresh, logged_in):
        assert await client.reply() == SHUTTING_DOWN
        assert await client.until_closed() == b""
    assert stopped(logs)["sessions_cut"] == 0
    assert not [e for e in logs if e["event"] == "session.cut"]
    assert await refused(port)  # the listener is closed


async def test_a_transaction_under_way_finishes_then_gets_the_421(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore) -> None:
    """A session between RCPT and DATA when the drain starts still sends its message (250,
    delivered and counted), and is told 421 once its transaction is over."""
    user = await add_user(accounts)
    client = await LineClient.connect(relay.port)
    await client.login()
    await client.open_transaction()
    with capture_logs() as logs:
        stopping = asyncio.create_task(relay.stop(drain_timeout=3600))
        await wait_for(lambda: relay.draining)
        assert (await client.command("DATA"))[0] == 354
        await client.send(body() + b".\r\n")
        assert (await client.reply())[0] == 250
        assert await client.reply() == SHUTTING_DOWN
        assert await client.until_closed() == b""
        await stopping
    assert stopped(logs)["sessions_cut"] == 0
    assert [m.rcpt_tos for m in upstream.messages] == [["client@example.test"]]
    assert (await QuotaStore(relay.redis).usage(user.id, "2026-11")).delivered == 1


async def test_a_transaction_that_outlasts_the_drain_is_cut_and_refunded(
        relay: RelayApp, upstream: CapturingUpstream, accounts: AccountStore) -> None:
    """Past the drain timeout a session still in a transaction is cut: the line names the
    transaction, its units are given back, nothing reaches the upstream."""
    user = await add_user(accounts)
    client = await LineClient.connect(relay.port)
    await client.login()
    await client.open_transaction(recipients=("a@example.test", "b@example.test"))
    assert await used(relay, user.id) == 2
    with capture_logs() as logs:
        await relay.stop(drain_timeout=0)
    assert stopped(logs)["sessions_cut"] == 1
    [cut] = [e for e in logs if e["event"] == "session.cut"]
    assert cut["reason"] == "drain_timeout" and cut["txn_id"]
    assert await used(relay, user.id) == 0
    assert upstream.messages == []
    await client.until_closed()


async def test_drain_refuses_mail_from_while_draining(
        relay: RelayApp, accounts: AccountStore) -> None:
    """A session that survives into the drain cannot start a new transaction: MAIL FROM gets
    421 4.3.2."""
    await add_user(accounts)
    async with smtp_client(relay) as client:
        relay.handler.draining = True
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused_mail:
            await client.mail("agent@kw.test")
    assert (refused_mail.value.code, refused_mail.value.message) == SHUTTING_DOWN


async def test_stop_sets_draining_and_closes_an_idle_starttls_session(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore) -> None:
    """RelayApp.stop marks the relay draining at once (what /readyz reads) and closes an idle
    session that used STARTTLS without waiting for the drain timeout."""
    await add_user(accounts)
    app: RelayApp = await make_relay(upstream=upstream, allow_plaintext_auth=False)
    assert app.draining is False
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.port, start_tls=True,
                             validate_certs=False, local_hostname="client.test", timeout=10)
    await client.connect()
    await client.login("agent@kw.test", PASSWORD)
    assert client.get_transport_info("sslcontext") is not None
    stopping = asyncio.create_task(app.stop(drain_timeout=50))
    await wait_for(lambda: app.draining)
    await wait_for(lambda: not client.is_connected, 20)
    await asyncio.wait_for(stopping, 20)
    client.close()
