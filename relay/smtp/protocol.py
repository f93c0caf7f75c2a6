"""The aiosmtpd ``SMTP`` subclass the relay serves each connection with.

One ``RelaySMTP`` per connection. It gives each connection a session id and a bound logger,
hangs a ``Transaction`` on the envelope, and retires an unfinished transaction whenever
aiosmtpd drops its envelope (RSET, HELO/EHLO, STARTTLS, end of DATA) or the connection ends.
Served with ``loop.create_server`` on the relay's own loop (not aiosmtpd's threaded
Controller), so the Redis client and the upstream pool share one event loop.

Its other jobs are mixins, one module each, over ``relay/smtp/connection.py``: admission
before the greeting (PROXY header, connection limits: ``relay/smtp/admission.py``), the idle
and transaction timers (``relay/smtp/timeouts.py``), and DATA (``relay/smtp/data.py``). This
module keeps the command loop's edges: the command-line guard, the replies and their log
lines, STARTTLS, and the exceptions out of aiosmtpd.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
from typing import TYPE_CHECKING, Any, cast

import structlog
from aiosmtpd.smtp import MISSING, SMTP, TLSSetupException
from prometheus_client import Gauge

from relay.errors import (
    CommandSyntaxError,
    InternalError,
    RelayError,
    TlsAlreadyActiveError,
)
from relay.smtp.admission import AdmissionMixin, ConnectionLimiter
from relay.smtp.data import DataMixin
from relay.smtp.hooks import RelayHandler
from relay.smtp.proxy import ProxyPolicy
from relay.smtp.session import RelayEnvelope, RelaySession, SessionServer
from relay.smtp.syntax import command_problem, parse_path
from relay.smtp.timeouts import TimeoutMixin

log = structlog.get_logger()
_QUOTED = re.compile(r'"[^"]*"')


# The order matters: admission answers a timer that fires before the greeting, before the
# idle rules of the timeouts are asked.
class RelaySMTP(AdmissionMixin, TimeoutMixin, DataMixin):
    def __init__(self, handler: RelayHandler, *, implicit_tls: bool,
                 connections: ConnectionLimiter | None = None, proxy: ProxyPolicy | None = None,
                 transaction_timeout: float = 600.0, tls_handshake_timeout: float = 10.0,
                 **kwargs: Any) -> None:
        self._relay_handler = handler
        self._tls_handshake_timeout = tls_handshake_timeout
        self._path_role = "sender"  # which path _getaddr is parsing (MAIL or RCPT)
        self._command_line: bytes | None = None  # the last command line, as read
        self._listener = "smtps" if implicit_tls else "starttls"
        self._open_gauge: Gauge | None = None  # the gauge this connection was counted in
        super().__init__(handler, implicit_tls=implicit_tls, connections=connections,
                         proxy=proxy, transaction_timeout=transaction_timeout, **kwargs)

    def _create_session(self) -> RelaySession:
        return RelaySession(self.loop)

    def _create_envelope(self) -> RelayEnvelope:
        self._retire("reset")
        self._end_transaction_deadline()
        return RelayEnvelope()

    def _retire(self, reason: str) -> None:
        envelope = getattr(self, "envelope", None)
        if isinstance(envelope, RelayEnvelope) and envelope.txn is not None:
            self._relay_handler.retire(envelope.txn, reason)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # Raises AddressSyntaxError for a path the parser would change: aiosmtpd's command
        # loop hands it to handle_exception, which answers with its reply.
        return parse_path(arg, self._path_role, local_part_limit=self.local_part_limit,
                          full_parser=super()._getaddr)

    @functools.wraps(SMTP.smtp_MAIL)  # keeps aiosmtpd's HELP text for MAIL
    async def smtp_MAIL(self, arg: str | None) -> None:
        self._path_role = "sender"
        await super().smtp_MAIL(arg)
        self._start_transaction_deadline()

    @functools.wraps(SMTP.smtp_RCPT)  # keeps aiosmtpd's HELP text for RCPT
    async def smtp_RCPT(self, arg: str | None) -> None:
        self._path_role = "recipient"
        await super().smtp_RCPT(arg)

    # -- the connection -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self._record_command_lines()
            metrics = self._relay_handler.services.metrics
            metrics.connections(self._listener).inc()
            self._open_gauge = metrics.connections_open(self._listener)
            self._open_gauge.inc()
            self._admit_peer(transport)
        elif self.tls_active:
            self._restore_client_peer()
            self._log("session.starttls")

    def _record_command_lines(self) -> None:
        """Keep the last line aiosmtpd's command loop reads, as read (the command guard
        needs what aiosmtpd strips). One more coroutine frame per read, the DATA reader's
        bulk reads included: a microsecond next to a network read."""
        reader = self._reader
        read_until = reader.readuntil

        async def readuntil(separator: bytes = b"\n") -> bytes:
            line = await read_until(separator)
            self._command_line = line
            return line
        reader.readuntil = readuntil  # type: ignore[method-assign, assignment]

    def connection_lost(self, error: Exception | None) -> None:
        if self._open_gauge is not None:
            self._open_gauge.dec()
            self._open_gauge = None
        super().connection_lost(error)
        self._retire("disconnect")
        self._end_admission()

    def eof_received(self) -> bool | None:
        super().eof_received()  # cancels aiosmtpd's connection task
        # Always close on EOF: the connection task is cancelled, so nothing would answer a
        # half-closed client anyway. aiosmtpd keeps the transport open (True) and relies on
        # the cancelled task to close the writer; on uvloop the EOF of a connect-and-close
        # (a TCP health check) arrives before that task has run once, its cancellation then
        # skips the close, and the connection's slot and descriptor leaked for good.
        return False

    async def _handle_client(self) -> None:
        try:
            await super()._handle_client()
        except ConnectionError as exc:
            # aiosmtpd re-raises a reset out of its task, where asyncio would report it as
            # "Task exception was never retrieved" at error level.
            self._log("session.lost", during="command", error=type(exc).__name__)

    # -- replies ------------------------------------------------------------------------------
    async def push(self, status: str | bytes) -> None:
        # Every reply ends the relay's work on a command: the client's idle time starts now.
        self._client_active()
        if self._client_gone():
            # The client is gone (or the relay closed on it): nothing can be answered, and
            # uvloop raises RuntimeError on a write to a closed transport. Yield once, so
            # that connection_lost (which ends aiosmtpd's command loop) and a pending
            # cancellation can arrive: the loop's next read may fail without suspending.
            self._reply_logged = False
            await asyncio.sleep(0)
            return
        if not self._reply_logged and status[:1] in ("4", "5", b"4", b"5"):
            self._log_protocol_refusal(status)
        self._reply_logged = False
        await super().push(status)  # type: ignore[type-var]

    def _log_protocol_refusal(self, status: str | bytes) -> None:
        """A refusal aiosmtpd wrote itself (sequence, syntax, unknown command), which the
        relay's hooks never saw: one line for it, without the client's text."""
        text = status.decode("ascii", "replace") if isinstance(status, bytes) else status
        code = int(text[:3]) if text[:3].isdigit() else None
        self._log("command.refused", smtp_code=code, reply=_redact_reply(text))

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        status = await super()._call_handler_hook(command, *args)
        # The hooks log their own refusals (mail.refused, rcpt.refused, delivery.finished).
        self._reply_logged = status is not MISSING
        return status

    # -- STARTTLS and errors ------------------------------------------------------------------
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS with a deadline of its own on the handshake: a client that
        sends anything but a TLS handshake would otherwise hold the connection until the idle
        timeout (the relay waits on the handshake, not on the client's reads)."""
        if self.tls_active:
            await self.push(await self.handle_exception(TlsAlreadyActiveError()))
            return
        try:
            async with asyncio.timeout(self._tls_handshake_timeout):
                await super().smtp_STARTTLS(arg)
        except TimeoutError:
            self._log("tls.failed", reason="handshake_timeout",
                      seconds=self._tls_handshake_timeout)
            # After "220 Ready to start TLS" the client expects TLS records: no clear-text
            # reply can reach it; close.
            self._close_transports()

    def _close_transports(self) -> None:
        if self.transport is not None:
            self.transport.close()
        original = cast("asyncio.Transport | None", self._original_transport)
        if original is not None:
            original.abort()

    def _abort_transports(self) -> None:
        for transport in (self.transport, self._original_transport):
            if transport is not None:
                cast("asyncio.Transport", transport).abort()

    async def handle_exception(self, error: Exception) -> str:
        """Exceptions out of aiosmtpd's command loop. The relay's refusals and the client's
        own misbehaviour (a failed TLS handshake, a connection gone mid-reply) are named
        lines without a traceback; anything else is a bug, logged by the handler."""
        self._reply_logged = True
        if isinstance(error, CommandSyntaxError):
            error.log_refusal(self.session_log, "command.refused", level=self._level,
                              command=error.command, reason=error.reason)
            return error.reply
        if isinstance(error, RelayError):
            role = getattr(error, "role", None)
            event = ("mail.refused" if role == "sender" else
                     "rcpt.refused" if role == "recipient" else "command.refused")
            error.log_refusal(self.session_log, event, level=self._level, reason=error.reason)
            return error.reply
        if isinstance(error, TLSSetupException):
            cause = error.__cause__
            self._log("tls.failed", reason=_tls_reason(cause),
                      error=type(cause).__name__ if cause else None)
            return InternalError().reply  # aiosmtpd closes the connection instead
        if (isinstance(error, asyncio.IncompleteReadError | ConnectionError)
                or self.transport is None or self.transport.is_closing()):
            # The client went away: an end of file in the middle of a line, a reset, or,
            # while the relay answered it, asyncio's TLS layer raising from inside the write
            # (AttributeError, TypeError). Nothing is wrong with the relay. Drop the
            # connection now: aiosmtpd's loop reads again until connection_lost, and a read
            # after the end of file fails at once, so waiting for a graceful close (a
            # client that does not read can delay it forever) would spin.
            self._log("session.lost", during="command", error=type(error).__name__)
            self._abort_transports()
            return InternalError().reply
        return await self._relay_handler.handle_exception(error)


def _redact_reply(text: str) -> str:
    # aiosmtpd quotes the client's command in '500 Error: command "X" not recognized'; a
    # client that sends its password as a line would have it logged.
    return _QUOTED.sub('"…"', text.strip())[:120]


def _tls_reason(cause: BaseException | None) -> str:
    """A short name for why a handshake failed: OpenSSL's reason (WRONG_VERSION_NUMBER,
    NO_SHARED_CIPHER, UNSUPPORTED_PROTOCOL...), else the exception's class."""
    if isinstance(cause, ssl.SSLError) and cause.reason:
        return str(cause.reason).lower()
    return type(cause).__name__ if cause is not None else "unknown"


def _guard(name: str, method: Any) -> Any:
    """``method`` (an smtp_* command) behind the relay's command-line rules
    (``relay/smtp/syntax.py``): invalid UTF-8 or a control character is refused before
    aiosmtpd parses anything."""
    command = name.removeprefix("smtp_")

    @functools.wraps(method)
    async def guarded(self: RelaySMTP, arg: str | None) -> None:
        problem = command_problem(command, arg, self._command_line)
        if problem is not None:
            await self.push(await self.handle_exception(problem))
            return
        await method(self, arg)
    return guarded


for _name in [n for n in dir(RelaySMTP) if n.startswith("smtp_")]:
    setattr(RelaySMTP, _name, _guard(_name, getattr(RelaySMTP, _name)))
del _name


if TYPE_CHECKING:
    def _serves_the_hooks(server: RelaySMTP) -> SessionServer:
        """For mypy: RelaySMTP provides everything the hooks use of it (``SessionServer``)."""
        return server
