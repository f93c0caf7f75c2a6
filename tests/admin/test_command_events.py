"""The Command upstream's webhook (the generic JSON format of docs/suppression.md) on the
relay's public listener, for real: signed deliveries become entries; forged, stale,
replayed and malformed ones create nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from relay.decisions.suppression import SuppressionReason, SuppressionStore
from relay.process.wiring import RelayApp
from tests.conftest import MutableClock, RelayFactory, add_user
from tests.public_http import (
    COMMAND_SECRET,
    PublicClient,
    command_signature,
    public_client,
    public_settings,
)


@pytest.fixture
async def relay(make_relay: RelayFactory) -> RelayApp:
    app: RelayApp = await make_relay(**public_settings())
    return app


@pytest.fixture
async def client(relay: RelayApp) -> AsyncIterator[PublicClient]:
    assert relay.public_server is not None
    async with public_client(relay.public_server.port) as found:
        yield found


@pytest.fixture
def store(redis_client: aioredis.Redis) -> SuppressionStore:
    return SuppressionStore(redis_client)


def now(clock: MutableClock) -> int:
    return int(clock.now().timestamp())


def count(relay: RelayApp, metric: str, **labels: str) -> float:
    return relay.metrics.registry.get_sample_value(metric, labels) or 0.0


def event(event_id: str, kind: str, recipient: str, at: int, **more: Any) -> dict[str, Any]:
    return {"id": event_id, "type": kind, "recipient": recipient, "timestamp": at, **more}


async def test_command_documented_format_makes_entries(relay, client, store, accounts, clock):
    """bounce and reject become global bounces, complaint a global complaint, unsubscribe
    the named user's (by user_id, or by the owner of sender); an unknown type is ignored."""
    user = await add_user(accounts)
    other = await add_user(accounts, "other@kw.test", user_id="u-other")
    at = now(clock) - 30
    body = {"events": [
        event("e1", "bounce", "gone@example.test", at),
        event("e2", "reject", "refused@example.test", at),
        event("e3", "complaint", "angry@example.test", at, user_id=user.id),
        event("e4", "unsubscribe", "bye@example.test", at, user_id="u-other"),
        event("e5", "unsubscribe", "later@example.test", at, sender="agent@kw.test"),
        event("e6", "delivered", "fine@example.test", at),
    ]}
    answer = await client.command(body, now(clock))
    assert answer.status == 200, answer.text
    assert answer.json == {"received": 6, "recorded": 5, "replayed": 0, "ignored": 1,
                           "stale": 0, "unattributed": 0}
    assert {(e.address, e.reason, e.source, e.at) for e in await store.listing(user_id=None)} \
        == {("gone@example.test", SuppressionReason.BOUNCE, "command", at),
            ("refused@example.test", SuppressionReason.BOUNCE, "command", at),
            ("angry@example.test", SuppressionReason.COMPLAINT, "command", at)}
    assert [(e.address, e.reason) for e in await store.listing(user_id=other.id)] == \
        [("bye@example.test", SuppressionReason.UNSUBSCRIBE)]
    assert [e.address for e in await store.listing(user_id=user.id)] == ["later@example.test"]
    assert count(relay, "relay_webhook_deliveries_total", provider="command",
                 outcome="accepted") == 1
    assert count(relay, "relay_suppressions_created_total", reason="bounce",
                 source="command") == 2


@pytest.mark.parametrize("forgery", ["wrong secret", "altered body", "no v1", "empty",
                                     "not hex"])
async def test_command_forged_delivery_is_refused(relay, client, store, clock, forgery):
    """A signature under another secret, a body changed after signing, a header without v1
    or empty, a v1 that is no HMAC: 401, nothing created, webhook.forged at warning."""
    body = json.dumps({"events": [event("f1", "bounce", "victim@example.test",
                                        now(clock))]}).encode()
    t = now(clock)
    header = {"wrong secret": command_signature("another-secret-0123456789", t, body),
              "altered body": command_signature(COMMAND_SECRET, t, body.replace(b"f1", b"f2")),
              "no v1": f"t={t}",
              "empty": "",
              "not hex": f"t={t},v1=\u00e9\u00e9"}[forgery]
    with capture_logs() as logs:
        answer = await client.command(body, t, header=header)
    assert answer.status == 401
    assert await store.listing(user_id=None) == []
    [refusal] = [e for e in logs if e["event"].startswith("webhook.")]
    assert (refusal["event"], refusal["log_level"]) == ("webhook.forged", "warning")
    assert count(relay, "relay_webhook_deliveries_total", provider="command",
                 outcome="forged") == 1


async def test_command_delivery_without_the_header_is_refused(client, store, clock):
    """No X-Relay-Signature at all: 401."""
    answer = await client.request("POST", "/webhooks/command", data=json.dumps(
        {"events": [event("h1", "bounce", "victim@example.test", now(clock))]}))
    assert answer.status == 401
    assert await store.listing(user_id=None) == []


@pytest.mark.parametrize(("offset", "status"), [(-301, 401), (301, 401), (-300, 200),
                                                (300, 200)])
async def test_command_timestamp_outside_the_tolerance_is_refused(
        relay, client, store, clock, offset, status):
    """A well-signed delivery whose t is more than 5 minutes from the relay's clock (either
    way) is refused as stale; at exactly 5 minutes it is taken."""
    t = now(clock) + offset
    body = {"events": [event("t1", "bounce", "late@example.test", now(clock))]}
    with capture_logs() as logs:
        answer = await client.command(body, t)
    assert answer.status == status
    assert len(await store.listing(user_id=None)) == (1 if status == 200 else 0)
    if status == 401:
        assert answer.json["error"].startswith("timestamp more than 300 s")
        assert [e["event"] for e in logs if e["event"].startswith("webhook.")] == \
            ["webhook.stale"]
        assert count(relay, "relay_webhook_deliveries_total", provider="command",
                     outcome="stale") == 1


async def test_command_replayed_events_create_nothing_new(relay, client, store, clock):
    """The same events re-sent in a fresh, well-signed delivery (a retry, or a capture
    replayed within the window) answer 200 and create nothing: a removed entry stays
    removed. A new id in the same delivery is still applied."""
    body = {"events": [event("r1", "complaint", "once@example.test", now(clock))]}
    assert (await client.command(body, now(clock))).json["recorded"] == 1
    assert await store.remove("once@example.test", user_id=None)
    clock.current = clock.current.replace(second=30)
    with capture_logs() as logs:
        again = await client.command(body, now(clock))
    assert (again.status, again.json["recorded"], again.json["replayed"]) == (200, 0, 1)
    assert await store.listing(user_id=None) == []
    assert any(e["event"] == "webhook.replayed" for e in logs)
    body["events"].append(event("r2", "bounce", "new@example.test", now(clock)))
    mixed = await client.command(body, now(clock))
    assert (mixed.json["recorded"], mixed.json["replayed"]) == (1, 1)
    assert [e.address for e in await store.listing(user_id=None)] == ["new@example.test"]
    assert count(relay, "relay_webhook_deliveries_total", provider="command",
                 outcome="replayed") == 1


@pytest.mark.parametrize(("body", "error"), [
    (b"not json", "the body must be a JSON object"),
    (b"[]", "'events' must be an array"),
    (b'{"events": {}}', "'events' must be an array"),
    (b'{"events": [1]}', "events[0] must be an object"),
    (b'{"events": [{"id": "x", "type": "bounce", "recipient": "no-at", "timestamp": 1}]}',
     "events[0].recipient must be an email address"),
    (b'{"events": [{"id": "x", "type": "bounce", "recipient": "a@b.test"}]}',
     "events[0].timestamp must be Unix seconds"),
    (b'{"events": [{"id": "", "type": "bounce", "recipient": "a@b.test", "timestamp": 1}]}',
     "events[0].id must be a string"),
    (b'{"events": [{"id": "a", "type": "bounce", "recipient": "a@b.test", "timestamp": 1},'
     b' {"id": "b", "type": "unsubscribe", "recipient": "a@b.test", "timestamp": 1}]}',
     "events[1]: an unsubscribe needs user_id or sender"),
])
async def test_command_malformed_delivery_is_400_and_taken_whole_or_not_at_all(
        relay, client, store, clock, body, error):
    """Signed correctly but off the format: 400 naming the first bad field, and nothing
    created, not even the good events before it."""
    answer = await client.command(body, now(clock))
    assert answer.status == 400
    assert answer.json["error"].startswith(error)
    assert await store.listing(user_id=None) == []
    assert count(relay, "relay_webhook_deliveries_total", provider="command",
                 outcome="malformed") == 1


async def test_command_any_of_several_v1_signatures_is_enough(client, store, clock):
    """While the secret is rotated the sender signs with both: one v1 that matches is
    enough, in any position."""
    raw = json.dumps({"events": [event("k1", "bounce", "rot@example.test", now(clock))]})
    t = now(clock)
    good = command_signature(COMMAND_SECRET, t, raw.encode()).partition(",")[2]
    answer = await client.command(raw.encode(), t, header=f"t={t},v1={'0' * 64},{good}")
    assert answer.status == 200
    assert [e.address for e in await store.listing(user_id=None)] == ["rot@example.test"]


async def test_command_unconfigured_endpoint_answers_503_once_logged(make_relay, clock):
    """Without RELAY_COMMAND_WEBHOOK_SECRET: 503 and one webhook.unconfigured line."""
    app = await make_relay(**public_settings(command_webhook_secret=None))
    async with public_client(app.public_server.port) as other:
        with capture_logs() as logs:
            answers = [await other.command({"events": []}, now(clock)) for _ in range(2)]
    assert [a.status for a in answers] == [503, 503]
    assert len([e for e in logs if e["event"] == "webhook.unconfigured"]) == 1


async def test_command_latest_event_of_an_address_wins(client, store, clock):
    """Two events of one address in a delivery: the later in time decides the entry,
    whatever their order in the array (a complaint after a bounce is a complaint)."""
    at = now(clock) - 100
    body = {"events": [event("l1", "complaint", "both@example.test", at + 10),
                       event("l2", "bounce", "both@example.test", at),
                       event("l3", "bounce", "other@example.test", at + 10),
                       event("l4", "complaint", "other@example.test", at)]}
    answer = await client.command(body, now(clock))
    assert answer.json["recorded"] == 4
    found = {e.address: (e.reason, e.at) for e in await store.listing(user_id=None)}
    assert found == {"both@example.test": (SuppressionReason.COMPLAINT, at + 10),
                     "other@example.test": (SuppressionReason.BOUNCE, at + 10)}
