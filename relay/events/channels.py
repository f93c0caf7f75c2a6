"""Where notifications go: the CRM's in-app endpoint (a signed webhook) and the user's inbox.

Each channel's ``deliver`` either returns (delivered) or raises ``DeliveryError``, marked
permanent when retrying cannot help (a 4xx from the CRM, a 5xx from the mail upstream).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from typing import Protocol

import aiohttp

from relay.delivery.upstream import Upstream
from relay.errors import RelayError
from relay.events.stream import REACHED, THRESHOLD, Event
from relay.message.wire import Outgoing, stuff

SIGNATURE_HEADER = "X-Relay-Signature"
TIMESTAMP_HEADER = "X-Relay-Timestamp"
# 408 Request Timeout, 425 Too Early and 429 Too Many Requests are worth another try.
_RETRYABLE_4XX = {408, 425, 429}


class DeliveryError(Exception):
    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent


class Channel(Protocol):
    name: str

    async def deliver(self, event: Event) -> None:
        """Deliver ``event`` once. Raises DeliveryError."""


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256 over ``<timestamp>.<body>``: the receiver recomputes
    it, compares in constant time, and rejects stale timestamps (replay protection)."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class WebhookChannel:
    """POSTs each event as JSON, signed, with the event id as the idempotency key."""

    def __init__(self, url: str, secret: str, *, timeout: float,
                 session: aiohttp.ClientSession, name: str = "in_app") -> None:
        self.name = name
        self._url = url
        self._secret = secret.encode()
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session

    async def deliver(self, event: Event) -> None:
        body = event.to_json().encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": event.id,
            "X-Relay-Event": event.kind,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
        }
        try:
            async with self._session.post(self._url, data=body, headers=headers,
                                          timeout=self._timeout) as response:
                if 200 <= response.status < 300:
                    return
                permanent = 400 <= response.status < 500 and \
                    response.status not in _RETRYABLE_4XX
                raise DeliveryError(f"HTTP {response.status}", permanent=permanent)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}"[:300], permanent=False) from exc


def _month_day(iso: str) -> str:
    moment = datetime.fromisoformat(iso)
    return f"{moment:%B} {moment.day}"


def notice_text(event: Event) -> tuple[str, str] | None:
    """(subject, body) of the email notice for ``event``, or None for kinds not emailed."""
    d = event.data
    used, limit = int(d.get("used", 0)), int(d.get("limit", 0))
    reset = _month_day(str(d["resets_at"])) if d.get("resets_at") else "the 1st of next month"
    if event.kind == THRESHOLD:
        # The forecast (relay/decisions/forecast.py) when the event carries one.
        ahead = d.get("forecast") or {}
        pace = f"\n\n{ahead['text']}" if isinstance(ahead, dict) and ahead.get("text") else ""
        return (f"You have used {d.get('percent')}% of your Command Email sends this month",
                f"You have used {used:,} of {limit:,} Command Email sends this month; "
                f"they reset on {reset}.{pace}\n\nIf you need more this month, you can "
                "upgrade your Command Email subscription from Settings > Connected "
                "Applications.\n")
    if event.kind == REACHED:
        return ("You have reached your Command Email limit for this month",
                f"You have used all {limit:,} of your Command Email sends this month; they "
                f"reset on {reset}.\n\nEmails beyond the limit, SmartPlan emails included, are "
                "not sent until then. Upgrading your Command Email subscription raises the "
                "limit at once.\n")
    return None  # REJECTED and PLAN_CHANGED reach the user in the app, not by email


class EmailChannel:
    """Sends a short notice through the relay's upstream. The notice never goes through the
    quota path, so it is not counted against the user's sends."""

    name = "email"

    def __init__(self, upstream: Upstream, *, sender: str, hostname: str) -> None:
        self._upstream = upstream
        self._from = sender
        self._envelope_from = parseaddr(sender)[1]
        self._hostname = hostname

    def compose(self, event: Event) -> EmailMessage | None:
        text = notice_text(event)
        recipient = str(event.data.get("email") or "")
        if text is None or not recipient:
            return None
        message = EmailMessage()
        message["From"] = self._from
        message["To"] = recipient
        message["Subject"] = text[0]
        message["Date"] = format_datetime(datetime.now().astimezone())
        # One Message-ID per event, so a retried notice is recognisably the same message.
        message["Message-ID"] = make_msgid(idstring=event.id, domain=self._hostname)
        message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies
        message.set_content(text[1])
        return message

    async def deliver(self, event: Event) -> None:
        message = self.compose(event)
        if message is None:
            return
        try:
            session = await self._upstream.begin(self._envelope_from, [], smtputf8=False)
            try:
                await session.rcpt(str(message["To"]), [])
                content = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
                await session.data(Outgoing((stuff(content),)))
            finally:
                await session.release(reusable=True)
        except RelayError as exc:
            raise DeliveryError(exc.reply, permanent=exc.permanent) from exc
