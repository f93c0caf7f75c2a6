"""The Command upstream's event webhook: ``POST /webhooks/command``, a documented JSON format
(docs/suppression.md#the-command-upstreams-format) whose bounces, complaints, rejects and
unsubscribes become suppression entries.

The body is ``{"events": [{"id", "type", "recipient", "user_id"?, "sender"?,
"timestamp"}]}``; the header ``X-Relay-Signature: t=<unix seconds>,v1=<hex>`` carries the
HMAC-SHA256 under ``RELAY_COMMAND_WEBHOOK_SECRET`` of ``t`` + ``"."`` + the body's bytes, as
Stripe signs its webhooks: the time is signed too, and a delivery whose ``t`` is more than
``TOLERANCE`` seconds from the relay's clock is refused (``stale``), so a captured delivery
cannot be replayed later; within the window, the event ids make a replay create nothing
(relay/admin/webhooks.py). Several ``v1`` values may be given (a key being rotated): one
match is enough. A delivery is taken whole or refused whole (400 naming the first bad field).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from aiohttp import web

from relay.admin.webhooks import (
    MAX_ADDRESS,
    BodyTooLargeError,
    Intake,
    ProviderEvent,
    Tally,
    Unconfigured,
    answer,
    plausible_address,
    read_body,
)
from relay.decisions.months import Clock
from relay.decisions.suppression import SuppressionReason
from relay.observe.metrics import RelayMetrics

PROVIDER = "command"
PATH = "/webhooks/command"
SIGNATURE_HEADER = "X-Relay-Signature"
TOLERANCE = 300  # seconds either side of the relay's clock
MAX_BODY = 1024 * 1024
MAX_EVENTS = 1000
TYPES = {
    "bounce": SuppressionReason.BOUNCE,
    "reject": SuppressionReason.BOUNCE,
    "complaint": SuppressionReason.COMPLAINT,
    "unsubscribe": SuppressionReason.UNSUBSCRIBE,
}


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``v1`` of a delivery of ``body`` signed at ``timestamp``: hex HMAC-SHA256."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """The whole ``X-Relay-Signature`` value a sender puts on ``body``."""
    return f"t={timestamp},v1={sign(secret, timestamp, body)}"


def parse_header(value: str) -> tuple[int, list[str]] | None:
    """(t, the v1 values), or None when the header lacks either."""
    timestamp: int | None = None
    macs: list[str] = []
    for item in value.split(","):
        name, eq, text = item.strip().partition("=")
        if not eq:
            continue
        if name == "t" and text.isascii() and text.isdigit() and len(text) <= 12:
            timestamp = int(text)
        elif name == "v1":
            macs.append(text)
    return (timestamp, macs) if timestamp is not None and macs else None


class BadEventError(ValueError):
    """A delivery that does not follow the format; the message names the field."""


def _text(event: dict[str, Any], name: str, where: str, longest: int,
          required: bool = True) -> str | None:
    value = event.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= longest:
        raise BadEventError(f"{where}.{name} must be a string of 1 to {longest} characters")
    return value


def _address(event: dict[str, Any], name: str, where: str, required: bool) -> str | None:
    value = _text(event, name, where, MAX_ADDRESS, required)
    if value is not None and plausible_address(value) is None:
        raise BadEventError(f"{where}.{name} must be an email address")
    return value


def parse_events(body: bytes) -> tuple[list[ProviderEvent], int]:
    """The entries a delivery makes and how many of its events were of other types. Raises
    BadEventError."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadEventError("the body must be a JSON object") from None
    events = document.get("events") if isinstance(document, dict) else None
    if not isinstance(events, list) or len(events) > MAX_EVENTS:
        raise BadEventError(f"'events' must be an array of at most {MAX_EVENTS} events")
    parsed: list[ProviderEvent] = []
    ignored = 0
    for index, event in enumerate(events):
        where = f"events[{index}]"
        if not isinstance(event, dict):
            raise BadEventError(f"{where} must be an object")
        event_id = _text(event, "id", where, 128)
        kind = _text(event, "type", where, 32)
        recipient = _address(event, "recipient", where, required=True)
        user_id = _text(event, "user_id", where, 64, required=False)
        sender = _address(event, "sender", where, required=False)
        at = event.get("timestamp")
        if not isinstance(at, int) or isinstance(at, bool) or at < 0:
            raise BadEventError(f"{where}.timestamp must be Unix seconds (an integer)")
        reason = TYPES.get(kind or "")
        if reason is None:
            ignored += 1  # a type this relay does not know yet: not an error
            continue
        if reason is SuppressionReason.UNSUBSCRIBE and not (user_id or sender):
            raise BadEventError(f"{where}: an unsubscribe needs user_id or sender")
        assert event_id is not None and recipient is not None
        parsed.append(ProviderEvent(identity=event_id, reason=reason, recipient=recipient,
                                    user_id=user_id, sender=sender, at=at))
    return parsed, ignored


class CommandWebhook:
    """The ``command`` route group: POST ``/webhooks/command``."""

    name = "command-webhook"

    def __init__(self, secret: str | None, intake: Intake, metrics: RelayMetrics,
                 clock: Clock) -> None:
        self._secret = secret
        self._intake = intake
        self._metrics = metrics
        self._clock = clock
        self._unconfigured = Unconfigured(PROVIDER, "RELAY_COMMAND_WEBHOOK_SECRET")

    def routes(self) -> list[web.RouteDef]:
        return [web.post(PATH, self.deliver)]

    def _refuse(self, outcome: str, status: int, error: str,
                request: web.Request) -> web.Response:
        return answer(self._metrics, PROVIDER, outcome, status, {"error": error},
                      peer=request.remote)

    async def deliver(self, request: web.Request) -> web.Response:
        if self._secret is None:
            return self._unconfigured(self._metrics, request)
        try:
            body = await read_body(request, MAX_BODY)
        except BodyTooLargeError:
            return self._refuse("too_large", 413, "the body is too large", request)
        header = parse_header(request.headers.get(SIGNATURE_HEADER, ""))
        if header is None:
            return self._refuse("forged", 401, f"missing or malformed {SIGNATURE_HEADER}",
                                request)
        timestamp, macs = header
        expected = sign(self._secret, timestamp, body).encode()
        if not any(hmac.compare_digest(expected, mac.encode("utf-8", "surrogateescape"))
                   for mac in macs):
            return self._refuse("forged", 401, "bad signature", request)
        # Checked once the signature holds: the time cannot have been altered.
        if abs(self._clock.now().timestamp() - timestamp) > TOLERANCE:
            return self._refuse("stale", 401, f"timestamp more than {TOLERANCE} s from the "
                                              f"relay's clock", request)
        try:
            parsed, ignored = parse_events(body)
        except BadEventError as exc:
            return self._refuse("malformed", 400, str(exc), request)
        tally = Tally(received=len(parsed) + ignored, ignored=ignored)
        return await self._intake.answer(PROVIDER, parsed, tally, request)
