"""relay/smtp/shutdown.py: the drain of the SMTP sessions when a running relay stops, in
process (RelayApp.stop, what SIGTERM calls) with real clients on real sockets. The SIGTERM
path through ``command-relay serve`` is in tests/flows/test_lifecycle.py."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

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


async def test_drain_refuses_mail_from_while_draining(
        relay: RelayApp, accounts: AccountStore) -> None:
    """A session that survives into the drain cannot start a new transaction: MAIL FROM gets
    421 4.3.2."""
    await add_user(accounts)
    async with smtp_client(relay) as client:
        relay.handler.draining = True
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused_mail:
            await client.mail("agent@kw.test")
    assert (refused_mail.value.code, refused_mail.value.message) == \
        (421, "4.3.2 Service shutting down")


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
