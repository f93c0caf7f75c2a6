"""The links the relay hands out, followed end to end on real parts: the one-click
unsubscribe URL the relay writes into a Campaigns message, POSTed as a mailbox provider
would (RFC 8058), stops the next send to that contact without counting it; a usage
link made by the admin API opens that user's page and no other credential does."""

from __future__ import annotations

import smtplib
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from relay.config.endpoints import Endpoint
from relay.decisions.quota import QuotaStore
from relay.decisions.suppression import SuppressionReason, SuppressionStore
from relay.identity.accounts import AccountStore
from relay.message.unsubscribe import read_unsubscribe_headers
from relay.process.wiring import RelayApp
from tests.conftest import CapturingUpstream, RelayFactory, add_app, add_user, free_port
from tests.flows.test_unsubscribe_headers import PERIOD, compose, send, unsubscribe_policies
from tests.public_http import public_client, public_settings

TOKEN = "a-public-links-admin-token-0123456789"


async def relay_with_links(make_relay: RelayFactory, upstream: CapturingUpstream,
                           tmp_path: Path) -> RelayApp:
    # The links must point at this relay's own listener: its port is chosen first.
    port = free_port()
    app: RelayApp = await make_relay(
        upstream=upstream, policies_dir=unsubscribe_policies(tmp_path, campaigns="adds"),
        **public_settings(admin_token=TOKEN, admin_listen=Endpoint("127.0.0.1", 0),
                          public_listen=Endpoint("127.0.0.1", port),
                          public_url=f"http://127.0.0.1:{port}"))
    assert app.public_server is not None and app.public_server.port == port
    return app


async def test_an_unsubscribe_post_stops_the_next_send_uncounted(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, tmp_path: Path) -> None:
    app = await relay_with_links(make_relay, upstream, tmp_path)
    user = await add_user(accounts)
    await add_app(accounts, "campaigns")
    assert await send(app, compose(to="contact@example.test"), ["contact@example.test"]) == {}
    [sent] = upstream.messages
    link = read_unsubscribe_headers(sent.content).list_unsubscribe
    assert link is not None
    path = link.strip("<>").split("/", 3)[3]
    assert app.public_server is not None
    async with public_client(app.public_server.port) as client:
        answer = await client.request("POST", "/" + path, data="List-Unsubscribe=One-Click",
                                      headers={"Content-Type":
                                               "application/x-www-form-urlencoded"})
        assert answer.status == 200
    entry = await SuppressionStore(redis_client).get("contact@example.test", user_id=user.id)
    assert entry is not None and entry.reason is SuppressionReason.UNSUBSCRIBE
    before = (await QuotaStore(redis_client).usage(user.id, PERIOD)).used
    # Campaigns are decided at the end of DATA: its only recipient suppressed, the message
    # is refused whole with the suppression's reply.
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await send(app, compose("Subject-Note: second", to="contact@example.test"),
                   ["contact@example.test"])
    assert refused.value.smtp_code == 550
    assert b"unsubscribed from this sender" in refused.value.smtp_error
    usage = await QuotaStore(redis_client).usage(user.id, PERIOD)
    assert usage.used == before == 1
    assert len(upstream.messages) == 1  # the second never reached the upstream


async def test_a_usage_link_from_the_api_opens_that_users_page_only(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        tmp_path: Path) -> None:
    app = await relay_with_links(make_relay, upstream, tmp_path)
    ann = await add_user(accounts, "ann@kw.test")
    await add_user(accounts, "bob@kw.test")
    assert app.admin_server is not None
    api = f"http://127.0.0.1:{app.admin_server.port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{api}/v1/users/ann@kw.test/usage-link", json={"ttl_seconds": 7200},
                             headers=auth) as made:
            assert made.status == 200
            link = await made.json()
        assert link["user_id"] == ann.id
        assert link["url"].startswith(app.settings.public_url + "/usage/")
        async with http.get(link["url"]) as page:
            html = await page.text()
            assert page.status == 200 and "ann@kw.test" in html and "bob@kw.test" not in html
        async with http.post(f"{api}/v1/users/ann@kw.test/usage-link",
                             json={"ttl_seconds": 40 * 86400}, headers=auth) as refused:
            assert refused.status == 400
        async with http.post(f"{api}/v1/users/ann@kw.test/usage-link", json={}) as anonymous:
            assert anonymous.status == 401
        # The API's token is not a page credential, nor is the page's token an API one.
        token = link["url"].rsplit("/", 1)[1]
        async with http.get(f"{api}/v1/users/ann@kw.test/usage",
                            headers={"Authorization": f"Bearer {token}"}) as crossed:
            assert crossed.status == 401
