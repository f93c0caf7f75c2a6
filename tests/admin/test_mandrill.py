"""Mailchimp Transactional's webhook on the relay's public listener (a real aiohttp server in
a RelayApp, a real HTTP client, a real Redis): the documented event shapes, signed as
Mailchimp says, become suppression entries; forged, replayed, stale and malformed deliveries
create nothing."""

from __future__ import annotations

import io
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
    MANDRILL_SECRET,
    MANDRILL_URL,
    PublicClient,
    mandrill_event,
    mandrill_signature,
    mandrill_sync_event,
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


async def everything(store: SuppressionStore, user_id: str | None = None) -> list[Any]:
    return [*(await store.listing(user_id=None)),
            *((await store.listing(user_id=user_id)) if user_id else [])]


async def test_mandrill_documented_events_make_global_and_user_entries(
        relay, client, store, accounts, clock):
    """A batch in the documented shapes, signed correctly: hard_bounce and reject become
    global bounces, spam a global complaint, unsub the sending user's unsubscribe (found
    from msg.sender); send, deferral, soft_bounce, open, click and a sync event are ignored
    and counted. The answer and the metrics say so; each entry is dated by its event."""
    user = await add_user(accounts)
    ts = now(clock) - 120
    batch = [
        mandrill_event("hard_bounce", "Gone@Example.test", ts=ts, message_id="m1"),
        mandrill_event("reject", "listed@example.test", ts=ts, message_id="m2"),
        mandrill_event("spam", "angry@example.test", ts=ts, message_id="m3"),
        mandrill_event("unsub", "leaving@example.test", ts=ts, message_id="m4",
                       sender="agent@kw.test"),
        *(mandrill_event(kind, "fine@example.test", ts=ts, message_id=f"i{n}")
          for n, kind in enumerate(["send", "deferral", "soft_bounce", "open", "click"])),
        mandrill_sync_event("synced@example.test", ts=ts),
    ]
    with capture_logs() as logs:
        answer = await client.mandrill(batch)
    assert answer.status == 200, answer.text
    assert answer.json == {"received": 10, "recorded": 4, "replayed": 0, "ignored": 6,
                           "stale": 0, "unattributed": 0}
    found = {(e.address, e.scope, e.reason, e.source, e.at)
             for e in await everything(store, user.id)}
    assert found == {
        ("gone@example.test", "*", SuppressionReason.BOUNCE, "mandrill", ts),
        ("listed@example.test", "*", SuppressionReason.BOUNCE, "mandrill", ts),
        ("angry@example.test", "*", SuppressionReason.COMPLAINT, "mandrill", ts),
        ("leaving@example.test", user.id, SuppressionReason.UNSUBSCRIBE, "mandrill", ts),
    }
    assert [e["event"] for e in logs if e["event"].startswith("webhook.")] == \
        ["webhook.accepted"]
    recorded = [e for e in logs if e["event"] == "suppression.recorded"]
    assert {(e["scope"], e["recipient_domain"]) for e in recorded} == \
        {("*", "example.test"), (user.id, "example.test")}
    assert not any("leaving@" in str(e) for e in logs)  # domains only
    assert count(relay, "relay_webhook_deliveries_total", provider="mandrill",
                 outcome="accepted") == 1
    assert count(relay, "relay_webhook_events_total", provider="mandrill",
                 result="recorded") == 4
    assert count(relay, "relay_webhook_events_total", provider="mandrill",
                 result="ignored") == 6
    for reason, created in [("bounce", 2), ("complaint", 1), ("unsubscribe", 1)]:
        assert count(relay, "relay_suppressions_created_total", reason=reason,
                     source="mandrill") == created


async def test_mandrill_unsub_belongs_to_the_metadata_user_or_the_sender(
        client, store, accounts, clock):
    """msg.metadata.user_id names the user when it is one; otherwise msg.sender's owner;
    an unsub whose user is neither known makes no entry (unattributed, logged)."""
    named = await add_user(accounts, "named@kw.test", user_id="u-named")
    owner = await add_user(accounts, "owner@kw.test", user_id="u-owner")
    ts = now(clock)
    with capture_logs() as logs:
        answer = await client.mandrill([
            mandrill_event("unsub", "a@example.test", ts=ts, message_id="n1",
                           sender="nobody@elsewhere.test", metadata={"user_id": "u-named"}),
            mandrill_event("unsub", "b@example.test", ts=ts, message_id="n2",
                           sender="owner@kw.test", metadata={"user_id": 111}),
            mandrill_event("unsub", "c@example.test", ts=ts, message_id="n3",
                           sender="nobody@elsewhere.test", metadata={}),
        ])
    assert answer.status == 200
    assert (answer.json["recorded"], answer.json["unattributed"]) == (2, 1)
    assert [e.address for e in await store.listing(user_id=named.id)] == ["a@example.test"]
    assert [e.address for e in await store.listing(user_id=owner.id)] == ["b@example.test"]
    assert await store.listing(user_id=None) == []
    [warning] = [e for e in logs if e["event"] == "webhook.unattributed"]
    assert warning["recipient_domain"] == "example.test"


@pytest.mark.parametrize("forgery", ["wrong key", "other url", "altered", "no header",
                                     "garbage header"])
async def test_mandrill_forged_delivery_is_refused_and_creates_nothing(
        relay, client, store, clock, forgery):
    """A wrong key, a signature for another URL, a body altered after signing, no signature,
    or a header that is no signature: 401, no entry, webhook.forged at warning."""
    batch = [mandrill_event("hard_bounce", "victim@example.test", ts=now(clock),
                            message_id="f1")]
    with capture_logs() as logs:
        if forgery == "wrong key":
            answer = await client.mandrill(batch, key="another-key-0123456789")
        elif forgery == "other url":
            answer = await client.mandrill(batch, url=MANDRILL_URL + "/")
        elif forgery == "altered":
            signed = mandrill_signature(MANDRILL_SECRET, MANDRILL_URL,
                                        {"mandrill_events": "[]"})
            answer = await client.mandrill(batch, signature=signed)
        elif forgery == "no header":
            answer = await client.mandrill(batch, key="")
        else:
            answer = await client.mandrill(batch, signature="not base64 at all \u00e9")
    assert answer.status == 401
    assert answer.json == {"error": "bad signature"}
    assert await store.listing(user_id=None) == []
    [refusal] = [e for e in logs if e["event"].startswith("webhook.")]
    assert (refusal["event"], refusal["log_level"]) == ("webhook.forged", "warning")
    assert count(relay, "relay_webhook_deliveries_total", provider="mandrill",
                 outcome="forged") == 1


async def test_mandrill_replayed_delivery_creates_nothing_new(relay, client, store, clock):
    """The same signed delivery again (a replay, or Mandrill's retry of a delivery whose
    answer was lost) answers 200 but creates nothing: an entry an operator removed in
    between stays removed; a duplicate event inside one batch counts once."""
    ts = now(clock)
    batch = [mandrill_event("hard_bounce", "once@example.test", ts=ts, message_id="r1"),
             mandrill_event("spam", "twice@example.test", ts=ts, message_id="r2"),
             mandrill_event("spam", "twice@example.test", ts=ts, message_id="r2")]
    first = await client.mandrill(batch)
    assert (first.status, first.json["recorded"], first.json["replayed"]) == (200, 2, 1)
    assert await store.remove("once@example.test", user_id=None)
    with capture_logs() as logs:
        again = await client.mandrill(batch)
    assert again.status == 200
    assert again.json == {"received": 3, "recorded": 0, "replayed": 3, "ignored": 0,
                          "stale": 0, "unattributed": 0}
    assert [e.address for e in await store.listing(user_id=None)] == ["twice@example.test"]
    assert [e["event"] for e in logs if e["event"].startswith("webhook.")] == \
        ["webhook.replayed"]
    assert count(relay, "relay_webhook_deliveries_total", provider="mandrill",
                 outcome="replayed") == 1
    assert count(relay, "relay_suppressions_created_total", reason="bounce",
                 source="mandrill") == 1
    # A new event of the same message (another kind) is not a replay.
    later = await client.mandrill([mandrill_event("reject", "once@example.test", ts=ts + 5,
                                                  message_id="r1")])
    assert later.json["recorded"] == 1


async def test_mandrill_events_older_than_the_replay_window_are_not_applied(
        client, store, clock):
    """Mandrill signs no time: an event older than the claims' lifetime (30 days) is stale,
    not applied, since its claim may be gone; one just inside is applied."""
    day = 24 * 3600
    answer = await client.mandrill([
        mandrill_event("hard_bounce", "old@example.test", ts=now(clock) - 31 * day,
                       message_id="s1"),
        mandrill_event("hard_bounce", "recent@example.test", ts=now(clock) - 29 * day,
                       message_id="s2")])
    assert (answer.status, answer.json["stale"], answer.json["recorded"]) == (200, 1, 1)
    assert [e.address for e in await store.listing(user_id=None)] == ["recent@example.test"]


async def test_mandrill_head_check_answers_200(client, make_relay):
    """Mandrill checks a new webhook's URL with HEAD: 200, also before the key is set."""
    assert (await client.request("HEAD", "/webhooks/mandrill")).status == 200
    bare = await make_relay(**public_settings(mandrill_webhook_key=None,
                                              mandrill_webhook_url=None))
    async with public_client(bare.public_server.port) as other:
        assert (await other.request("HEAD", "/webhooks/mandrill")).status == 200


async def test_mandrill_unconfigured_endpoint_answers_503_and_says_so_once(
        make_relay, redis_client, clock):
    """Without the key, POST answers 503 (Mandrill retries the batch later) and the log says
    so once, however many deliveries come."""
    app = await make_relay(**public_settings(mandrill_webhook_key=None,
                                             mandrill_webhook_url=None))
    batch = [mandrill_event("hard_bounce", "x@example.test", ts=now(clock), message_id="u1")]
    async with public_client(app.public_server.port) as other:
        with capture_logs() as logs:
            answers = [await other.mandrill(batch) for _ in range(3)]
    assert [a.status for a in answers] == [503] * 3
    assert answers[0].json == {"error": "this endpoint is not configured"}
    said = [e for e in logs if e["event"] == "webhook.unconfigured"]
    assert len(said) == 1 and "RELAY_MANDRILL_WEBHOOK_KEY" in said[0]["note"]
    assert await SuppressionStore(redis_client).listing(user_id=None) == []
    assert count(app, "relay_webhook_deliveries_total", provider="mandrill",
                 outcome="unconfigured") == 3


@pytest.mark.parametrize("fields", [{"mandrill_events": "not json"},
                                    {"mandrill_events": '{"event": "spam"}'},
                                    {"other": "[]"}])
async def test_mandrill_signed_but_malformed_delivery_is_400(relay, client, store, fields):
    """Correctly signed, but mandrill_events is missing, not JSON or not an array: 400."""
    answer = await client.mandrill([], fields=fields)
    assert answer.status == 400
    assert "mandrill_events" in answer.json["error"]
    assert count(relay, "relay_webhook_deliveries_total", provider="mandrill",
                 outcome="malformed") == 1


async def test_mandrill_unreadable_events_are_ignored_not_fatal(client, store, clock):
    """A hard_bounce without msg.email is logged and ignored; the rest of the batch holds."""
    broken = mandrill_event("hard_bounce", "x@example.test", ts=now(clock), message_id="b1")
    del broken["msg"]["email"]
    with capture_logs() as logs:
        answer = await client.mandrill([broken, "not an object", mandrill_event(
            "hard_bounce", "ok@example.test", ts=now(clock), message_id="b2")])
    assert answer.status == 200, (answer.text, logs)
    assert (answer.json["recorded"], answer.json["ignored"]) == (1, 2)
    assert any(e["event"] == "webhook.event_unreadable" for e in logs)


async def test_mandrill_body_over_the_limit_is_413(relay, client):
    """A body past 16 MiB is refused before it is read whole."""
    answer = await client.request("POST", "/webhooks/mandrill",
                                  data=io.BytesIO(b"mandrill_events=" + b"x" * 2 ** 24))
    assert answer.status == 413
    assert count(relay, "relay_webhook_deliveries_total", provider="mandrill",
                 outcome="too_large") == 1


async def test_mandrill_signature_uses_every_field_sorted_by_name(client, store, clock):
    """Extra POST fields are signed too, in name order (as Mailchimp documents)."""
    events = [mandrill_event("hard_bounce", "sorted@example.test", ts=now(clock),
                             message_id="o1")]
    fields = {"zeta": "last", "mandrill_events": json.dumps(events), "alpha": "first"}
    answer = await client.mandrill([], fields=fields)
    assert (answer.status, answer.json["recorded"]) == (200, 1)
