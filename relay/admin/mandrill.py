"""Mailchimp Transactional (Mandrill) message-event webhooks: ``POST /webhooks/mandrill``
turns hard bounces, spam complaints, rejects and unsubscribes into suppression entries
(docs/suppression.md#provider-webhooks).

The format, as Mailchimp documents it ("Webhook Format", "Message Event Webhook Format"): a
form POST whose one field, ``mandrill_events``, is a JSON array of up to 1000 events. A
message event has ``event`` (send, deferral, hard_bounce, soft_bounce, open, click, spam,
unsub, reject), ``ts`` (Unix seconds), ``_id`` (the message's id) and ``msg``: ``email`` (the
recipient), ``sender``, ``metadata`` (what the sender attached), ``state``, ``diag``… Sync
events (``type``: blacklist, whitelist) and inbound messages carry none of the four events
acted on: like send, open or click, they are counted ``ignored``.

The signature ("How to Authenticate Webhook Requests"): ``X-Mandrill-Signature`` is the
base64 of HMAC-SHA1 under the webhook's key over the webhook URL exactly as registered (a
proxy in front hides it from the relay: ``RELAY_MANDRILL_WEBHOOK_URL``) followed by every
POST field, sorted by name, as name then value, with no separator.

Adding a webhook, Mandrill first checks its URL with a HEAD request: answered 200 whether or
not the key is set (Mandrill shows the key only once the webhook exists).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from urllib.parse import parse_qsl

import structlog
from aiohttp import web

from relay.admin.webhooks import (
    BodyTooLargeError,
    Intake,
    ProviderEvent,
    Tally,
    Unconfigured,
    answer,
    plausible_address,
    read_body,
)
from relay.decisions.suppression import SuppressionReason
from relay.observe.metrics import RelayMetrics

log = structlog.get_logger()

PROVIDER = "mandrill"
PATH = "/webhooks/mandrill"
FIELD = "mandrill_events"
SIGNATURE_HEADER = "X-Mandrill-Signature"
# 1000 events of a few kilobytes each (a message event carries its opens, clicks, SMTP
# events…), with room to spare.
MAX_BODY = 16 * 1024 * 1024
REASONS = {
    "hard_bounce": SuppressionReason.BOUNCE,
    "reject": SuppressionReason.BOUNCE,
    "spam": SuppressionReason.COMPLAINT,
    "unsub": SuppressionReason.UNSUBSCRIBE,
}


def signature(key: str, url: str, fields: list[tuple[str, str]]) -> str:
    """``X-Mandrill-Signature`` of a POST of ``fields`` to ``url``."""
    signed = url + "".join(name + value
                           for name, value in sorted(fields, key=lambda field: field[0]))
    mac = hmac.new(key.encode(), signed.encode("utf-8", "surrogateescape"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


def _text(value: object, longest: int) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and 0 < len(value) <= longest else None


def _seconds(value: object) -> int | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_event(raw: object) -> ProviderEvent | None:
    """The entry one Mandrill event makes, or None (a kind not acted on, or unreadable)."""
    if not isinstance(raw, dict):
        return None
    kind = raw.get("event")
    reason = REASONS.get(kind) if isinstance(kind, str) else None
    if reason is None:
        return None
    msg = raw.get("msg")
    msg = msg if isinstance(msg, dict) else {}
    recipient = plausible_address(msg.get("email"))
    at = _seconds(raw.get("ts"))
    message_id = _text(raw.get("_id"), 256) or _text(msg.get("_id"), 256)
    if recipient is None or at is None or message_id is None:
        log.warning("webhook.event_unreadable", provider=PROVIDER, event_kind=kind,
                    note="an event of a kind acted on without msg.email, ts or _id: ignored")
        return None
    metadata = msg.get("metadata")
    user_id = _text(metadata.get("user_id"), 64) if isinstance(metadata, dict) else None
    # The event's kind, the message and the time: a message has at most one event of each
    # kind at one instant, and a replay repeats all three.
    return ProviderEvent(identity=f"{kind}\0{message_id}\0{at}", reason=reason,
                         recipient=recipient, user_id=user_id,
                         sender=plausible_address(msg.get("sender")), at=at)


class MandrillWebhook:
    """The ``mandrill`` route group: HEAD and POST ``/webhooks/mandrill``."""

    name = "mandrill-webhook"

    def __init__(self, configured: tuple[str, str] | None, intake: Intake,
                 metrics: RelayMetrics) -> None:
        # (webhook key, URL as registered), or None: the endpoint answers 503.
        self._configured = configured
        self._intake = intake
        self._metrics = metrics
        self._unconfigured = Unconfigured(PROVIDER, "RELAY_MANDRILL_WEBHOOK_KEY and "
                                                    "RELAY_MANDRILL_WEBHOOK_URL")

    def routes(self) -> list[web.RouteDef]:
        return [web.head(PATH, self.check), web.post(PATH, self.deliver)]

    async def check(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    def _refuse(self, outcome: str, status: int, error: str,
                request: web.Request) -> web.Response:
        return answer(self._metrics, PROVIDER, outcome, status, {"error": error},
                      peer=request.remote)

    async def deliver(self, request: web.Request) -> web.Response:
        if self._configured is None:
            return self._unconfigured(self._metrics, request)
        key, url = self._configured
        try:
            body = await read_body(request, MAX_BODY)
        except BodyTooLargeError:
            return self._refuse("too_large", 413, "the body is too large", request)
        try:
            fields = parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                               strict_parsing=bool(body), max_num_fields=100)
        except (UnicodeDecodeError, ValueError):
            return self._refuse("malformed", 400, "not a form body", request)
        supplied = request.headers.get(SIGNATURE_HEADER, "")
        expected = signature(key, url, fields)
        if not hmac.compare_digest(expected.encode(),
                                   supplied.encode("utf-8", "surrogateescape")):
            return self._refuse("forged", 401, "bad signature", request)
        found = [value for name, value in fields if name == FIELD]
        try:
            events = json.loads(found[0]) if len(found) == 1 else None
        except ValueError:
            events = None
        if not isinstance(events, list):
            return self._refuse("malformed", 400, f"{FIELD} must be one JSON array", request)
        parsed = [e for e in map(parse_event, events) if e is not None]
        tally = Tally(received=len(events), ignored=len(events) - len(parsed))
        return await self._intake.answer(PROVIDER, parsed, tally, request, dated=True)
