"""Refusals of the client's session, before any routing or quota decision: admission,
timeouts, shutdown, AUTH, and commands or addresses the relay will not take as written."""

from __future__ import annotations

from relay.errors.base import PermanentError, TemporaryError


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


class SessionTimeoutError(TemporaryError):
    """The client was silent too long, or a transaction (MAIL to the end of DATA) took too
    long. RFC 5321 §4.5.3.2: the server may close on timeout; 421 tells the client why."""

    code = 421
    status = "4.4.2"
    text = "Timeout, closing connection"


class ShuttingDownError(TemporaryError):
    # RFC 5321 §3.8: a server shutting down answers 421 and closes the connection; RFC 3463
    # 4.3.2: system not accepting network messages.
    code = 421
    status = "4.3.2"
    text = "Service shutting down"


class AuthUnavailableError(TemporaryError):
    code = 454
    status = "4.7.0"
    text = "Temporary authentication failure, try again later"


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


class AuthFailedError(PermanentError):
    """The login or password is wrong (RFC 4954 §6: 535 5.7.8). Answered as AUTH's reply,
    not raised: the hooks log it with ``log_refusal`` and return its ``reply``."""

    code = 535
    status = "5.7.8"
    text = "Authentication credentials invalid"


class AuthRequiredError(PermanentError):
    # RFC 4954 §6: 530 5.7.0 when a command needs authentication first.
    code = 530
    status = "5.7.0"
    text = "Authentication required"


class TooManyRecipientsError(TemporaryError):
    # RFC 5321 §4.5.3.1.10: 452 tells the client to send the rest in another transaction.
    code = 452
    status = "4.5.3"
    text = "Too many recipients for one message"


class OneRecipientPerMessageError(TooManyRecipientsError):
    # ``unsubscribe = "adds"``: the added URL names the recipient, so a message carries one.
    # RFC 5321 §4.5.3.1.10: the client sends the other recipients in new transactions.
    text = "Too many recipients: one per message for one-click unsubscribe links"


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
