"""relay/delivery/upstream.py: what every upstream promises the transaction (the Upstream
and UpstreamSession protocols), kept by both implementations against real ones (a pool to
the capturing SMTP server, and the capture folder); the class an upstream failure is counted
under; and the error for a message whose outcome is unknown. How each aiosmtplib error is
translated is in tests/test_errors.py."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiosmtplib
import pytest

from relay.config.endpoints import UpstreamTarget
from relay.delivery.capture import CaptureUpstream
from relay.delivery.pool import SmtpUpstream
from relay.delivery.upstream import Upstream, reply_class
from relay.errors import TemporaryError, UpstreamOutcomeUnknownError, UpstreamUnavailableError
from relay.message.wire import Outgoing, stuff
from tests.conftest import CapturingUpstream, message

Received = Callable[[], list[bytes]]


@pytest.fixture(params=["smtp", "capture"])
async def an_upstream(request: pytest.FixtureRequest, upstream: CapturingUpstream,
                      tmp_path: Path) -> AsyncIterator[tuple[Upstream, Received]]:
    """Each implementation, and how to read the messages it passed on (as content)."""
    if request.param == "smtp":
        pool = SmtpUpstream(UpstreamTarget("127.0.0.1", upstream.port, "none"), size=2,
                            timeout=5, local_hostname="relay.test")
        yield pool, lambda: [m.content for m in upstream.messages]
        await pool.close()
    else:
        folder = tmp_path / "capture"
        yield CaptureUpstream(folder), lambda: [p.read_bytes()
                                                for p in sorted(folder.glob("*.eml"))]


async def test_every_upstream_takes_a_message_through_begin_rcpt_data_release(
        an_upstream: tuple[Upstream, Received]) -> None:
    """begin opens the transaction, rcpt adds a recipient, data sends the message in wire
    form and returns a non-empty reply (a queue id or a file name), release hands the
    connection back and may be called again without harm; what arrives is the content."""
    upstream, received = an_upstream
    content = message(subject="Contract", body="..a line that starts with a dot\r\n")
    session = await upstream.begin("agent@kw.test", [], smtputf8=False)
    await session.rcpt("a@example.test", [])
    reply = await session.data(Outgoing((stuff(content),)))
    await session.release(reusable=True)
    await session.release(reusable=True)
    assert isinstance(reply, str) and reply
    assert received() == [content]
    assert upstream.reachable() is True
    assert upstream.name


@pytest.mark.parametrize(("error", "kind"), [
    (aiosmtplib.SMTPResponseException(450, "4.2.1 busy"), "4xx"),
    (aiosmtplib.SMTPRecipientRefused(550, "5.1.1 no such user", "a@example.test"), "5xx"),
    (aiosmtplib.SMTPResponseException(354, "go ahead"), "error"),
    (aiosmtplib.SMTPServerDisconnected("gone"), "error"),
    (aiosmtplib.SMTPConnectError("refused"), "error"),
    (ConnectionResetError(), "error"),
    (TimeoutError(), "error"),
    (ssl.SSLError(1, "handshake"), "error"),
    (UpstreamUnavailableError(), None),
], ids=["reply-450", "reply-550", "reply-354", "disconnected", "connect", "reset", "timeout",
        "tls", "relay-refusal"])
def test_reply_class_names_what_the_upstream_answered(error: BaseException,
                                                      kind: str | None) -> None:
    """A reply counts by its class; no reply at all (connect, TLS, timeout, lost connection)
    is ``error``; the relay's own refusal is not the upstream's and is not counted here."""
    assert reply_class(error) == kind


def test_an_unknown_outcome_is_a_temporary_refusal_saying_so() -> None:
    """The message may have reached the upstream: the client is told to try again later
    (4.4.2), never that the message was refused for good."""
    error = UpstreamOutcomeUnknownError()
    assert isinstance(error, TemporaryError) and not error.permanent
    assert error.reply == ("451 4.4.2 Upstream connection lost after the message was sent, "
                           "try again later")
