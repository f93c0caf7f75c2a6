"""A client of the relay's public HTTP listener (relay/admin/public.py) for the tests, and
what it sends: Mailchimp Transactional deliveries in their documented shapes, signed as
Mailchimp's "How to Authenticate Webhook Requests" says, and Command upstream deliveries
signed as docs/suppression.md says. Both signatures are computed here from those documents,
not with the relay's own functions, so a relay that signs wrongly fails the tests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from relay.config.endpoints import Endpoint

LINK_SECRET = "link-signing-secret-for-tests-0123"
MANDRILL_SECRET = "mandrill-webhook-key-0123456789"  # the webhook key Mandrill shows
MANDRILL_URL = "https://relay.example.test/webhooks/mandrill"
COMMAND_SECRET = "command-webhook-secret-0123456789"


def public_settings(**more: Any) -> dict[str, Any]:
    """make_relay overrides: the public listener on port 0, both webhooks configured."""
    return {"public_listen": Endpoint("127.0.0.1", 0), "link_secret": LINK_SECRET,
            "mandrill_webhook_key": MANDRILL_SECRET, "mandrill_webhook_url": MANDRILL_URL,
            "command_webhook_secret": COMMAND_SECRET, **more}


# -- Mailchimp Transactional -------------------------------------------------------------------
def mandrill_signature(key: str, url: str, fields: dict[str, str]) -> str:
    """The URL as registered, then each POST field sorted by name as name + value, no
    delimiter; HMAC-SHA1 under the webhook key; base64."""
    signed = url
    for name in sorted(fields):
        signed += name + fields[name]
    return base64.b64encode(hmac.new(key.encode(), signed.encode(), hashlib.sha1).digest()
                            ).decode()


def mandrill_event(kind: str, email: str, *, ts: int, message_id: str,
                   sender: str = "example.sender@mandrillapp.com",
                   metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """A message event as Mailchimp's "Message Event Webhook Format" and its sample batch
    show it: the event, its time, the message's ``_id`` and the ``msg`` with the recipient
    (``email``), the ``sender``, the sender's ``metadata`` and the state."""
    states = {"send": "sent", "deferral": "deferred", "hard_bounce": "bounced",
              "soft_bounce": "soft-bounced", "open": "sent", "click": "sent", "spam": "sent",
              "unsub": "sent", "reject": "rejected"}
    msg: dict[str, Any] = {
        "ts": ts - 60, "subject": "This an example webhook message", "email": email,
        "sender": sender, "tags": ["webhook-example"], "state": states[kind],
        "metadata": metadata if metadata is not None else {"user_id": 111},
        "_id": message_id, "_version": "exampleaaaaaaaaaaaaaaa"}
    if kind in ("send", "open", "click", "spam", "unsub"):
        msg.update(opens=[], clicks=[])
    if kind == "hard_bounce":
        msg.update(bounce_description="bad_mailbox", bgtools_code=10,
                   diag="smtp;550 5.1.1 The email account that you tried to reach does not "
                        "exist.")
    event: dict[str, Any] = {"event": kind, "msg": msg, "_id": message_id, "ts": ts}
    if kind in ("open", "click"):
        event.update(ip="127.0.0.1", user_agent="Mozilla/5.0", location=None,
                     user_agent_parsed=None)
    if kind == "click":
        event["url"] = "http://mandrill.com"
    return event


def mandrill_sync_event(email: str, *, ts: int) -> dict[str, Any]:
    """A sync event (a denylist change): ``type`` and ``reject``, no ``event``, no ``msg``."""
    return {"type": "blacklist", "action": "add", "ts": ts, "reject": {
        "reason": "hard-bounce", "detail": " smtp;550 5.1.1 The email account that you tried "
        "to reach does not exist.", "last_event_at": "2026-11-15 12:00:00", "email": email,
        "created_at": "2026-11-15 12:00:00", "expires_at": "2026-12-15 12:00:00",
        "expired": False, "subaccount": None, "sender": None}}


# -- the Command upstream ----------------------------------------------------------------------
def command_signature(secret: str, timestamp: int, body: bytes) -> str:
    """``t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>." + body>``."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


@dataclass
class Answer:
    status: int
    text: str
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        return json.loads(self.text)


class PublicClient:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"

    async def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        async with self.session.request(method, self.base + path, allow_redirects=False,
                                        **kwargs) as response:
            return Answer(response.status, await response.text(), dict(response.headers))

    async def mandrill(self, events: list[dict[str, Any]] | str, *,
                       key: str = MANDRILL_SECRET, url: str = MANDRILL_URL,
                       signature: str | None = None,
                       fields: dict[str, str] | None = None) -> Answer:
        """POST a batch, form-encoded and signed (``signature`` given: that header
        instead; None and no key: no header)."""
        form = fields if fields is not None else {
            "mandrill_events": events if isinstance(events, str) else json.dumps(events)}
        headers = {}
        if signature is not None:
            headers["X-Mandrill-Signature"] = signature
        elif key:
            headers["X-Mandrill-Signature"] = mandrill_signature(key, url, form)
        return await self.request("POST", "/webhooks/mandrill", data=form, headers=headers)

    async def command(self, body: dict[str, Any] | bytes, timestamp: int, *,
                      secret: str = COMMAND_SECRET, header: str | None = None) -> Answer:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.request(
            "POST", "/webhooks/command", data=raw,
            headers={"Content-Type": "application/json",
                     "X-Relay-Signature": header if header is not None
                     else command_signature(secret, timestamp, raw)})


@asynccontextmanager
async def public_client(port: int) -> AsyncIterator[PublicClient]:
    async with aiohttp.ClientSession() as session:
        yield PublicClient(session, port)
