"""One-click unsubscribe (RFC 8058) on the relay's public listener, for real: the POST a
mailbox provider sends creates the user-scoped entry at once, a GET (a mail scanner) never
does, and a bad or altered link opens nothing and says nothing of why."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from relay.decisions.suppression import SuppressionReason, SuppressionStore
from relay.identity.signed_links import LinkSigner
from relay.process.wiring import RelayApp
from tests.conftest import RelayFactory
from tests.public_http import LINK_SECRET, PublicClient, public_client, public_settings

SIGNER = LinkSigner(LINK_SECRET.encode())
USER = "u-agent1"
RECIPIENT = "contact@example.test"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}


def token(user: str = USER, recipient: str = RECIPIENT) -> str:
    """What the List-Unsubscribe header's URL carries (issue 13's design: purpose
    "unsubscribe", payload u and r)."""
    return SIGNER.sign("unsubscribe", {"u": user, "r": recipient})


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


def count(relay: RelayApp, metric: str, **labels: str) -> float:
    return relay.metrics.registry.get_sample_value(metric, labels) or 0.0


async def test_unsubscribe_post_creates_the_user_entry_at_once_and_is_idempotent(
        relay, client, store):
    """The RFC 8058 POST (form-encoded List-Unsubscribe=One-Click) answers 200 and the
    user-scoped entry exists when it does (reason unsubscribe, source one-click); a second
    POST answers 200 too and leaves the entry as the first made it. The log names the user
    and the recipient's domain, never the token or the address."""
    link = token()
    with capture_logs() as logs:
        first = await client.request("POST", f"/unsubscribe/{link}", data=ONE_CLICK)
        entry = await store.get(RECIPIENT, user_id=USER)
        second = await client.request("POST", f"/unsubscribe/{link}", data=ONE_CLICK)
    assert (first.status, second.status) == (200, 200)
    assert first.headers["Content-Type"] == "text/html; charset=utf-8"
    assert entry is not None
    assert (entry.address, entry.user_id, entry.reason, entry.source) == \
        (RECIPIENT, USER, SuppressionReason.UNSUBSCRIBE, "one-click")
    assert await store.get(RECIPIENT, user_id=USER) == entry
    assert await store.get(RECIPIENT, user_id=None) is None  # user-scoped, not global
    recorded = [e for e in logs if e["event"] == "unsubscribe.recorded"]
    assert [(e["user_id"], e["recipient_domain"], e["created"]) for e in recorded] == \
        [(USER, "example.test", True), (USER, "example.test", False)]
    assert link not in str(logs) and RECIPIENT not in str(logs)
    assert count(relay, "relay_unsubscribe_requests_total", outcome="recorded") == 1
    assert count(relay, "relay_unsubscribe_requests_total", outcome="already") == 1
    assert count(relay, "relay_suppressions_created_total", reason="unsubscribe",
                 source="one-click") == 1


async def test_unsubscribe_post_as_multipart_form_data(client, store):
    """RFC 8058 §3.2: the mail receiver SHOULD send multipart/form-data; taken the same."""
    form = aiohttp.FormData()
    form.add_field("List-Unsubscribe", "One-Click")
    form.add_field("ignored", b"x", filename="x.bin")  # forces multipart/form-data
    answer = await client.request("POST", f"/unsubscribe/{token()}", data=form)
    assert answer.status == 200
    assert await store.get(RECIPIENT, user_id=USER) is not None


async def test_unsubscribe_get_shows_a_button_and_changes_nothing(client, store):
    """GET (and HEAD), what mail scanners and link previews send, never unsubscribe: the
    page shows the address and a form that POSTs List-Unsubscribe=One-Click back to the
    same URL; submitting it, as a browser would, unsubscribes."""
    link = token(recipient="a<b>@example.test")
    page = await client.request("GET", f"/unsubscribe/{link}")
    head = await client.request("HEAD", f"/unsubscribe/{link}")
    assert (page.status, head.status) == (200, 200)
    assert await store.listing(user_id=USER) == []
    assert "a&lt;b&gt;@example.test" in page.text and "<b>" not in page.text
    assert 'name="robots" content="noindex' in page.text
    [form] = re.findall(r'<form method="post">(.*?)</form>', page.text)
    fields = dict(re.findall(r'name="([^"]+)" value="([^"]+)"', form))
    assert fields == ONE_CLICK
    done = await client.request("POST", f"/unsubscribe/{link}", data=fields)
    assert done.status == 200
    assert [e.address for e in await store.listing(user_id=USER)] == ["a<b>@example.test"]


def _altered() -> dict[str, str]:
    body, _, tag = token().partition(".")
    other_body = base64.urlsafe_b64encode(
        json.dumps({"r": RECIPIENT, "u": "u-victim"}).encode()).rstrip(b"=").decode()
    flipped = tag[:-1] + ("A" if tag[-1] != "A" else "B")
    return {
        "flipped tag": f"{body}.{flipped}",
        "other payload": f"{other_body}.{tag}",
        "other purpose": SIGNER.sign("usage", {"u": USER, "r": RECIPIENT}),
        "other secret": LinkSigner(b"another-secret-of-16+").sign(
            "unsubscribe", {"u": USER, "r": RECIPIENT}),
        "no tag": body,
        "garbage": "%00%ff..",
        "bad payload": SIGNER.sign("unsubscribe", {"u": USER}),
    }


@pytest.mark.parametrize("kind", sorted(_altered()))
async def test_unsubscribe_altered_link_is_refused_alike_and_creates_nothing(
        relay, client, store, kind):
    """A flipped tag, a payload swapped under a valid tag, a token of another purpose or
    secret, a truncated or garbage one, or a signed one without a recipient: GET and POST
    answer the same 404 page, nothing is created."""
    bad = _altered()[kind]
    refusals = [await client.request("GET", f"/unsubscribe/{bad}"),
                await client.request("POST", f"/unsubscribe/{bad}", data=ONE_CLICK)]
    assert [r.status for r in refusals] == [404, 404]
    assert refusals[0].text == refusals[1].text
    assert "not valid" in refusals[0].text and "expired" not in refusals[0].text
    assert await store.listing(user_id=USER) == []
    assert await store.listing(user_id="u-victim") == []
    assert count(relay, "relay_unsubscribe_requests_total", outcome="invalid") == 1


async def test_unsubscribe_expired_link_is_refused_like_a_bad_one(client, store):
    """A link past its expiry answers the same 404 as a forged one."""
    expired = SIGNER.sign("unsubscribe", {"u": USER, "r": RECIPIENT}, ttl=1, now=1.0)
    answer = await client.request("POST", f"/unsubscribe/{expired}", data=ONE_CLICK)
    forged = await client.request("POST", f"/unsubscribe/{token()}x", data=ONE_CLICK)
    assert (answer.status, answer.text) == (forged.status, forged.text)
    assert await store.listing(user_id=USER) == []


@pytest.mark.parametrize("data", [{}, {"List-Unsubscribe": "Yes"}, "List-Unsubscribe=One-Click"])
async def test_unsubscribe_post_without_the_one_click_body_is_400(relay, client, store, data):
    """A POST whose form lacks List-Unsubscribe=One-Click (a plain-text body is no form)
    is refused with 400 and creates nothing."""
    headers = {"Content-Type": "text/plain"} if isinstance(data, str) else None
    answer = await client.request("POST", f"/unsubscribe/{token()}", data=data,
                                  headers=headers)
    assert answer.status == 400
    assert await store.listing(user_id=USER) == []
    assert count(relay, "relay_unsubscribe_requests_total", outcome="malformed") == 1


async def test_unsubscribe_pages_carry_the_no_cache_no_frame_headers(client):
    """Every answer of the public listener: not cached, not framed, no referrer, no
    sniffing (the URL holds a token)."""
    for answer in [await client.request("GET", f"/unsubscribe/{token()}"),
                   await client.request("GET", "/unsubscribe/bad")]:
        assert answer.headers["Cache-Control"] == "no-store"
        assert answer.headers["Referrer-Policy"] == "no-referrer"
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]
