"""One-click unsubscribe (RFC 8058) on the public listener:
docs/suppression.md#one-click-unsubscribe-endpoint.

``POST /unsubscribe/{token}`` with the body ``List-Unsubscribe=One-Click`` (form-encoded or
multipart, RFC 8058 §3.2) records the recipient's opt-out from that user at once (a
user-scoped entry, reason unsubscribe, source ``one-click``) and answers 200; a second POST
finds the entry and answers 200 again, keeping the first one's time. The token is a signed
link (relay/identity/signed_links.py, purpose ``unsubscribe``, payload ``{"u": user id, "r":
recipient}``); a bad, altered or expired one is answered 404 with nothing said of why.

``GET`` never unsubscribes: mail scanners and link previews fetch every URL of a message
(RFC 8058 §1). It shows a page whose one button sends the same POST.
"""

from __future__ import annotations

import html
from typing import Any

import structlog
from aiohttp import web

from relay.admin.webhooks import plausible_address, recipient_domain
from relay.decisions.suppression import SuppressionReason, SuppressionStore
from relay.identity.signed_links import LinkSigner, SignedLinkError
from relay.observe.metrics import RelayMetrics

log = structlog.get_logger()

PURPOSE = "unsubscribe"
SOURCE = "one-click"
PATH = "/unsubscribe/{token}"
# RFC 8058 §3.1: the one key/value pair of List-Unsubscribe-Post, sent back as the body.
FIELD, VALUE = "List-Unsubscribe", "One-Click"

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem}}
button{{font-size:1rem;padding:.5rem 1.5rem}}</style></head>
<body><main><h1>{title}</h1>
{content}
</main></body></html>
"""


def page(title: str, content: str, status: int = 200) -> web.Response:
    return web.Response(status=status, content_type="text/html", charset="utf-8",
                        text=_PAGE.format(title=html.escape(title), content=content))


def not_valid() -> web.Response:
    # The same page whatever was wrong with the token: nothing to learn from it.
    return page("Link not valid", "<p>This unsubscribe link is not valid.</p>", 404)


class UnsubscribeRoutes:
    """The ``unsubscribe`` route group."""

    name = "unsubscribe"

    def __init__(self, signer: LinkSigner, store: SuppressionStore,
                 metrics: RelayMetrics) -> None:
        self._signer = signer
        self._store = store
        self._metrics = metrics

    def routes(self) -> list[web.RouteDef]:
        return [web.get(PATH, self.show), web.post(PATH, self.unsubscribe)]

    def _open(self, request: web.Request) -> tuple[str, str] | None:
        """(user id, recipient) of the request's token, or None."""
        try:
            payload: dict[str, Any] = self._signer.verify(PURPOSE,
                                                          request.match_info["token"])
        except SignedLinkError as exc:
            log.info("unsubscribe.refused", method=request.method, reason=exc.reason)
            return None
        user_id, recipient = payload.get("u"), payload.get("r")
        if not isinstance(user_id, str) or not user_id or \
                plausible_address(recipient) is None:
            # Signed by this relay, yet not what an unsubscribe link holds: a bug elsewhere.
            log.warning("unsubscribe.refused", method=request.method, reason="bad_payload")
            return None
        assert isinstance(recipient, str)
        return user_id, recipient

    async def show(self, request: web.Request) -> web.Response:
        """The confirmation page; changes nothing."""
        opened = self._open(request)
        if opened is None:
            return not_valid()
        _, recipient = opened
        # No action attribute: the form posts back to this very URL, token included.
        return page("Unsubscribe", (
            f"<p>Stop receiving these emails at <strong>{html.escape(recipient)}</strong>?</p>"
            f'<form method="post"><input type="hidden" name="{FIELD}" value="{VALUE}">'
            f'<button type="submit">Unsubscribe</button></form>'))

    async def unsubscribe(self, request: web.Request) -> web.Response:
        opened = self._open(request)
        if opened is None:
            self._metrics.unsubscribes("invalid").inc()
            return not_valid()
        user_id, recipient = opened
        try:
            form = await request.post()
        except ValueError:  # a multipart body that does not parse
            form = None
        if form is None or form.get(FIELD) != VALUE:
            self._metrics.unsubscribes("malformed").inc()
            log.info("unsubscribe.refused", method="POST", reason="no_one_click_body",
                     user_id=user_id)
            return page("Not unsubscribed",
                        f"<p>The request did not say {FIELD}={VALUE}.</p>", 400)
        # Kept as it is when the address is already on this user's list: the first opt-out's
        # time is the one that matters (CAN-SPAM), and a manual entry keeps its reason.
        existing = await self._store.get(recipient, user_id=user_id)
        if existing is None:
            await self._store.add(recipient, user_id=user_id,
                                  reason=SuppressionReason.UNSUBSCRIBE, source=SOURCE)
            self._metrics.suppressions_created(SuppressionReason.UNSUBSCRIBE.value,
                                               SOURCE).inc()
        self._metrics.unsubscribes("already" if existing else "recorded").inc()
        log.info("unsubscribe.recorded", user_id=user_id,
                 recipient_domain=recipient_domain(recipient), created=existing is None)
        return page("Unsubscribed", "<p>You are unsubscribed: no more of these emails will "
                                    "be sent to this address.</p>")
