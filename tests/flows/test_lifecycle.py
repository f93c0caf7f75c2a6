"""SIGTERM drains, SIGHUP reloads, uvloop serves STARTTLS: real signals to a real
``command-relay serve`` process, against the test redis-server, checked on the wire, in the
relay's JSON log and in the Redis counters; plus the same reload in process where a test
needs to look inside (the route pools, the admin API's policies). The drain in process is in
tests/smtp/test_shutdown.py, the choice of event loop in tests/process/test_eventloop.py."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from relay.config.endpoints import Endpoint, UpstreamTarget
from relay.identity.accounts import AccountStore
from relay.process.wiring import RelayApp
from tests.conftest import (
    PASSWORD,
    CapturingUpstream,
    RedisServer,
    RelayFactory,
    add_user,
    message,
    smtp_client,
    wait_for,
)
from tests.policy_files import (
    SECONDARY_ROUTE,
    policies_copy,
    policies_with_limit,
    set_free_limit,
)
from tests.serving import (
    LineClient,
    Start,
    body,
    captured,
    counts,
    no_traceback,
    refused,
    relay_env,
    send_to,
)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


# -- SIGTERM: drain ------------------------------------------------------------------------------
async def test_sigterm_lets_a_transaction_between_rcpt_and_data_finish(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        accounts: AccountStore, state: Path) -> None:
    """After SIGTERM an idle session gets 421 4.3.2 and is closed at once, new connections
    are refused, the session between RCPT and DATA still delivers its message (250), then
    gets the 421 too, and the relay exits 0."""
    user = await add_user(accounts)
    relay = serve(relay_env(redis_server.url, state))
    port = await relay.port()
    busy = await LineClient.connect(port)
    await busy.login()
    await busy.open_transaction()
    idle = await LineClient.connect(port)
    await idle.login()
    assert await counts(redis_client, user) == (1, 0)

    relay.signal(signal.SIGTERM)
    assert await idle.reply() == (421, "4.3.2 Service shutting down")
    assert await idle.until_closed() == b""
    await wait_for(lambda: refused(port), 20)
    assert relay.process.poll() is None  # still draining: the transaction is open

    assert (await busy.command("DATA"))[0] == 354
    content = body("Finished during the drain")
    await busy.send(content + b".\r\n")
    code, text = await busy.reply()
    assert code == 250, text
    assert await busy.reply() == (421, "4.3.2 Service shutting down")
    assert await busy.until_closed() == b""

    assert await relay.wait_exit() == 0
    no_traceback(relay)
    [stored] = captured(state)
    assert stored.endswith(content)
    assert await counts(redis_client, user) == (1, 1)
    [draining] = relay.events("relay.draining")
    assert (draining["sessions"], draining["timeout"]) == (2, 30.0)
    assert relay.events("relay.stopped")[0]["sessions_cut"] == 0
    assert relay.events("delivery.finished")[0]["outcome"] == "delivered"


async def test_sigterm_lets_a_message_in_the_middle_of_data_finish(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        accounts: AccountStore, state: Path) -> None:
    """A message half sent when SIGTERM arrives is received whole and delivered."""
    user = await add_user(accounts)
    relay = serve(relay_env(redis_server.url, state))
    port = await relay.port()
    client = await LineClient.connect(port)
    await client.login()
    await client.open_transaction(recipients=("a@example.test", "b@example.test"))
    assert (await client.command("DATA"))[0] == 354
    content = body("Half before the signal, half after", lines=200)
    half = len(content) // 2
    await client.send(content[:half])

    relay.signal(signal.SIGTERM)
    await wait_for(lambda: refused(port), 20)
    await client.send(content[half:] + b".\r\n")
    code, text = await client.reply()
    assert code == 250, text
    assert await client.until_closed() == b"421 4.3.2 Service shutting down\r\n"

    assert await relay.wait_exit() == 0
    no_traceback(relay)
    [stored] = captured(state)
    assert stored.endswith(content)
    assert await counts(redis_client, user) == (2, 2)


async def test_sigterm_cuts_a_transaction_that_outlasts_the_drain_timeout_and_refunds_it(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        accounts: AccountStore, state: Path) -> None:
    """With a short RELAY_DRAIN_TIMEOUT a transaction that does not finish is cut: its
    reserved units go back (the Redis count returns to 0), and the relay exits 0."""
    user = await add_user(accounts)
    relay = serve(relay_env(redis_server.url, state, RELAY_DRAIN_TIMEOUT="1"))
    port = await relay.port()
    client = await LineClient.connect(port)
    await client.login()
    await client.open_transaction(recipients=("a@example.test", "b@example.test"))
    assert await counts(redis_client, user) == (2, 0)

    relay.signal(signal.SIGTERM)
    code, _ = await client.reply()
    assert code in (421, 0)  # the goodbye, unless the cut dropped it
    assert await client.until_closed() == b""
    assert await relay.wait_exit() == 0
    no_traceback(relay)

    assert await counts(redis_client, user) == (0, 0)
    assert captured(state) == []
    [cut] = relay.events("session.cut")
    assert cut["reason"] == "drain_timeout" and cut["txn_id"]
    [finished] = relay.events("delivery.finished")
    assert (finished["outcome"], finished["reason"], finished["txn_id"]) == \
        ("abandoned", "shutdown", cut["txn_id"])
    assert relay.events("quota.refunded")[0]["units"] == 2
    assert relay.events("relay.stopped")[0]["sessions_cut"] == 1


async def test_sigterm_closes_idle_sessions_without_waiting_for_the_timeout(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        accounts: AccountStore, state: Path) -> None:
    """Sessions between transactions (just connected, logged in, after a message) are told
    421 4.3.2 and closed at once: the relay exits 0 long before a 50 s drain timeout."""
    await add_user(accounts)
    relay = serve(relay_env(redis_server.url, state, RELAY_DRAIN_TIMEOUT="50"))
    port = await relay.port()
    fresh = await LineClient.connect(port)
    logged_in = await LineClient.connect(port)
    await logged_in.login()
    after_message = await LineClient.connect(port)
    await after_message.login()
    await after_message.open_transaction()
    assert (await after_message.command("DATA"))[0] == 354
    await after_message.send(body() + b".\r\n")
    assert (await after_message.reply())[0] == 250

    relay.signal(signal.SIGTERM)
    for client in (fresh, logged_in, after_message):
        assert await client.reply() == (421, "4.3.2 Service shutting down")
        assert await client.until_closed() == b""
    assert await relay.wait_exit(seconds=30) == 0
    no_traceback(relay)
    assert relay.events("relay.draining")[0]["sessions"] == 3


# -- SIGHUP: reload ------------------------------------------------------------------------------
async def test_sighup_reload_changes_the_limit_for_new_transactions(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        accounts: AccountStore, state: Path, tmp_path: Path) -> None:
    """A raised limit in plans.toml applies, after SIGHUP, to new transactions; a transaction
    opened before the reload keeps the policies it started with."""
    user = await add_user(accounts)
    policies = policies_with_limit(tmp_path, 2)
    relay = serve(relay_env(redis_server.url, state, RELAY_POLICIES_DIR=str(policies)))
    port = await relay.port()
    assert await send_to(port, "a@example.test", "b@example.test", "c@example.test") == \
        [250, 250, 550]
    before = await LineClient.connect(port)
    await before.login()
    assert (await before.command("MAIL FROM:<agent@kw.test>"))[0] == 250

    set_free_limit(policies, 4)
    relay.signal(signal.SIGHUP)
    [reloaded] = await relay.wait_event("policies.reloaded")
    assert reloaded["changed"] == ["plans.toml"]
    assert reloaded["plans"]["free"] == 4

    assert await send_to(port, "d@example.test") == [250]
    assert await counts(redis_client, user) == (3, 3)
    # The transaction opened before the reload still counts against the old limit of 2.
    code, text = await before.command("RCPT TO:<e@example.test>")
    assert code == 550 and "(3 of 2 sends used)" in text
    before.close()
    assert await send_to(port, "f@example.test", "g@example.test") == [250, 550]

    relay.signal(signal.SIGTERM)
    assert await relay.wait_exit() == 0
    no_traceback(relay)


BROKEN = [
    pytest.param("plans.toml", "monthly_limit = 0",
                 "plans.free.monthly_limit: must be greater than 0", id="bad-value"),
    pytest.param("notifications.toml", "[thresholds\n", "Expected ']'", id="bad-toml"),
]


@pytest.mark.parametrize(("name", "text", "reason"), BROKEN)
async def test_sighup_with_a_broken_file_keeps_the_old_policies(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        accounts: AccountStore, state: Path, tmp_path: Path, name: str, text: str,
        reason: str) -> None:
    """A reload that finds a bad file changes nothing (not even the files that are fine)
    and logs policies.reload_failed naming the file, the line and the key."""
    await add_user(accounts)
    policies = policies_with_limit(tmp_path, 1)
    relay = serve(relay_env(redis_server.url, state, RELAY_POLICIES_DIR=str(policies)))
    port = await relay.port()

    set_free_limit(policies, 5)  # a good change, in the same reload as the broken file
    path = policies / name
    original = path.read_text(encoding="utf-8")
    if name == "plans.toml":
        broken = original.replace("monthly_limit = 5\n", text + "\n")
        line = broken[:broken.index(text)].count("\n") + 1
        where = f"{path}:{line}: "
    else:
        broken = original.replace("[thresholds]\n", text)
        where = f"{path}: "
    assert broken != original
    path.write_text(broken, encoding="utf-8")
    relay.signal(signal.SIGHUP)
    [failed] = await relay.wait_event("policies.reload_failed")
    assert failed["level"] == "error"
    assert failed["error"].startswith(where) and reason in failed["error"], failed["error"]
    assert relay.events("policies.reloaded") == []

    # The limit of 1 still holds, and the relay keeps serving.
    assert await send_to(port, "a@example.test", "b@example.test") == [250, 550]
    path.write_text(original, encoding="utf-8")
    relay.signal(signal.SIGHUP)
    await relay.wait_event("policies.reloaded")
    assert await send_to(port, "c@example.test") == [250]

    relay.signal(signal.SIGTERM)
    assert await relay.wait_exit() == 0
    no_traceback(relay)


def routed_to_secondary(tmp_path: Path) -> Path:
    """The shipped policies, with everything that is not SmartPlans or Campaigns sent via a
    ``secondary`` route (a setting upstream, so it has a pool of its own)."""
    directory = policies_copy(tmp_path)
    path = directory / "routing.toml"
    text = path.read_text(encoding="utf-8")
    last = 'name = "everything-else-command"\nroute = "command"'
    assert last in text
    text = text.replace(last, 'name = "everything-else-secondary"\nroute = "secondary"')
    path.write_text(text + SECONDARY_ROUTE, encoding="utf-8")
    return directory


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new), encoding="utf-8")


async def test_reload_rebuilds_routes_and_keeps_unchanged_pools(
        make_relay: RelayFactory, upstream: CapturingUpstream, secondary: CapturingUpstream,
        accounts: AccountStore, tmp_path: Path) -> None:
    """A routing.toml change rebuilds the routes: a route whose upstream and pool did not
    change keeps its pool and its warm connection; a changed route gets a new pool, and the
    old one is closed."""
    await add_user(accounts)
    policies = routed_to_secondary(tmp_path)
    app: RelayApp = await make_relay(
        upstream=upstream, policies_dir=policies,
        route_urls={"secondary": UpstreamTarget("127.0.0.1", secondary.port, "none")})

    async def send_one() -> None:
        async with smtp_client(app) as client:
            errors, _ = await client.sendmail("agent@kw.test", ["x@example.test"], message())
        assert errors == {}

    await send_one()
    assert (len(secondary.messages), secondary.handler.connections) == (1, 1)
    first_routes = app.routes

    # Another route's pool size changes: the secondary route keeps its connection.
    edit(policies / "routing.toml", "pool_size = 2", "pool_size = 3")
    with capture_logs() as logs:
        assert await app.reload_policies() is True
    [reloaded] = [e for e in logs if e["event"] == "policies.reloaded"]
    assert reloaded["changed"] == ["routing.toml"]
    assert app.routes is not first_routes
    assert app.handler.services.routes is app.routes
    await send_one()
    assert (len(secondary.messages), secondary.handler.connections) == (2, 1)

    # The secondary route itself changes: a new pool, a new connection.
    edit(policies / "routing.toml", SECONDARY_ROUTE,
         SECONDARY_ROUTE.replace('failover = ""', 'failover = ""\npool_size = 4'))
    assert await app.reload_policies() is True
    await send_one()
    assert (len(secondary.messages), secondary.handler.connections) == (3, 2)
    assert upstream.messages == []


async def test_reload_without_routing_changes_keeps_the_routes(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        tmp_path: Path) -> None:
    """Reloading unchanged routing keeps the very same routes (and pools); the admin API
    sees the new plans at once."""
    user = await add_user(accounts)
    policies = policies_with_limit(tmp_path, 7)
    app: RelayApp = await make_relay(upstream=upstream, policies_dir=policies,
                                     admin_token="a-long-admin-token-for-tests",
                                     admin_listen=Endpoint("127.0.0.1", 0))
    assert app.admin is not None
    assert app.admin.view(user)["limit"] == 7
    routes = app.routes
    set_free_limit(policies, 70)
    assert await app.reload_policies() is True
    assert app.routes is routes
    assert app.policies.plans["free"].monthly_limit == 70
    assert app.handler.services.policies is app.policies
    assert app.admin.policies is app.policies
    assert app.admin.view(user)["limit"] == 70


async def test_reload_with_a_bad_file_changes_nothing_in_process(
        make_relay: RelayFactory, upstream: CapturingUpstream, tmp_path: Path) -> None:
    """reload_policies returns False and leaves every holder of the policies alone."""
    policies = policies_with_limit(tmp_path, 7)
    app: RelayApp = await make_relay(upstream=upstream, policies_dir=policies)
    before = (app.policies, app.routes, app.handler.services)
    (policies / "routing.toml").write_text("[routes.command]\ncounted = 1\n", encoding="utf-8")
    with capture_logs() as logs:
        assert await app.reload_policies() is False
    assert (app.policies, app.routes, app.handler.services) == before
    [failed] = [e for e in logs if e["event"] == "policies.reload_failed"]
    assert str(policies / "routing.toml") in failed["error"]


# -- uvloop ----------------------------------------------------------------------------------
def starttls_send(port: int, content: bytes) -> smtplib.SMTP:
    """STARTTLS (the development certificate is self-signed), AUTH PLAIN, one message; the
    connection is returned open."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=15)
    client.starttls(context=context)
    client.login("agent@kw.test", PASSWORD)
    assert client.sendmail("agent@kw.test", ["client@example.test"], content) == {}
    return client


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_starttls_auth_and_a_message_on_each_event_loop(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        accounts: AccountStore, state: Path, loop: str) -> None:
    """Under uvloop (and asyncio) a relay process serves STARTTLS + AUTH + a message, and the
    421 of a drain reaches the client inside TLS."""
    user = await add_user(accounts)
    relay = serve(relay_env(redis_server.url, state, RELAY_EVENT_LOOP=loop,
                            RELAY_ALLOW_PLAINTEXT_AUTH="0"))
    port = await relay.port()
    assert relay.events("relay.started")[0]["event_loop"] == loop
    content = message(subject=f"STARTTLS on {loop}")
    client = await asyncio.to_thread(starttls_send, port, content)
    try:
        [stored] = captured(state)
        assert stored.endswith(content)
        assert b"with ESMTPSA" in stored
        assert await counts(redis_client, user) == (1, 1)
        relay.signal(signal.SIGTERM)
        assert await asyncio.to_thread(client.getreply) == (421, b"4.3.2 Service shutting down")
    finally:
        client.close()
    assert await relay.wait_exit() == 0
    no_traceback(relay)


async def test_event_loop_auto_prefers_uvloop(
        serve: Start, redis_server: RedisServer, state: Path) -> None:
    """With RELAY_EVENT_LOOP unset (auto) and uvloop installed, serve runs on uvloop."""
    relay = serve(relay_env(redis_server.url, state))
    await relay.port()
    assert relay.events("relay.started")[0]["event_loop"] == "uvloop"
    relay.signal(signal.SIGTERM)
    assert await relay.wait_exit() == 0


def test_serve_refuses_uvloop_when_it_is_not_installed(tmp_path: Path) -> None:
    """RELAY_EVENT_LOOP=uvloop without uvloop: serve exits 1 saying so, no traceback."""
    code = ("import sys; sys.modules['uvloop'] = None; from relay.cli import main; "
            "sys.exit(main(['serve']))")
    for workers in ("1", "2"):
        env = relay_env(None, tmp_path / "state", RELAY_EVENT_LOOP="uvloop",
                        RELAY_WORKERS=workers)
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, timeout=30, cwd=tmp_path)
        assert result.returncode == 1, result
        assert "command-relay: error: event_loop: uvloop is not installed" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "state").exists()  # refused before anything started
