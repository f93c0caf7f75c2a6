"""Every SMTP reply the relay gives, and the exception tree that carries the refusals.

Services raise these; the SMTP stage (``relay/smtp/``) turns them into replies, and logs each
refusal with ``RelayError.log_refusal``. No module outside this package writes a reply
string or a reply code (``tests/test_reply_literals.py`` fails on one). Imports nothing of
the relay (an import-linter contract in pyproject.toml), so every stage may import it.

One module per family, all re-exported here (``from relay.errors import X``):
``base`` (the root, and local failures), ``replies`` (the fixed replies), ``session``
(admission, AUTH, commands), ``policy`` (senders, plans, routing rules, the monthly
limit), ``delivery`` (the upstream and the routes' upstreams), ``startup``.

    RelayError                          .code, .status, .text -> .reply; .log_refusal()
    ├── TemporaryError                  4xx: the client keeps the mail and retries
    │   ├── StoreUnavailableError       451 4.3.0  Redis unreachable or slow (fail closed)
    │   ├── AuthUnavailableError        454 4.7.0  credentials could not be checked now
    │   ├── PlanMisconfiguredError      451 4.3.5  the user's plan is not in plans.toml
    │   ├── TooManyRecipientsError      452 4.5.3  more recipients than one message may carry
    │   │   └── OneRecipientPerMessageError 452 4.5.3  unsubscribe = "adds": one per message
    │   ├── TooManyConnectionsError     421 4.7.0  over max_connections(_per_ip); then closed
    │   ├── UntrustedPeerError          421 4.7.0  PROXY protocol on, peer not a trusted proxy
    │   ├── AuthThrottledError          454 4.7.0  too many AUTH failures (address or login)
    │   ├── SessionTimeoutError         421 4.4.2  idle or transaction timeout; then closed
    │   ├── CredentialsUnreadableError  451 4.7.0  a user's route credentials do not decrypt
    │   ├── ResubmissionInProgressError 451 4.3.0  the same message is being sent right now
    │   ├── UpstreamTemporaryError      4xx        the upstream said 4xx, or could not be reached
    │   │   ├── UpstreamUnavailableError 451 4.4.1 connection, TLS or login to the upstream failed
    │   │   │   └── RouteNotConfiguredError 451 4.3.5  the route's upstream setting is not set
    │   │   ├── UpstreamBusyError       451 4.4.5  every pooled upstream connection stayed busy
    │   │   └── UpstreamOutcomeUnknownError 451 4.4.2  lost after the message was sent
    │   ├── InternalError               451 4.3.0  a bug: logged with its traceback, never shown
    │   └── ShuttingDownError           421 4.3.2  the relay is draining (SIGTERM): goodbye
    ├── PermanentError                  5xx: the client must not retry as is
    │   ├── AuthFailedError             535 5.7.8  wrong login or password (AUTH's reply)
    │   ├── AuthRequiredError           530 5.7.0  MAIL before a successful AUTH
    │   ├── SenderNotAllowedError       553 5.7.1  MAIL FROM not owned by this login
    │   ├── UnknownSenderError          550 5.7.1  MAIL FROM belongs to no Command Email user
    │   ├── UserDisabledError           550 5.7.1  the sending user is disabled
    │   ├── RouteRefusedError           550 5.7.1  a routing rule refuses the message
    │   ├── MissingRouteCredentialsError 550 5.7.1 the route needs the user's own credentials
    │   ├── CommandSyntaxError          5xx 5.5.2  a command line the relay will not parse
    │   │   ├── InvalidUtf8Error        500 5.5.2  bytes that are not UTF-8
    │   │   └── ControlCharacterError   501 5.5.2  a C0 control or DEL in a command
    │   ├── AddressSyntaxError          501 5.1.7 / 5.1.3  a sender or recipient not taken as is
    │   ├── SmtpUtf8RequiredError       553 5.6.7  non-ASCII address without SMTPUTF8
    │   ├── TlsAlreadyActiveError       503 5.5.1  STARTTLS inside TLS
    │   ├── BadAddressError             553 5.1.3  the upstream client would not send it
    │   ├── SmtpUtf8UnsupportedError    553 5.6.7  non-ASCII envelope, upstream lacks SMTPUTF8
    │   ├── UnsubscribeHeadersMissingError 550 5.6.0  RFC 8058 headers absent ("refuses")
    │   └── UpstreamPermanentError      5xx        the upstream said 5xx
    └── QuotaExceededError              code from policies/plans.toml [over_limit] (550 5.7.1)

    StartupError                        not a reply: the relay cannot start (RuntimeError)
"""

from __future__ import annotations

from relay.errors.base import (
    InternalError,
    PermanentError,
    RefusalCounter,
    RefusalLevel,
    RelayError,
    StoreUnavailableError,
    TemporaryError,
)
from relay.errors.delivery import (
    BadAddressError,
    CredentialsUnreadableError,
    MissingRouteCredentialsError,
    ResubmissionInProgressError,
    RouteNotConfiguredError,
    SmtpUtf8UnsupportedError,
    UpstreamBusyError,
    UpstreamOutcomeUnknownError,
    UpstreamPermanentError,
    UpstreamTemporaryError,
    UpstreamUnavailableError,
    upstream_reply_error,
)
from relay.errors.policy import (
    OverLimitReply,
    PlanMisconfiguredError,
    QuotaExceededError,
    RouteRefusedError,
    SenderNotAllowedError,
    UnknownSenderError,
    UnsubscribeHeadersMissingError,
    UserDisabledError,
)
from relay.errors.replies import (
    AUTH_BAD_BASE64,
    AUTH_BAD_PLAIN,
    AUTH_SUCCESS,
    AUTH_TEMPORARY,
    DATA_NEED_RCPT,
    DATA_OK,
    DATA_START,
    DATA_SYNTAX,
    DATA_TOO_MUCH,
    LINE_TOO_LONG,
    MESSAGE_ACCEPTED_CODE,
    RECIPIENT_OK,
    SENDER_OK,
    message_accepted,
)
from relay.errors.session import (
    AddressSyntaxError,
    AuthFailedError,
    AuthRequiredError,
    AuthThrottledError,
    AuthUnavailableError,
    CommandSyntaxError,
    ControlCharacterError,
    InvalidUtf8Error,
    OneRecipientPerMessageError,
    SessionTimeoutError,
    ShuttingDownError,
    SmtpUtf8RequiredError,
    TlsAlreadyActiveError,
    TooManyConnectionsError,
    TooManyRecipientsError,
    UntrustedPeerError,
)
from relay.errors.startup import StartupError

__all__ = [
    "AUTH_BAD_BASE64",
    "AUTH_BAD_PLAIN",
    "AUTH_SUCCESS",
    "AUTH_TEMPORARY",
    "DATA_NEED_RCPT",
    "DATA_OK",
    "DATA_START",
    "DATA_SYNTAX",
    "DATA_TOO_MUCH",
    "LINE_TOO_LONG",
    "MESSAGE_ACCEPTED_CODE",
    "RECIPIENT_OK",
    "SENDER_OK",
    "AddressSyntaxError",
    "AuthFailedError",
    "AuthRequiredError",
    "AuthThrottledError",
    "AuthUnavailableError",
    "BadAddressError",
    "CommandSyntaxError",
    "ControlCharacterError",
    "CredentialsUnreadableError",
    "InternalError",
    "InvalidUtf8Error",
    "MissingRouteCredentialsError",
    "OneRecipientPerMessageError",
    "OverLimitReply",
    "PermanentError",
    "PlanMisconfiguredError",
    "QuotaExceededError",
    "RefusalCounter",
    "RefusalLevel",
    "RelayError",
    "ResubmissionInProgressError",
    "RouteNotConfiguredError",
    "RouteRefusedError",
    "SenderNotAllowedError",
    "SessionTimeoutError",
    "ShuttingDownError",
    "SmtpUtf8RequiredError",
    "SmtpUtf8UnsupportedError",
    "StartupError",
    "StoreUnavailableError",
    "TemporaryError",
    "TlsAlreadyActiveError",
    "TooManyConnectionsError",
    "TooManyRecipientsError",
    "UnknownSenderError",
    "UnsubscribeHeadersMissingError",
    "UntrustedPeerError",
    "UpstreamBusyError",
    "UpstreamOutcomeUnknownError",
    "UpstreamPermanentError",
    "UpstreamTemporaryError",
    "UpstreamUnavailableError",
    "UserDisabledError",
    "message_accepted",
    "upstream_reply_error",
]
