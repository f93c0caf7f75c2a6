"""One-click unsubscribe (RFC 8058) on an app's messages, as its policy says (``unsubscribe``
under ``[apps.NAME]`` in ``routing.toml``): the hooks the Transaction calls at RCPT and at
the end of DATA (STYLE §1 step 6, before anything is reserved or opened for a message
decided at the end of DATA).

* ``checks``: a message lacking a header is sent, logged (``unsubscribe.missing``) and
  counted (``relay_unsubscribe_missing_total``);
* ``refuses``: it is refused (``UnsubscribeHeadersMissingError``, 550 5.6.0 naming the
  header); the transaction gives its units back and sends nothing;
* ``adds``: the relay adds both headers, the URL signed for the message's one recipient
  (``relay.identity.signed_links``, purpose ``unsubscribe``), which is why such a
  transaction takes one recipient (``OneRecipientPerMessageError``, 452 4.5.3 on the second
  RCPT). A message with its own List-Unsubscribe keeps it, and gets no Post header from the
  relay: the POST would go to the sender's URL, which the relay cannot know accepts a
  one-click POST (RFC 8058 §3.2 asks that it unsubscribe at once, without a page), and a
  wrong claim would lose the opt-out. Headers that an existing DKIM signature covers as
  absent are never added (that would break it); the message goes as it is, logged and
  counted, like under ``checks`` (``refuses`` is the policy for a hard stop).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import structlog

from relay.config.routing import UnsubscribePolicy
from relay.errors import OneRecipientPerMessageError, UnsubscribeHeadersMissingError
from relay.identity.accounts import normalize_address
from relay.identity.signed_links import LinkSigner
from relay.message.unsubscribe import (
    LIST_UNSUBSCRIBE,
    LIST_UNSUBSCRIBE_POST,
    one_click_fields,
    read_unsubscribe_headers,
)
from relay.message.wire import WireMessage
from relay.observe.metrics import RelayMetrics

PURPOSE = "unsubscribe"
DEFAULT_PUBLIC_URL = "http://127.0.0.1:8026"


class UnsubscribeLinks:
    """The per-recipient one-click URL: ``<public_url>/unsubscribe/<token>``, the token
    signed (purpose ``unsubscribe``, payload ``{"u": user id, "r": normalised recipient}``,
    no expiry: the link must work for as long as the mail is read). The link secret is read
    on first use (in development it is a file of the state folder)."""

    def __init__(self, public_url: str, secret: Callable[[], bytes]) -> None:
        self.public_url = public_url.rstrip("/")
        self._secret = secret
        self._signer: LinkSigner | None = None

    def url(self, user_id: str, recipient: str) -> str:
        if self._signer is None:
            self._signer = LinkSigner(self._secret())
        token = self._signer.sign(PURPOSE, {"u": user_id, "r": normalize_address(recipient)})
        return f"{self.public_url}/unsubscribe/{token}"


def detached_links() -> UnsubscribeLinks:
    """Links under a random secret, for transactions built outside a ``RelayApp`` (tests)."""
    secret = secrets.token_bytes(32)
    return UnsubscribeLinks(DEFAULT_PUBLIC_URL, lambda: secret)


def check_recipient(policy: UnsubscribePolicy, accepted: int) -> None:
    """Raises OneRecipientPerMessageError for a second recipient under ``adds``: the URL
    the relay adds names one recipient. RFC 5321 §4.5.3.1.10: a client that gets 452 sends
    the recipients left in another transaction."""
    if policy is UnsubscribePolicy.ADDS and accepted >= 1:
        raise OneRecipientPerMessageError()


def unsubscribe_fields(policy: UnsubscribePolicy, message: WireMessage, *, user_id: str,
                       recipients: list[str], links: UnsubscribeLinks, metrics: RelayMetrics,
                       log: structlog.typing.FilteringBoundLogger) -> bytes:
    """The header lines to put on top of ``message`` (``b""`` for none), as ``policy``
    says; raises UnsubscribeHeadersMissingError under ``refuses``."""
    if policy is UnsubscribePolicy.OFF:
        return b""
    found = read_unsubscribe_headers(message.header_content())
    if policy is UnsubscribePolicy.ADDS:
        if found.list_unsubscribe is not None:
            metrics.unsubscribe_added("kept").inc()
        else:
            adding = (LIST_UNSUBSCRIBE,) if found.post is not None \
                else (LIST_UNSUBSCRIBE, LIST_UNSUBSCRIBE_POST)
            covered = found.signed_as_absent(adding)
            if not covered:
                fields = one_click_fields(links.url(user_id, recipients[0]),
                                          post=found.post is None)
                metrics.unsubscribe_added("added").inc()
                log.debug("unsubscribe.added", headers=list(adding))
                if not found.is_one_click and found.post is not None:
                    # The sender's own Post header, not one-click: a second one would be
                    # ambiguous, so it stays, reported.
                    _report(policy, (LIST_UNSUBSCRIBE_POST,), metrics, log)
                return fields
            metrics.unsubscribe_added("dkim_signed").inc()
            log.warning("unsubscribe.not_added", reason="dkim_signed", headers=list(covered),
                        note="a DKIM-Signature lists them in h= (signed as absent): adding "
                             "them would break it")
    missing = found.missing
    if missing:
        _report(policy, missing, metrics, log)
    return b""


def _report(policy: UnsubscribePolicy, missing: tuple[str, ...], metrics: RelayMetrics,
            log: structlog.typing.FilteringBoundLogger) -> None:
    """Count and log a message lacking ``missing``; under ``refuses``, refuse it."""
    for header in missing:
        metrics.unsubscribe_missing(policy.value, header).inc()
    if policy is UnsubscribePolicy.REFUSES:
        refusal = UnsubscribeHeadersMissingError(missing)
        refusal.log_refusal(log, "unsubscribe.missing", policy=policy.value,
                            headers=list(missing), action="refused")
        raise refusal
    log.info("unsubscribe.missing", policy=policy.value, headers=list(missing), action="sent")
