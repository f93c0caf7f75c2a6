"""Forwarding to the upstream provider in step with the client (STYLE §1 step 6).

The relay keeps no queue: the upstream transaction is opened at MAIL FROM, each RCPT and the
DATA are mirrored in step, and the client hears 250 only for what the upstream answered 250
to. Connections come from a bounded pool of persistent aiosmtplib clients (STARTTLS and
AUTH once per connection, RSET between messages, reconnect on failure, idle expiry).

aiosmtplib's errors are translated here and nowhere else (``translate_error``).
"""

from __future__ import annotations

import ssl
from typing import Protocol

import aiosmtplib
import structlog

from relay.errors import (
    BadAddressError,
    RelayError,
    UpstreamTemporaryError,
    UpstreamUnavailableError,
    upstream_reply_error,
)
from relay.message.wire import Outgoing

log = structlog.get_logger()
_REPLY_CLASSES = {2: "2xx", 4: "4xx", 5: "5xx"}


def translate_error(exc: BaseException) -> RelayError:
    """Map an aiosmtplib (or socket) error to the relay error the client is answered with.

    A reply to the message (MAIL, RCPT, DATA) keeps its class (4xx temporary, 5xx permanent);
    anything else (connect, greeting, EHLO, login, disconnect, timeout, TLS) is temporary.
    """
    if isinstance(exc, RelayError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError | aiosmtplib.SMTPHeloError
                  | aiosmtplib.SMTPAuthenticationError):
        # Greeting, EHLO or login refused: the relay's own link to the upstream is broken
        # (e.g. a wrong upstream password), not this message. Temporary, so the client keeps
        # the mail; a 5xx here would bounce every message.
        return UpstreamUnavailableError()
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return upstream_reply_error(exc.code, exc.message)
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        # Only raised by sendmail(), which the relay does not use; one refusal speaks for all.
        first = exc.recipients[0] if exc.recipients else None
        return translate_error(first) if first else UpstreamTemporaryError()
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return UpstreamUnavailableError.lacking_extension()
    if isinstance(exc, aiosmtplib.SMTPException | OSError | ssl.SSLError | TimeoutError):
        return UpstreamUnavailableError()
    if isinstance(exc, UnicodeEncodeError | ValueError):
        # aiosmtplib refuses control characters in commands (CR/LF injection, 5.1.3 fix).
        return BadAddressError()
    raise TypeError(f"unmapped upstream error {type(exc).__name__}") from exc


def reply_class(exc: BaseException) -> str | None:
    """The class of an upstream failure for ``relay_upstream_replies_total``: the reply's
    class (4xx, 5xx), ``error`` when no reply came (connect, TLS, timeout, lost connection),
    None for the relay's own refusals (already counted where they happened, or never sent)."""
    if isinstance(exc, RelayError):
        return None
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _REPLY_CLASSES.get(exc.code // 100, "error")
    return "error"


class UpstreamSession(Protocol):
    """One upstream transaction, begun by ``Upstream.begin`` (MAIL FROM already accepted)."""

    async def rcpt(self, address: str, options: list[str]) -> None:
        """Raises RelayError when the upstream refuses or fails."""

    async def data(self, message: Outgoing) -> str:
        """Send the message; returns the upstream's queue id or reply text. Raises RelayError;
        ``UpstreamOutcomeUnknownError`` when the message may have been accepted."""

    async def release(self, *, reusable: bool) -> None:
        """Hand the connection back (RSET first when reusable and the transaction did not end
        with an accepted DATA) or close it. Never raises."""


class Upstream(Protocol):
    name: str

    async def begin(self, sender: str, options: list[str], *, smtputf8: bool) -> UpstreamSession:
        """Open a transaction upstream. Raises RelayError."""

    def reachable(self) -> bool | None:
        """Whether the upstream can take mail, as last seen (None: not known yet); for
        /readyz. Never waits on the network."""

    async def close(self) -> None: ...

