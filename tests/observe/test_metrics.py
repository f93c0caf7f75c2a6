"""Metrics and health end to end: real SMTP traffic through a relay started by ``make_relay``,
then ``/metrics`` scraped over HTTP and parsed with the Prometheus client's own parser; the
notifier as a real ``command-relay notifier`` process; ``/readyz`` with Redis stopped, the
upstream gone and the relay draining."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import redis.asyncio as aioredis

from relay.config.endpoints import Endpoint
from relay.delivery import pool as pool_module
from relay.errors import StartupError
from relay.events.stream import REACHED, THRESHOLD, EventLog, new_event
from relay.process.wiring import RelayApp
from relay.store.client import connect_redis
from tests.conftest import (
    POLICIES,
    CapturingUpstream,
    RedisServer,
    RelayFactory,
    UpstreamBehaviour,
    add_user,
    message,
    send,
    smtp_client,
    wait_for,
)
from tests.scraping import get, ready, readyz, scrape
from tests.serving import clean_env, running_notifier
from tests.webhooks import Receiver


# -- the relay ------------------------------------------------------------------------------
async def test_metrics_count_a_delivered_message(make_relay: RelayFactory, accounts: Any,
                                                 upstream: CapturingUpstream) -> None:
    """One message moves the connection, AUTH, MAIL, RCPT, quota, upstream and outcome
    counters by exactly one, with the labels an operator filters on."""
    app: RelayApp = await make_relay(upstream=upstream)
    user = await add_user(accounts)
    before = await scrape(app.metrics_port)
    assert before.value("relay_messages_total", outcome="delivered", route="command") == 0

    async with smtp_client(app) as client:
        open_now = await scrape(app.metrics_port)
        assert open_now.value("relay_connections_open", listener="starttls") == 1
        await client.sendmail("agent@kw.test", ["client@example.test"], message())

    async def closed() -> bool:
        return (await scrape(app.metrics_port)).value("relay_connections_open") == 0
    await wait_for(closed)
    after = await scrape(app.metrics_port)
    assert after.content_type.startswith("text/plain")
    assert after.value("relay_connections_total", listener="starttls") == 1
    assert after.value("relay_auth_attempts_total", result="succeeded") == 1
    assert after.value("relay_mail_from_total", outcome="accepted") == 1
    assert after.value("relay_recipients_total", outcome="accepted") == 1
    assert after.value("relay_recipients_total", outcome="refused") == 0
    assert after.value("relay_messages_total", outcome="delivered", route="command") == 1
    assert after.value("relay_messages_total") == 1
    assert after.value("relay_quota_reservations_total", result="reserved") == 1
    assert after.value("relay_quota_units_committed_total") == 1
    assert after.value("relay_quota_units_refunded_total") == 0
    for step in ("mail", "rcpt", "data"):
        assert after.value("relay_upstream_replies_total", pool="default", step=step,
                           **{"class": "2xx"}) == 1, step
    # The message's connection, and maybe a readiness probe's (the first scrape starts one).
    assert after.value("relay_upstream_replies_total", pool="default", step="connect",
                       **{"class": "2xx"}) in (1, 2)
    assert after.value("relay_upstream_replies_total", **{"class": "5xx"}) == 0
    assert after.value("relay_upstream_duration_seconds_count", pool="default",
                       step="data") == 1
    assert after.value("relay_transaction_duration_seconds_count", outcome="delivered") == 1
    assert after.value("relay_redis_duration_seconds_count", step="reserve") == 1
    assert after.value("relay_redis_duration_seconds_count", step="commit") == 1
    assert after.value("relay_redis_duration_seconds_count", step="resolve_sender") == 1
    assert after.value("relay_message_size_bytes_count") == 1
    # The pooled connection stays open for the next message.
    assert after.value("relay_upstream_pool_connections", pool="default", state="idle") == 1
    assert after.value("relay_upstream_pool_connections", pool="default", state="busy") == 0
    assert after.value("relay_upstream_pool_size", pool="default") == \
        app.settings.upstream_pool_size
    assert after.value("relay_build_info") == 1
    assert after.value("process_resident_memory_bytes") > 0
    # No label carries a user: neither the login, the user's id nor an address appears.
    assert "agent@kw.test" not in after.text and user.id not in after.text
    assert "client@example.test" not in after.text and "example.test" not in after.text


async def test_metrics_count_refusals_by_reason(make_relay: RelayFactory, accounts: Any,
                                                redis_client: aioredis.Redis) -> None:
    """An over-limit recipient and one the upstream refuses are counted by reason, with the
    reservation, the refund and the events they cause."""
    behaviour = UpstreamBehaviour(rcpt_replies={"bad@example.test": "550 5.1.1 No such user"})
    server = CapturingUpstream(behaviour)
    await server.start()
    try:
        app: RelayApp = await make_relay(upstream=server)
        await add_user(accounts, limit=2)
        refused = await send(app, ["one@example.test", "bad@example.test"])
        assert list(refused[0]) == ["bad@example.test"]
        refused = await send(app, ["two@example.test", "three@example.test"])
        assert list(refused[0]) == ["three@example.test"]
        assert refused[0]["three@example.test"][0] == 550
    finally:
        await server.stop()
    m = await scrape(app.metrics_port)
    assert m.value("relay_recipients_total", outcome="accepted") == 2
    assert m.value("relay_recipients_total", outcome="refused",
                   reason="UpstreamPermanentError") == 1
    assert m.value("relay_recipients_total", outcome="refused", reason="QuotaExceededError") == 1
    assert m.value("relay_quota_reservations_total", result="reserved") == 3
    assert m.value("relay_quota_reservations_total", result="over_limit") == 1
    assert m.value("relay_quota_units_refunded_total") == 1
    assert m.value("relay_quota_units_committed_total") == 2
    assert m.value("relay_upstream_replies_total", step="rcpt", **{"class": "5xx"}) == 1
    assert m.value("relay_upstream_replies_total", step="rcpt", **{"class": "2xx"}) == 2
    assert m.value("relay_messages_total", outcome="delivered", route="command") == 2
    assert m.value("relay_events_published_total", event_kind="quota.rejected",
                   result="published") == 1
    assert m.value("relay_events_published_total", event_kind="quota.reached",
                   result="published") == 1
    assert m.value("relay_redis_duration_seconds_count", step="refund") == 1


async def test_metrics_count_an_upstream_5xx_to_data(make_relay: RelayFactory,
                                                     accounts: Any) -> None:
    """A message the upstream refuses after DATA is a failed message on its route, a 5xx to
    data, and its unit is refunded."""
    server = CapturingUpstream(UpstreamBehaviour(data_reply="554 5.6.0 Content rejected"))
    await server.start()
    try:
        app: RelayApp = await make_relay(upstream=server)
        await add_user(accounts)
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await send(app, ["client@example.test"])
        assert refused.value.code == 554
    finally:
        await server.stop()
    m = await scrape(app.metrics_port)
    assert m.value("relay_upstream_replies_total", pool="default", step="data",
                   **{"class": "5xx"}) == 1
    assert m.value("relay_messages_total", outcome="failed", route="command") == 1
    assert m.value("relay_messages_total", outcome="delivered") == 0
    assert m.value("relay_transaction_duration_seconds_count", outcome="failed") == 1
    assert m.value("relay_quota_units_refunded_total") == 1
    assert m.value("relay_quota_units_committed_total") == 0


async def test_metrics_count_auth_failures_and_unauthenticated_mail(
        make_relay: RelayFactory, accounts: Any, upstream: CapturingUpstream) -> None:
    """A wrong password is a failed AUTH; MAIL without AUTH is refused as auth_required."""
    app: RelayApp = await make_relay(upstream=upstream)
    await add_user(accounts)
    async with smtp_client(app, login=None) as client:
        reply = await client.execute_command(
            b"AUTH", b"PLAIN", base64.b64encode(b"\0agent@kw.test\0wrong password"))
        assert reply.code == 535
        with pytest.raises(aiosmtplib.SMTPSenderRefused):
            await client.mail("agent@kw.test")
    m = await scrape(app.metrics_port)
    assert m.value("relay_auth_attempts_total", mechanism="PLAIN", result="failed") == 1
    assert m.value("relay_auth_attempts_total", result="succeeded") == 0
    assert m.value("relay_mail_from_total", outcome="refused", reason="auth_required") == 1
    assert m.value("relay_connections_total", listener="starttls") == 1


async def test_metrics_count_malformed_auth(make_relay: RelayFactory,
                                            upstream: CapturingUpstream) -> None:
    """A malformed SASL response is counted as malformed, by mechanism."""
    app: RelayApp = await make_relay(upstream=upstream)
    async with smtp_client(app, login=None) as client:
        reply = await client.execute_command(b"AUTH", b"PLAIN",
                                             base64.b64encode(b"no separators"))
        assert reply.code == 501
    m = await scrape(app.metrics_port)
    assert m.value("relay_auth_attempts_total", mechanism="PLAIN", result="malformed") == 1
    assert m.value("relay_auth_attempts_total", result="failed") == 0


async def test_metrics_registries_are_per_relay(make_relay: RelayFactory, accounts: Any,
                                                upstream: CapturingUpstream) -> None:
    """Two relays in one process each count only their own traffic."""
    first: RelayApp = await make_relay(upstream=upstream)
    second: RelayApp = await make_relay(upstream=upstream)
    await add_user(accounts)
    await send(first, ["client@example.test"])
    assert (await scrape(first.metrics_port)).value("relay_messages_total") == 1
    assert (await scrape(second.metrics_port)).value("relay_messages_total") == 0


async def test_metrics_speak_openmetrics_when_asked(make_relay: RelayFactory) -> None:
    """Prometheus's Accept header for OpenMetrics gets OpenMetrics (ending in # EOF)."""
    app: RelayApp = await make_relay()
    status, content_type, text = await get(
        app.metrics_port, "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert "relay_messages_total" in text


async def test_metrics_listener_off(make_relay: RelayFactory) -> None:
    """metrics_listen None (an empty RELAY_METRICS_LISTEN) starts no listener."""
    app: RelayApp = await make_relay(metrics_listen=None)
    assert app.metrics_server is None


async def test_metrics_listener_port_taken_stops_startup(make_relay: RelayFactory) -> None:
    """A metrics address already in use stops the relay at start-up with a clear error."""
    first: RelayApp = await make_relay()
    with pytest.raises(StartupError, match="cannot listen for metrics"):
        await make_relay(metrics_listen=Endpoint("127.0.0.1", first.metrics_port))


def test_check_config_names_the_metrics_listeners(tmp_path: Path) -> None:
    """check-config shows where /metrics will listen, or that it is off."""
    env = clean_env(metrics_ports=False, RELAY_POLICIES_DIR=str(POLICIES),
                    RELAY_STATE_DIR=str(tmp_path / "state"),
                    RELAY_METRICS_LISTEN="0.0.0.0:9100", RELAY_NOTIFIER_METRICS_LISTEN="")
    done = subprocess.run([sys.executable, "-m", "relay", "check-config"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "metrics: 0.0.0.0:9100; notifier metrics: off" in done.stdout


# -- health ----------------------------------------------------------------------------------
async def test_healthz_answers_while_the_process_runs(make_relay: RelayFactory) -> None:
    """/healthz is 200 with a small JSON body."""
    app: RelayApp = await make_relay()
    status, content_type, text = await get(app.metrics_port, "/healthz")
    assert (status, json.loads(text)) == (200, {"status": "alive"})
    assert content_type.startswith("application/json")


async def test_readyz_ready_then_503_while_draining(make_relay: RelayFactory,
                                                   upstream: CapturingUpstream) -> None:
    """/readyz is 200 on a healthy relay and 503 "draining" once RelayApp.draining is set."""
    app: RelayApp = await make_relay(upstream=upstream)
    await wait_for(lambda: ready(app.metrics_port))
    assert await readyz(app.metrics_port) == (200, {"status": "ready"})
    app.draining = True
    assert await readyz(app.metrics_port) == (503, {"status": "not ready",
                                                    "reasons": ["draining"]})
    m = await scrape(app.metrics_port)
    assert m.value("relay_draining") == 1 and m.value("relay_ready") == 0
    status, _, _ = await get(app.metrics_port, "/healthz")
    assert status == 200


async def test_readyz_503_while_redis_is_stopped(make_relay: RelayFactory,
                                                 upstream: CapturingUpstream,
                                                 tmp_path: Path) -> None:
    """With its Redis stopped the relay is not ready (and says why); it is again once Redis
    is back. /healthz stays 200 throughout."""
    server = RedisServer(tmp_path / "own-redis")
    server.start()
    client = connect_redis(server.url, timeout=1)
    try:
        app: RelayApp = await make_relay(upstream=upstream, redis=client)
        await wait_for(lambda: ready(app.metrics_port))
        assert (await scrape(app.metrics_port)).value("relay_redis_up") == 1
        server.stop()
        status, body = await readyz(app.metrics_port)
        assert status == 503 and body["reasons"] == ["redis_unreachable"]
        m = await scrape(app.metrics_port)
        assert m.value("relay_redis_up") == 0 and m.value("relay_ready") == 0
        assert (await get(app.metrics_port, "/healthz"))[0] == 200
        server.start()
        await wait_for(lambda: ready(app.metrics_port), 10)
        assert (await scrape(app.metrics_port)).value("relay_redis_up") == 1
    finally:
        server.stop()
        await client.aclose()


async def test_readyz_503_while_the_upstream_is_unreachable(
        make_relay: RelayFactory, accounts: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed upstream connection makes the relay unready and is counted as a connect
    error; a background probe makes it ready again once the upstream is back, with no
    traffic needed."""
    monkeypatch.setattr(pool_module, "PROBE_INTERVAL", 0.1)
    server = CapturingUpstream(UpstreamBehaviour())
    await server.start()
    port = server.port
    await server.stop()
    try:
        app: RelayApp = await make_relay(upstream=server)
        await add_user(accounts)
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await send(app, ["client@example.test"])
        assert refused.value.code == 451
        status, body = await readyz(app.metrics_port)
        assert status == 503 and body["reasons"] == ["upstream_unreachable"]
        m = await scrape(app.metrics_port)
        assert m.value("relay_upstream_replies_total", pool="default", step="connect",
                       **{"class": "error"}) >= 1
        assert m.value("relay_upstream_up", pool="default") == 0
        assert m.value("relay_mail_from_total", outcome="refused",
                       reason="UpstreamUnavailableError") == 1

        # The upstream comes back on the same port: the probe notices.
        loop = asyncio.get_running_loop()
        server.server = await loop.create_server(server._factory, "127.0.0.1", port)
        await wait_for(lambda: ready(app.metrics_port), 10)
        assert (await scrape(app.metrics_port)).value("relay_upstream_up", pool="default") == 1
    finally:
        await server.stop()


# -- the notifier process ---------------------------------------------------------------------
async def test_notifier_process_exposes_deliveries_and_dead_letters(
        redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """``command-relay notifier`` serves its own /metrics, /healthz and /readyz: a delivered
    notice and a dead letter are counted per channel and kind, and the dead-letter stream's
    length is read at the scrape."""
    receiver = Receiver()
    receiver.statuses = [400]  # the first event is refused for good: a dead letter
    await receiver.start()
    events = EventLog(redis_client)
    try:
        async with running_notifier(redis_server.url, receiver.url(), tmp_path) as port:
            await wait_for(lambda: ready(port), 10)
            await events.publish(new_event(REACHED, "u-1", email="agent@kw.test",
                                           used=5000, limit=5000, percent=100))

            async def dead_lettered() -> bool:
                return (await scrape(port)).value("relay_notifications_total",
                                                  outcome="dead_lettered") == 1
            await wait_for(dead_lettered, 20)
            await events.publish(new_event(THRESHOLD, "u-1", email="agent@kw.test",
                                           used=4000, limit=5000, percent=80))

            async def delivered() -> bool:
                # The in-app webhook, then the email notice (each event goes through its
                # channels in turn; email sends both notices, to the capture folder).
                m = await scrape(port)
                return m.value("relay_notifications_total", channel="in_app",
                               event_kind=THRESHOLD, outcome="delivered") == 1 and \
                    m.value("relay_notifications_total", channel="email",
                            outcome="delivered") == 2
            await wait_for(delivered, 20)
            m = await scrape(port)
            assert m.value("relay_notifications_total", channel="in_app", event_kind=REACHED,
                           outcome="dead_lettered") == 1
            assert m.value("relay_events_dead_letters") == 1
            assert m.value("relay_events_stream_length") == 2
            assert m.value("relay_notification_duration_seconds_count", channel="in_app") == 2
            assert m.value("relay_redis_up") == 1
            assert await readyz(port) == (200, {"status": "ready"})
    finally:
        await receiver.stop()
