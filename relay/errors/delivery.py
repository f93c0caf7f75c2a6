"""Refusals of the delivery stage: the upstream's own answers, an upstream that cannot be
used now (unreachable, busy, not configured, its credentials missing or unreadable), and
what the upstream client cannot send."""

from __future__ import annotations

import re

from relay.errors.base import PermanentError, RelayError, TemporaryError


class UpstreamTemporaryError(TemporaryError):
    code = 451
    status = "4.4.0"
    text = "Upstream temporarily refused, try again later"


class UpstreamUnavailableError(UpstreamTemporaryError):
    code = 451
    status = "4.4.1"
    text = "Upstream unreachable, try again later"

    @classmethod
    def lacking_extension(cls) -> UpstreamUnavailableError:
        """The upstream lacks an extension the relay needs (aiosmtplib's SMTPNotSupported)."""
        return cls("Upstream lacks a required extension, try again later")


class UpstreamBusyError(UpstreamTemporaryError):
    """Every connection of the upstream pool stayed busy for the whole wait (the upstream
    timeout). The upstream is reachable: the relay is congested, RFC 3463 X.4.5 (mail system
    congestion), not X.4.1 (no answer from host). Not an UpstreamUnavailableError on purpose:
    a route's failover is for an upstream that cannot be reached."""

    code = 451
    status = "4.4.5"
    text = "Upstream connections all busy, try again later"


class UpstreamOutcomeUnknownError(UpstreamTemporaryError):
    """The connection failed after the message was sent and before the reply: the upstream may
    have accepted it. The client is told to retry; the units stay counted (high, never low)."""

    status = "4.4.2"
    text = "Upstream connection lost after the message was sent, try again later"


class ResubmissionInProgressError(TemporaryError):
    """The same message (user and Message-ID) is being sent to one of these recipients by
    another transaction right now, perhaps on another relay (docs/resubmission.md): nothing
    is sent or counted; the app retries, and then hears 250 (the other send got through) or
    the message is sent (it did not)."""

    code = 451
    status = "4.3.0"
    text = "This message is being sent right now by another transaction, try again later"


class RouteNotConfiguredError(UpstreamUnavailableError):
    # The route's upstream is a setting (RELAY_ROUTE_<NAME>_URL) that is not set: an
    # operator's fix, so the app keeps the mail and retries (RFC 3463 X.3.5: system
    # incorrectly configured).
    status = "4.3.5"
    text = "This route's upstream is not configured, try again later"


class CredentialsUnreadableError(TemporaryError):
    # The stored secret does not decrypt under the configured key (a key mix-up between
    # relays): an operator problem, so the app keeps the mail and retries.
    code = 451
    status = "4.7.0"
    text = "Stored route credentials cannot be read, try again later"


class MissingRouteCredentialsError(PermanentError):
    # 5.7.x, naming the fix: never silently sent through another (counted) route instead.
    code = 550
    status = "5.7.1"
    text = "No credentials for this route"

    @classmethod
    def for_route(cls, route: str) -> MissingRouteCredentialsError:
        return cls(f"No {route} credentials saved for this user; add them with "
                   f"`command-relay route credentials USER {route}` or choose another route")


class UpstreamPermanentError(PermanentError):
    code = 554
    status = "5.0.0"
    text = "Upstream refused"


class BadAddressError(PermanentError):
    # aiosmtplib refuses to send it (control characters, an encoding it cannot express).
    code = 553
    status = "5.1.3"
    text = "Address contains characters that cannot be forwarded"


class SmtpUtf8UnsupportedError(PermanentError):
    # RFC 6531 §3.4: a non-ASCII envelope cannot go to a server without SMTPUTF8.
    code = 553
    status = "5.6.7"
    text = "Upstream does not accept internationalized (SMTPUTF8) addresses"


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s+")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")


def _upstream_text(message: str) -> tuple[str | None, str]:
    """Split an upstream reply text into (enhanced status, rest), cleaned for re-sending."""
    one_line = _UNSAFE.sub(" ", message).strip()[:400]
    match = _ENHANCED.match(one_line)
    if match:
        return match.group(0).strip(), one_line[match.end():]
    return None, one_line


def upstream_reply_error(code: int, message: str) -> RelayError:
    """The error for an upstream reply code that was not success: its class decides
    (4xx UpstreamTemporaryError, 5xx UpstreamPermanentError), the code is kept, and so is the
    upstream's enhanced status when it is of the same class (else the class's default)."""
    kind: type[UpstreamTemporaryError | UpstreamPermanentError]
    if 400 <= code < 500:
        kind = UpstreamTemporaryError
    elif 500 <= code < 600:
        kind = UpstreamPermanentError
    else:
        # A reply outside 4xx/5xx where success was expected is a protocol error upstream:
        # keep the mail (temporary) rather than guess.
        return UpstreamTemporaryError(f"Upstream protocol error (reply {code})")
    enhanced, rest = _upstream_text(message)
    return kind(f"Upstream: {rest}" if rest else None, code=code,
                status=enhanced if enhanced and enhanced[0] == kind.status[0] else kind.status)
