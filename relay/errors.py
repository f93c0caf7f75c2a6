"""Every SMTP reply the relay gives, and the exception tree that carries the refusals.

Services raise these; only ``relay/smtp/hooks.py`` turns them into replies (STYLE §4). No other
module writes a reply string.

    RelayError                          .code, .status, .text -> .reply
    ├── TemporaryError                  4xx: the client keeps the mail and retries
    │   ├── StoreUnavailableError       451 4.3.0  Redis unreachable or slow (fail closed)
    │   ├── AuthUnavailableError        454 4.7.0  credentials could not be checked now
    │   ├── PlanMisconfiguredError      451 4.3.5  the user's plan is not in plans.toml
    │   ├── TooManyRecipientsError      452 4.5.3  more recipients than one message may carry
    │   ├── TooManyConnectionsError     421 4.7.0  over max_connections(_per_ip); then closed
    │   ├── UntrustedPeerError          421 4.7.0  PROXY protocol on, peer not a trusted proxy
    │   ├── AuthThrottledError          454 4.7.0  too many AUTH failures (address or login)
    │   ├── SessionTimeoutError         421 4.4.2  idle or transaction timeout; then closed
    │   ├── UpstreamTemporaryError      4xx        the upstream said 4xx, or could not be reached
    │   │   ├── UpstreamUnavailableError 451 4.4.1 connection, TLS or login to the upstream failed
    │   │   └── UpstreamBusyError       451 4.4.5  every pooled upstream connection stayed busy
    │   ├── InternalError               451 4.3.0  a bug: logged with its traceback, never shown
    │   └── ShuttingDownError           421 4.3.2  the relay is draining (SIGTERM): goodbye
    ├── PermanentError                  5xx: the client must not retry as is
    │   ├── AuthRequiredError           530 5.7.0  MAIL before a successful AUTH
    │   ├── SenderNotAllowedError       553 5.7.1  MAIL FROM not owned by this login
    │   ├── UnknownSenderError          550 5.7.1  MAIL FROM belongs to no Command Email user
    │   ├── UserDisabledError           550 5.7.1  the sending user is disabled
    │   ├── CommandSyntaxError          5xx 5.5.2  a command line the relay will not parse
    │   │   ├── InvalidUtf8Error        500 5.5.2  bytes that are not UTF-8
    │   │   └── ControlCharacterError   501 5.5.2  a C0 control or DEL in a command
    │   ├── AddressSyntaxError          501 5.1.7 / 5.1.3  a sender or recipient not taken as is
    │   ├── SmtpUtf8RequiredError       553 5.6.7  non-ASCII address without SMTPUTF8
    │   ├── TlsAlreadyActiveError       503 5.5.1  STARTTLS inside TLS
    │   ├── BadAddressError             553 5.1.3  the upstream client would not send it
    │   ├── SmtpUtf8UnsupportedError    553 5.6.7  non-ASCII envelope, upstream lacks SMTPUTF8
    │   └── UpstreamPermanentError      5xx        the upstream said 5xx
    └── QuotaExceededError              code from policies/plans.toml [over_limit] (550 5.7.1)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# -- Positive and protocol replies (RFC 5321 §4.2, RFC 3463 enhanced codes) -----------------
AUTH_SUCCESS = "235 2.7.0 Authentication successful"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure, try again later"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode base64 response"
AUTH_BAD_PLAIN = "501 5.5.2 Malformed AUTH PLAIN response"
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
# The end of a DATA refused by the reader (relay.smtpdata); aiosmtpd's own codes, with the
# enhanced status codes it leaves out (RFC 3463: 5.3.4 too big, 5.5.6 syntax of content).
DATA_TOO_MUCH = "552 5.3.4 Message too big for system"
LINE_TOO_LONG = "500 5.5.6 Line too long (see RFC 5321 4.5.3.1.6)"


def message_accepted(queue_id: str) -> str:
    """The reply to DATA once the upstream has accepted the message."""
    return f"250 2.0.0 Message accepted for delivery as {queue_id}"


class RelayError(Exception):
    """A refusal with its SMTP reply. Subclasses set the defaults; instances may refine text."""

    code: int = 451
    status: str = "4.3.0"
    text: str = "Temporary local problem, try again later"

    def __init__(self, text: str | None = None, *, code: int | None = None,
                 status: str | None = None) -> None:
        if text is not None:
            self.text = text
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        super().__init__(self.reply)

    @property
    def reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    @property
    def permanent(self) -> bool:
        return self.code >= 500


class TemporaryError(RelayError):
    """4xx: RFC 5321 §4.2.5, the client keeps the message and tries again later."""


class PermanentError(RelayError):
    """5xx: the client must not retry the same transaction unchanged."""

    code = 550
    status = "5.0.0"
    text = "Rejected"


class StoreUnavailableError(TemporaryError):
    code = 451
    status = "4.3.0"
    text = "Quota store unavailable, try again later"


class AuthUnavailableError(TemporaryError):
    code = 454
    status = "4.7.0"
    text = "Temporary authentication failure, try again later"


class PlanMisconfiguredError(TemporaryError):
    code = 451
    status = "4.3.5"
    text = "Sending plan not configured for this user, try again later"


class TooManyRecipientsError(TemporaryError):
    # RFC 5321 §4.5.3.1.10: 452 tells the client to send the rest in another transaction.
    code = 452
    status = "4.5.3"
    text = "Too many recipients for one message"


class TooManyConnectionsError(TemporaryError):
    """The connection would exceed a connection limit (``scope``: "ip" or "total").

    RFC 5321 §3.1: a server that cannot serve a connection answers 421 and closes it; the
    client retries later, which is what a burst over the limit should do."""

    code = 421
    status = "4.7.0"
    text = "Too many connections, try again later"

    def __init__(self, scope: str = "total", limit: int = 0) -> None:
        self.scope = scope
        self.limit = limit
        super().__init__("Too many connections from your address, try again later"
                         if scope == "ip" else None)


class UntrustedPeerError(TemporaryError):
    """PROXY protocol is on and the peer is not a trusted load balancer.

    Temporary on purpose: a wrong trusted-proxy list must make clients retry, not bounce."""

    code = 421
    status = "4.7.0"
    text = "Connection not accepted from this address"


class AuthThrottledError(TemporaryError):
    """Too many failed AUTH attempts from the client's address or for the login, within the
    window (``scope``: "ip" or "login"). RFC 4954 §6: 454 is a temporary AUTH failure."""

    code = 454
    status = "4.7.0"
    text = "Too many failed authentication attempts, try again later"

    def __init__(self, scope: str = "ip", failures: int = 0) -> None:
        self.scope = scope
        self.failures = failures
        super().__init__()


class SessionTimeoutError(TemporaryError):
    """The client was silent too long, or a transaction (MAIL to the end of DATA) took too
    long. RFC 5321 §4.5.3.2: the server may close on timeout; 421 tells the client why."""

    code = 421
    status = "4.4.2"
    text = "Timeout, closing connection"


class InternalError(TemporaryError):
    code = 451
    status = "4.3.0"
    text = "Internal error, try again later"


class ShuttingDownError(TemporaryError):
    # RFC 5321 §3.8: a server shutting down answers 421 and closes the connection; RFC 3463
    # 4.3.2: system not accepting network messages.
    code = 421
    status = "4.3.2"
    text = "Service shutting down"


class AuthRequiredError(PermanentError):
    # RFC 4954 §6: 530 5.7.0 when a command needs authentication first.
    code = 530
    status = "5.7.0"
    text = "Authentication required"


class SenderNotAllowedError(PermanentError):
    code = 553
    status = "5.7.1"
    text = "Sender address not allowed for this login"


class UnknownSenderError(PermanentError):
    code = 550
    status = "5.7.1"
    text = "Sender address does not belong to any Command Email user"


class UserDisabledError(PermanentError):
    code = 550
    status = "5.7.1"
    text = "Command Email is disabled for this user"


class CommandSyntaxError(PermanentError):
    """A command line the relay refuses to interpret: the same bytes will never work, so a
    5xx (a 4xx would tell the client to retry a permanently bad command)."""

    code = 501
    status = "5.5.2"
    text = "Syntax error in command"

    def __init__(self, command: str = "") -> None:
        self.command = command  # the verb (MAIL, RCPT, EHLO...), for the log line
        super().__init__()


class InvalidUtf8Error(CommandSyntaxError):
    # RFC 6531 §3.3: SMTPUTF8 text is UTF-8; other 8-bit bytes are a syntax error.
    code = 500
    text = "Syntax error: command is not valid UTF-8"


class ControlCharacterError(CommandSyntaxError):
    # RFC 5321 §4.1.2: no control character belongs in a command; a CR inside a line (the
    # smuggling trick) would otherwise be dropped or kept by parsers that disagree.
    text = "Syntax error: control characters are not allowed in commands"


class AddressSyntaxError(PermanentError):
    """A MAIL FROM or RCPT TO path that aiosmtpd's parser would change (comments, source
    routes, blanks inside <...>) or cannot parse: the relay only acknowledges an address it
    forwards byte for byte."""

    code = 501
    status = "5.1.3"
    text = "Bad recipient address syntax"

    def __init__(self, role: str = "recipient") -> None:
        self.role = role  # "sender" or "recipient"
        if role == "sender":  # RFC 3463: X.1.7 bad sender's mailbox address syntax
            super().__init__("Bad sender address syntax", status="5.1.7")
        else:
            super().__init__()


class SmtpUtf8RequiredError(PermanentError):
    # RFC 6531 §3.4: a non-ASCII address needs the SMTPUTF8 parameter on MAIL FROM.
    code = 553
    status = "5.6.7"
    text = "Non-ASCII address needs the SMTPUTF8 parameter on MAIL FROM"


class TlsAlreadyActiveError(PermanentError):
    # RFC 3207 §4: STARTTLS inside a TLS session is a bad sequence of commands. aiosmtpd
    # would start a second handshake inside the first.
    code = 503
    status = "5.5.1"
    text = "TLS already active"


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


class UpstreamTemporaryError(TemporaryError):
    code = 451
    status = "4.4.0"
    text = "Upstream temporarily refused, try again later"

    @classmethod
    def from_reply(cls, code: int, message: str) -> UpstreamTemporaryError:
        enhanced, rest = _upstream_text(message)
        return cls(f"Upstream: {rest}" if rest else None, code=code,
                   status=enhanced if enhanced and enhanced[0] == "4" else cls.status)


class UpstreamUnavailableError(UpstreamTemporaryError):
    code = 451
    status = "4.4.1"
    text = "Upstream unreachable, try again later"


class UpstreamBusyError(UpstreamTemporaryError):
    """Every connection of the upstream pool stayed busy for the whole wait (the upstream
    timeout). The upstream is reachable: the relay is congested, RFC 3463 X.4.5 (mail system
    congestion), not X.4.1 (no answer from host). Not an UpstreamUnavailableError on purpose:
    a route's failover is for an upstream that cannot be reached."""

    code = 451
    status = "4.4.5"
    text = "Upstream connections all busy, try again later"


class UpstreamPermanentError(PermanentError):
    code = 554
    status = "5.0.0"
    text = "Upstream refused"

    @classmethod
    def from_reply(cls, code: int, message: str) -> UpstreamPermanentError:
        enhanced, rest = _upstream_text(message)
        return cls(f"Upstream: {rest}" if rest else None, code=code,
                   status=enhanced if enhanced and enhanced[0] == "5" else cls.status)


def upstream_reply_error(code: int, message: str) -> RelayError:
    """The error for an upstream reply code that was not success (mapped by class, 4xx/5xx)."""
    if 400 <= code < 500:
        return UpstreamTemporaryError.from_reply(code, message)
    if 500 <= code < 600:
        return UpstreamPermanentError.from_reply(code, message)
    # A reply outside 4xx/5xx where success was expected is a protocol error upstream:
    # keep the mail (temporary) rather than guess.
    return UpstreamTemporaryError(f"Upstream protocol error (reply {code})")


@dataclass(frozen=True, slots=True)
class OverLimitReply:
    """The over-limit reply chosen in policies/plans.toml; text is a str.format template."""

    code: int
    status: str
    text: str


class QuotaExceededError(RelayError):
    """A recipient would take the user past the monthly limit."""

    def __init__(self, reply: OverLimitReply, *, used: int, limit: int, resets_on: str) -> None:
        self.used = used
        self.limit = limit
        super().__init__(
            reply.text.format(used=used, limit=limit, resets_on=resets_on),
            code=reply.code, status=reply.status,
        )
