"""The public HTTP listener itself (relay/admin/public.py), started for real by RelayApp: on
by default on loopback, off when empty, its own port apart from the admin API, answers that
say nothing but their status, and an application built from route groups."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from relay.admin.public import PublicServer
from relay.config.endpoints import Endpoint
from relay.config.parsers import SettingsError
from relay.config.settings import load_settings
from relay.decisions.suppression import SuppressionStore
from relay.errors import StartupError
from relay.identity.signed_links import LinkSigner
from relay.store.client import connect_redis
from tests.conftest import RedisServer, RelayFactory
from tests.public_http import LINK_SECRET, public_client, public_settings


def test_public_listen_defaults_to_loopback_8026_and_empty_turns_it_off() -> None:
    """RELAY_PUBLIC_LISTEN: 127.0.0.1:8026 unless set; an empty value is off."""
    assert load_settings(environ={}).public_listen == Endpoint("127.0.0.1", 8026)
    assert load_settings(environ={"RELAY_PUBLIC_LISTEN": ""}).public_listen is None
    assert load_settings(environ={"RELAY_PUBLIC_LISTEN": "0.0.0.0:8080"}).public_listen == \
        Endpoint("0.0.0.0", 8080)


def test_mandrill_webhook_key_and_url_go_together() -> None:
    """The key without the URL it signs (or the reverse) stops start-up."""
    with pytest.raises(SettingsError, match="mandrill_webhook_key, mandrill_webhook_url"):
        load_settings(environ={"RELAY_MANDRILL_WEBHOOK_KEY": "k" * 22})
    with pytest.raises(SettingsError, match="set both or neither"):
        load_settings(environ={"RELAY_MANDRILL_WEBHOOK_URL": "https://relay.test/webhooks/m"})


async def test_public_listener_serves_next_to_the_admin_api(make_relay: RelayFactory) -> None:
    """Started by RelayApp on its own port; the admin API's routes are not on it, nor its
    routes on the admin API."""
    app = await make_relay(**public_settings(admin_token="t" * 32,
                                             admin_listen=Endpoint("127.0.0.1", 0)))
    assert app.public_server is not None and app.admin_server is not None
    assert app.public_server.port != app.admin_server.port
    async with public_client(app.public_server.port) as client:
        assert (await client.request("GET", "/v1/users")).status == 404
        assert (await client.request("HEAD", "/webhooks/mandrill")).status == 200
    async with aiohttp.ClientSession() as session, session.head(
            f"http://127.0.0.1:{app.admin_server.port}/webhooks/mandrill") as response:
        assert response.status == 401  # the admin API's token guard, not a webhook


async def test_public_listener_off_when_empty(make_relay: RelayFactory) -> None:
    """public_listen None (an empty RELAY_PUBLIC_LISTEN): no server, and start-up logs no
    public.listening."""
    with capture_logs() as logs:
        app = await make_relay(**public_settings(public_listen=None))
    assert app.public_server is None
    assert not any(e["event"] == "public.listening" for e in logs)


async def test_public_listener_refusals_say_only_their_status(make_relay) -> None:
    """An unknown path is a bare 404 and a wrong method a 405 with Allow, each with the
    listener's headers; neither path is logged."""
    app = await make_relay(**public_settings())
    async with public_client(app.public_server.port) as client:
        with capture_logs() as logs:
            missing = await client.request("GET", "/secret-looking/path")
            wrong = await client.request("PUT", "/webhooks/command")
    assert (missing.status, missing.text) == (404, "Not Found\n")
    assert missing.headers["Cache-Control"] == "no-store"
    assert wrong.status == 405 and wrong.headers["Allow"] == "POST"
    assert "secret-looking" not in str(logs)


async def test_public_listener_port_taken_stops_start_up(make_relay, tmp_path) -> None:
    """A public_listen address that cannot be bound is a StartupError naming the setting."""
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = taken.sockets[0].getsockname()[1]
    try:
        with pytest.raises(StartupError, match="public_listen"):
            await make_relay(**public_settings(public_listen=Endpoint("127.0.0.1", port)))
    finally:
        taken.close()
        await taken.wait_closed()


class _Hello:
    """A route group of the kind a later page adds (the agent's usage page)."""

    name = "hello"

    def routes(self) -> Iterable[web.RouteDef]:
        async def hello(request: web.Request) -> web.Response:
            return web.Response(text=f"hello {request.match_info['who']}")
        return [web.get("/hello/{who}", hello)]


class _Broken:
    name = "broken"

    def routes(self) -> Iterable[web.RouteDef]:
        async def broken(request: web.Request) -> web.Response:
            raise RuntimeError("secret detail")
        return [web.get("/broken", broken)]


async def test_public_server_is_built_from_route_groups() -> None:
    """Any group's routes are served with the listener's headers; a bug in a handler is a
    bare 500, logged with its route's template, its text never sent."""
    server = PublicServer(Endpoint("127.0.0.1", 0), [_Hello(), _Broken()])
    await server.start()
    try:
        async with public_client(server.port) as client:
            hello = await client.request("GET", "/hello/agent")
            with capture_logs() as logs:
                broken = await client.request("GET", "/broken")
    finally:
        await server.stop()
    assert (hello.status, hello.text) == (200, "hello agent")
    assert hello.headers["X-Content-Type-Options"] == "nosniff"
    assert (broken.status, broken.text) == (500, "Internal error\n")
    [error] = [e for e in logs if e["event"] == "public.error"]
    assert error["route"] == "/broken"


async def test_public_listener_redis_down_is_503_and_the_retry_applies(
        make_relay: RelayFactory, tmp_path) -> None:
    """With Redis unreachable a webhook delivery and an unsubscribe POST answer 503 (the
    provider retries; nothing was claimed); once Redis is back the same delivery applies."""
    server = RedisServer(tmp_path / "doomed-redis")
    server.start()
    client = connect_redis(server.url, timeout=1)
    try:
        app = await make_relay(redis=client, **public_settings())
        body = {"events": [{"id": "d1", "type": "bounce", "recipient": "x@example.test",
                            "timestamp": int(app.clock.now().timestamp())}]}
        t = int(app.clock.now().timestamp())
        link = LinkSigner(LINK_SECRET.encode()).sign("unsubscribe",
                                                     {"u": "u-1", "r": "y@example.test"})
        async with public_client(app.public_server.port) as public:
            server.stop()
            down = await public.command(body, t)
            unsubscribe = await public.request("POST", f"/unsubscribe/{link}",
                                               data={"List-Unsubscribe": "One-Click"})
            assert (down.status, unsubscribe.status) == (503, 503)
            assert app.metrics.registry.get_sample_value(
                "relay_webhook_deliveries_total",
                {"provider": "command", "outcome": "unavailable"}) == 1
            server.start()
            back = await public.command(body, t)
        assert (back.status, back.json["recorded"]) == (200, 1)
        entry = await SuppressionStore(client).get("x@example.test", user_id=None)
        assert entry is not None
    finally:
        server.stop()
        await client.aclose()
