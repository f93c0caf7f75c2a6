"""relay.errors and relay.delivery.upstream.translate_error: every refusal is a well-formed
SMTP reply, every aiosmtplib error maps to one, and a refusal logs its code as it answers."""

from __future__ import annotations

import inspect
import re
import ssl
from pathlib import Path
from typing import Any

import aiosmtplib
import aiosmtplib.errors
import pytest
import structlog
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from structlog.testing import capture_logs

from relay import errors
from relay.config.policies import load_policies
from relay.delivery.upstream import translate_error
from relay.errors import (
    AddressSyntaxError,
    BadAddressError,
    InternalError,
    OverLimitReply,
    PermanentError,
    QuotaExceededError,
    RecipientSuppressedError,
    RefusalLevel,
    RelayError,
    SessionTimeoutError,
    TemporaryError,
    UpstreamBusyError,
    UpstreamPermanentError,
    UpstreamTemporaryError,
    UpstreamUnavailableError,
    upstream_reply_error,
)

REPLY = re.compile(r"^(?P<code>[45]\d\d) (?P<status>[45]\.\d{1,3}\.\d{1,3}) (?P<text>\S[^\r\n]*)$")
POLICIES = Path(__file__).resolve().parent.parent / "policies"


def assert_well_formed(reply: str) -> None:
    """``<3 digits> <x.y.z> text``, one line, the status class equal to the code class."""
    match = REPLY.match(reply)
    assert match, reply
    assert match["status"][0] == match["code"][0], reply
    assert reply.isascii() and reply.isprintable(), reply


def smtp_exception_classes() -> list[type[aiosmtplib.SMTPException]]:
    return [cls for _, cls in inspect.getmembers(aiosmtplib.errors, inspect.isclass)
            if issubclass(cls, aiosmtplib.SMTPException)]


def instantiate(cls: type[aiosmtplib.SMTPException], code: int) -> aiosmtplib.SMTPException:
    """Build ``cls`` from its signature: a code, a message, an address, a list of refusals."""
    args: list[Any] = []
    text = f"{code // 100}.1.1 upstream says no"
    for name in list(inspect.signature(cls.__init__).parameters)[1:]:
        if name == "code":
            args.append(code)
        elif name == "message":
            args.append(text)
        elif name in {"sender", "recipient"}:
            args.append("someone@example.test")
        elif name == "recipients":
            args.append([aiosmtplib.SMTPRecipientRefused(code, text, "a@example.test")])
        else:  # pragma: no cover - a new aiosmtplib signature: teach this test about it
            raise AssertionError(f"{cls.__name__}: unknown parameter {name!r}")
    return cls(*args)


# -- every aiosmtplib error is mapped ------------------------------------------------------------
def test_smtp_exception_classes_enumerated() -> None:
    """The enumeration finds aiosmtplib's exception tree (guards against an empty loop)."""
    names = {cls.__name__ for cls in smtp_exception_classes()}
    assert {"SMTPException", "SMTPResponseException", "SMTPRecipientRefused",
            "SMTPRecipientsRefused", "SMTPServerDisconnected", "SMTPConnectError",
            "SMTPTimeoutError", "SMTPDataError", "SMTPAuthenticationError"} <= names


@pytest.mark.parametrize("code", [450, 550])
@pytest.mark.parametrize("cls", smtp_exception_classes(), ids=lambda cls: cls.__name__)
def test_translate_error_maps_every_aiosmtplib_exception(cls: type[aiosmtplib.SMTPException],
                                                         code: int) -> None:
    """Every aiosmtplib exception becomes a RelayError that is not an InternalError, with a
    well-formed reply."""
    result = translate_error(instantiate(cls, code))
    assert isinstance(result, RelayError)
    assert not isinstance(result, InternalError)
    assert_well_formed(result.reply)


@pytest.mark.parametrize("cls", [aiosmtplib.SMTPResponseException, aiosmtplib.SMTPDataError,
                                 aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPRecipientRefused,
                                 aiosmtplib.SMTPRecipientsRefused],
                         ids=lambda cls: cls.__name__)
@pytest.mark.parametrize(("code", "kind"), [(421, UpstreamTemporaryError),
                                            (450, UpstreamTemporaryError),
                                            (452, UpstreamTemporaryError),
                                            (550, UpstreamPermanentError),
                                            (554, UpstreamPermanentError)])
def test_translate_error_reply_keeps_upstream_class(cls: type[aiosmtplib.SMTPException],
                                                    code: int, kind: type[RelayError]) -> None:
    """A refusal of the message keeps the upstream's code and its class (4xx temporary, 5xx
    permanent), with the upstream's enhanced status."""
    result = translate_error(instantiate(cls, code))
    assert type(result) is kind
    assert result.code == code
    assert result.permanent is (code >= 500)
    assert isinstance(result, PermanentError if code >= 500 else TemporaryError)
    assert result.status == f"{code // 100}.1.1"
    assert result.reply == f"{code} {code // 100}.1.1 Upstream: upstream says no"


@pytest.mark.parametrize("cls", [aiosmtplib.SMTPConnectResponseError, aiosmtplib.SMTPHeloError,
                                 aiosmtplib.SMTPAuthenticationError],
                         ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("code", [421, 535, 554])
def test_translate_error_connection_setup_refusal_is_temporary(
        cls: type[aiosmtplib.SMTPResponseException], code: int) -> None:
    """A refused greeting, EHLO or login to the upstream is the relay's link failing, not this
    message: 451 4.4.1, whatever the upstream's code (errors.py tree, STYLE §4)."""
    result = translate_error(cls(code, "5.7.8 Authentication credentials invalid"))
    assert type(result) is UpstreamUnavailableError
    assert result.reply == UpstreamUnavailableError().reply


@pytest.mark.parametrize("exc", [
    aiosmtplib.SMTPServerDisconnected("Connection lost"),
    aiosmtplib.SMTPConnectError("Error connecting to 127.0.0.1 on port 1"),
    aiosmtplib.SMTPConnectTimeoutError("Timed out connecting"),
    aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"),
    aiosmtplib.SMTPTimeoutError("Timed out"),
    aiosmtplib.SMTPException("SMTP STARTTLS extension not supported by server."),
    aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported by this server"),
    OSError("network is unreachable"),
    ConnectionRefusedError(111, "Connection refused"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError(),
    ssl.SSLError(1, "certificate verify failed"),
], ids=lambda exc: type(exc).__name__)
def test_translate_error_transport_failure_is_unavailable(exc: BaseException) -> None:
    """Connect, disconnect, timeout and TLS failures are UpstreamUnavailableError (4xx)."""
    result = translate_error(exc)
    assert isinstance(result, UpstreamUnavailableError)
    assert result.code == 451 and result.status == "4.4.1"
    assert not result.permanent
    assert_well_formed(result.reply)


def test_translate_error_transport_failure_text_is_not_echoed() -> None:
    """The text of a socket error (addresses, paths) is not sent to the client."""
    result = translate_error(OSError("connect to 10.1.2.3 port 25 failed: secret-host"))
    assert "10.1.2.3" not in result.reply and "secret-host" not in result.reply


@pytest.mark.parametrize("exc", [ValueError("bad"), UnicodeEncodeError("ascii", "é", 0, 1, "x")],
                         ids=lambda exc: type(exc).__name__)
def test_translate_error_refused_address_is_bad_address(exc: BaseException) -> None:
    """aiosmtplib refusing to send an address (CR/LF, non-ASCII) is 553 5.1.3."""
    result = translate_error(exc)
    assert isinstance(result, BadAddressError)
    assert result.reply.startswith("553 5.1.3 ")


def test_translate_error_relay_error_passes_through() -> None:
    """A RelayError is returned as it is."""
    original = UpstreamBusyError()
    assert translate_error(original) is original


def test_upstream_busy_is_congestion_not_unreachable() -> None:
    """A full upstream pool is 451 4.4.5 (RFC 3463: mail system congestion): an upstream
    refusal of its own kind, not UpstreamUnavailableError (4.4.1, and the failover trigger)."""
    busy = UpstreamBusyError()
    assert busy.reply == "451 4.4.5 Upstream connections all busy, try again later"
    assert isinstance(busy, UpstreamTemporaryError)
    assert not isinstance(busy, UpstreamUnavailableError)


def test_translate_error_unmapped_exception_raises() -> None:
    """An exception that is not an upstream failure is a bug and is not disguised as one."""
    with pytest.raises(TypeError, match="KeyError"):
        translate_error(KeyError("x"))


def test_translate_error_recipients_refused_without_recipients() -> None:
    """SMTPRecipientsRefused with no refusal inside is a temporary upstream error."""
    result = translate_error(aiosmtplib.SMTPRecipientsRefused([]))
    assert isinstance(result, UpstreamTemporaryError)
    assert_well_formed(result.reply)


# -- upstream reply texts ------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "message", "reply"), [
    (450, "4.2.2 Mailbox full", "450 4.2.2 Upstream: Mailbox full"),
    (550, "5.1.1 No such user here", "550 5.1.1 Upstream: No such user here"),
    (550, "No such user here", "550 5.0.0 Upstream: No such user here"),
    (451, "Try later", "451 4.4.0 Upstream: Try later"),
    # A status whose class contradicts the code is replaced by the class default.
    (450, "5.1.1 Mailbox gone", "450 4.4.0 Upstream: Mailbox gone"),
    (550, "4.2.2 Mailbox full", "550 5.0.0 Upstream: Mailbox full"),
    (550, "2.0.0 OK", "550 5.0.0 Upstream: OK"),
    (552, "", "552 5.0.0 Upstream refused"),
    (452, "   ", "452 4.4.0 Upstream temporarily refused, try again later"),
])
def test_upstream_reply_error_takes_enhanced_status(code: int, message: str, reply: str) -> None:
    """The enhanced status comes from the upstream text when present and of the same class."""
    result = upstream_reply_error(code, message)
    assert result.reply == reply
    assert_well_formed(result.reply)


@pytest.mark.parametrize("message", [
    "5.7.1 Rejected\r\n250 2.0.0 OK",
    "5.7.1 line one\nline two\nline three",
    "5.7.1 tab\there\x00nul\x1bescape\x7fdel",
    "\r\n5.7.1 leading break",
    "5.7.1 " + "long " * 200,
])
def test_upstream_reply_error_text_is_one_safe_line(message: str) -> None:
    """CR, LF and other control characters in upstream text never reach the client's reply."""
    result = upstream_reply_error(554, message)
    assert_well_formed(result.reply)
    assert result.reply.startswith("554 5.7.1 Upstream: ")
    assert not any(ord(c) < 32 or ord(c) == 127 for c in result.reply)
    assert len(result.reply) < 512  # RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets


@pytest.mark.parametrize("code", [200, 250, 354, 0, -1, 600, 999])
def test_upstream_reply_error_outside_4xx_5xx_is_temporary(code: int) -> None:
    """A non-success reply that is not 4xx/5xx is treated as a temporary protocol error."""
    result = upstream_reply_error(code, "2.0.0 odd")
    assert isinstance(result, UpstreamTemporaryError)
    assert result.code == 451
    assert_well_formed(result.reply)


# -- the relay's own replies ---------------------------------------------------------------------
def relay_error_classes() -> list[type[RelayError]]:
    found: set[type[RelayError]] = set()
    for _, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, RelayError) and cls is not QuotaExceededError:
            found.add(cls)
    return sorted(found, key=lambda cls: cls.__name__)


@pytest.mark.parametrize("cls", relay_error_classes(), ids=lambda cls: cls.__name__)
def test_relay_error_default_reply_is_well_formed(cls: type[RelayError]) -> None:
    """Every error class's reply is "<code> <x.y.z> text" with a matching class, and its
    place in the tree (TemporaryError/PermanentError) agrees with its code."""
    error = cls()
    assert_well_formed(error.reply)
    assert str(error) == error.reply
    if issubclass(cls, TemporaryError):
        assert 400 <= error.code < 500 and not error.permanent
    if issubclass(cls, PermanentError):
        assert 500 <= error.code < 600 and error.permanent


def test_relay_error_classes_cover_the_tree() -> None:
    """The enumeration of the relay's errors finds the documented tree."""
    names = {cls.__name__ for cls in relay_error_classes()}
    assert {"StoreUnavailableError", "AuthUnavailableError", "PlanMisconfiguredError",
            "TooManyRecipientsError", "UpstreamTemporaryError", "UpstreamUnavailableError",
            "InternalError", "AuthRequiredError", "SenderNotAllowedError",
            "UnknownSenderError", "UserDisabledError", "UpstreamPermanentError",
            "TooManyConnectionsError", "UntrustedPeerError", "AuthThrottledError",
            "SessionTimeoutError", "UpstreamBusyError", "UpstreamOutcomeUnknownError",
            "RouteRefusedError", "RouteNotConfiguredError", "MissingRouteCredentialsError",
            "CredentialsUnreadableError", "AuthFailedError"} <= names


def test_errors_docstring_draws_every_error_class() -> None:
    """The tree in relay.errors' docstring names exactly the exceptions it exports, each
    under its real parent."""
    drawn = re.findall(r"^( {4}[│├└─ ]*)(\w+Error)\b", errors.__doc__ or "", re.M)
    exported = {name: obj for name, obj in vars(errors).items()
                if isinstance(obj, type) and issubclass(obj, Exception)}
    by_name = {name: prefix for prefix, name in drawn}
    assert len(by_name) == len(drawn)  # each drawn once
    assert set(by_name) == set(exported)
    order = list(by_name)
    for name, cls in exported.items():
        parent = cls.__mro__[1].__name__
        if parent in exported:
            # The closest name above it drawn one level (4 characters) further left.
            depth = len(by_name[name])
            above = [n for n in order[:order.index(name)] if len(by_name[n]) == depth - 4]
            assert above and above[-1] == parent, (name, parent)


def test_relay_error_instance_refinement_does_not_leak_to_class() -> None:
    """Refining text, code or status on one instance leaves the class default alone."""
    refined = UpstreamTemporaryError("Upstream: busy", code=421, status="4.4.2")
    assert refined.reply == "421 4.4.2 Upstream: busy"
    assert UpstreamTemporaryError().reply == (
        "451 4.4.0 Upstream temporarily refused, try again later")


@pytest.mark.parametrize("reply", [
    errors.AUTH_SUCCESS, errors.AUTH_TEMPORARY,
    errors.AUTH_BAD_BASE64, errors.AUTH_BAD_PLAIN, errors.SENDER_OK, errors.RECIPIENT_OK,
    errors.DATA_TOO_MUCH, errors.LINE_TOO_LONG, errors.message_accepted("0123abcd"),
])
def test_reply_constants_are_well_formed(reply: str) -> None:
    """The fixed replies carry a code and an enhanced status of the same class."""
    match = re.match(r"^([2-5]\d\d) ([2-5])\.\d{1,3}\.\d{1,3} \S", reply)
    assert match, reply
    assert match[1][0] == match[2], reply


def test_message_accepted_code_is_the_reply_code() -> None:
    """delivery.finished logs the code of the reply a delivered message gets."""
    assert errors.message_accepted("x").startswith(f"{errors.MESSAGE_ACCEPTED_CODE} ")


@pytest.mark.parametrize("reply", [errors.DATA_NEED_RCPT, errors.DATA_SYNTAX, errors.DATA_START,
                                   errors.DATA_OK])
def test_data_replies_are_aiosmtpds_own(reply: str) -> None:
    """The relay's DATA keeps aiosmtpd's replies around the data byte for byte (no enhanced
    status: aiosmtpd gives none): each is a literal of aiosmtpd's own smtp_DATA."""
    assert repr(reply) in inspect.getsource(AiosmtpdSMTP.smtp_DATA), reply


# -- one from_reply, and log_refusal ---------------------------------------------------------------
def test_upstream_reply_error_is_the_only_way_from_a_reply() -> None:
    """The twin from_reply methods are gone: upstream_reply_error builds both classes."""
    assert not hasattr(UpstreamTemporaryError, "from_reply")
    assert not hasattr(UpstreamPermanentError, "from_reply")
    assert type(upstream_reply_error(421, "x")) is UpstreamTemporaryError
    assert type(upstream_reply_error(554, "x")) is UpstreamPermanentError


class Counted:
    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


@pytest.mark.parametrize("level", ["debug", "info", "warning"])
def test_log_refusal_counts_and_logs_the_code_it_answers(level: RefusalLevel) -> None:
    """One line at the level asked, with the fields given and the reply's own code; the
    counter (when given) counted once."""
    counter = Counted()
    error = AddressSyntaxError("sender")
    with capture_logs() as logs:
        error.log_refusal(structlog.get_logger(), "mail.refused", counter, level=level,
                          reason=error.reason)
    assert logs == [{"event": "mail.refused", "log_level": level,
                     "reason": "AddressSyntaxError", "smtp_code": 501}]
    assert counter.value == 1


def test_log_refusal_without_counter_counts_nothing() -> None:
    """No counter: the line only (the protocol's own refusals have no metric)."""
    with capture_logs() as logs:
        SessionTimeoutError().log_refusal(structlog.get_logger(), "session.timeout",
                                          timeout="idle")
    assert logs == [{"event": "session.timeout", "log_level": "info", "timeout": "idle",
                     "smtp_code": 421}]


def test_over_limit_reply_as_permanent() -> None:
    """A 4xx over-limit reply becomes 550 5.7.1 with the same text; a 5xx stays as it is."""
    temporary = OverLimitReply(452, "4.5.3", "{used}/{limit} used")
    assert temporary.as_permanent() == OverLimitReply(550, "5.7.1", "{used}/{limit} used")
    permanent = OverLimitReply(554, "5.7.0", "no")
    assert permanent.as_permanent() is permanent


# -- the over-limit reply ------------------------------------------------------------------------
def test_quota_exceeded_error_formats_policy_template() -> None:
    """The over-limit reply is the policy's code, status and text with the numbers filled in."""
    reply = OverLimitReply(550, "5.7.1", "Limit reached ({used} of {limit}); resets {resets_on}")
    error = QuotaExceededError(reply, used=5000, limit=5000, resets_on="December 1, 2026")
    assert error.reply == "550 5.7.1 Limit reached (5000 of 5000); resets December 1, 2026"
    assert (error.used, error.limit, error.code, error.permanent) == (5000, 5000, 550, True)
    assert_well_formed(error.reply)


def test_quota_exceeded_error_temporary_policy() -> None:
    """A 4xx over-limit policy gives a temporary reply."""
    reply = OverLimitReply(452, "4.5.3", "{used}/{limit} used")
    error = QuotaExceededError(reply, used=10, limit=10, resets_on="January 1, 2027")
    assert error.reply == "452 4.5.3 10/10 used"
    assert not error.permanent


def test_quota_exceeded_error_with_shipped_policy() -> None:
    """The shipped over-limit template renders to a well-formed 550 5.7.1 reply."""
    policies = load_policies(POLICIES)
    error = QuotaExceededError(policies.over_limit, used=5000, limit=5000,
                               resets_on="December 1, 2026")
    assert_well_formed(error.reply)
    assert error.reply.startswith("550 5.7.1 ")
    assert "5000 of 5000" in error.reply and "December 1, 2026" in error.reply


@pytest.mark.parametrize(("reason", "scope", "text"), [
    ("unsubscribe", "user", "Recipient has unsubscribed from this sender"),
    ("unsubscribe", "global", "Recipient has unsubscribed from all mail sent through this "
                              "relay"),
    ("complaint", "user", "Recipient has reported earlier mail as spam"),
    ("complaint", "global", "Recipient has reported earlier mail as spam"),
    ("bounce", "global", "Recipient address bounced permanently before"),
    ("manual", "user", "Recipient is on this sender's suppression list"),
    ("manual", "global", "Recipient is on the suppression list"),
    ("legal-hold", "user", "Recipient is on this sender's suppression list"),
])
def test_recipient_suppressed_reply_names_the_reason(reason: str, scope: str,
                                                     text: str) -> None:
    """A suppressed recipient's reply is a permanent 550 5.7.1 in words that name why."""
    error = RecipientSuppressedError(reason, scope)
    assert error.reply == f"550 5.7.1 {text}"
    assert error.permanent
    assert_well_formed(error.reply)


def test_recipient_suppressed_refusal_logs_its_reason_and_scope() -> None:
    """The refusal's log line carries the entry's reason and scope beside the class name."""
    counter = Counted()
    error = RecipientSuppressedError("bounce", "global")
    with capture_logs() as logs:
        error.log_refusal(structlog.get_logger(), "rcpt.refused", counter, reason=error.reason)
    assert logs == [{"event": "rcpt.refused", "log_level": "info",
                     "reason": "RecipientSuppressedError", "suppression": "bounce",
                     "scope": "global", "smtp_code": 550}]
    assert counter.value == 1
