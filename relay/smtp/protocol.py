"""The aiosmtpd ``SMTP`` subclass and the listeners (STYLE §1 step 1).

One ``RelaySMTP`` per connection. It gives each connection a session id and a bound logger,
hangs a ``Transaction`` on the envelope, and retires an unfinished transaction whenever
aiosmtpd drops its envelope (RSET, HELO/EHLO, STARTTLS, end of DATA) or the connection ends.
Served with ``loop.create_server`` on the relay's own loop (not aiosmtpd's threaded
Controller), so the Redis client and the upstream pool share one event loop.

Before the greeting it admits the connection: with PROXY protocol on, only a trusted
balancer may connect and its header names the real client (``relay/smtp/proxy.py``);
then the connection limits apply to that client (``relay/smtp/admission.py``). A refusal
is a 421 in place of the greeting. It also owns the timers: aiosmtpd's idle timer,
capped by a per-transaction deadline, answering 421 4.4.2 when either runs out.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import re
import secrets
import ssl
from typing import TYPE_CHECKING, Any, cast

import structlog
from aiosmtpd.smtp import MISSING, SMTP, TLSSetupException
from prometheus_client import Gauge

from relay import errors
from relay.errors import (
    CommandSyntaxError,
    InternalError,
    RefusalLevel,
    RelayError,
    SessionTimeoutError,
    TlsAlreadyActiveError,
    TooManyConnectionsError,
    UntrustedPeerError,
)
from relay.identity.throttle import client_key
from relay.message.wire import WireMessage
from relay.smtp.admission import ConnectionLimiter
from relay.smtp.data import DataProblem, read_data
from relay.smtp.hooks import RelayHandler
from relay.smtp.proxy import ProxyHeaderError, ProxyPolicy, client_from_header, normalize_ip
from relay.smtp.session import RelayEnvelope, RelaySession, SessionServer
from relay.smtp.syntax import command_problem, parse_path

log = structlog.get_logger()
_QUOTED = re.compile(r'"[^"]*"')
# How often a session whose transaction deadline passed during the relay's own work looks
# whether that work has ended (then the client is cut).
_BUSY_RECHECK_SECONDS = 0.25


class RelaySMTP(SMTP):
    def __init__(self, handler: RelayHandler, *, implicit_tls: bool,
                 connections: ConnectionLimiter | None = None, proxy: ProxyPolicy | None = None,
                 transaction_timeout: float = 600.0, tls_handshake_timeout: float = 10.0,
                 **kwargs: Any) -> None:
        self.session_id = secrets.token_hex(6)
        self.session_log: structlog.typing.FilteringBoundLogger = log.bind(
            session_id=self.session_id)
        self._relay_handler = handler
        self._implicit_tls = implicit_tls
        # -- client protections (relay/identity/throttle.py, relay/smtp/proxy.py) --
        # The real client: the socket's peer, or the source a trusted PROXY header names.
        # Logs, connection limits and AUTH throttling all use it.
        self.client_ip: str | None = None
        self._client_peer: tuple[str, int] | None = None  # session.peer again after STARTTLS
        self._peer_port: int | None = None
        self._connections = connections or ConnectionLimiter(total=0, per_client=0)
        self._counted_as: str | None = None  # the client key this connection holds
        self._refusal: RelayError | None = None  # answered instead of the greeting
        self._proxy = proxy
        self._proxy_phase = _ProxyPhase.OFF if proxy is None else _ProxyPhase.WAITING
        self._proxy_bytes = 0  # bytes seen before the header was complete
        self._quiet = False  # the balancer's own connection (a health check): debug logs only
        self._transaction_timeout = transaction_timeout
        self._txn_deadline: float | None = None  # loop time when the open transaction ends
        self._tls_handshake_timeout = tls_handshake_timeout
        # The idle clock: loop time of the last byte from the client or the last reply to it,
        # whichever is later. The timer compares against it rather than being re-armed per
        # read, so counting a busy client as active costs a float store per network read.
        self._last_activity = 0.0
        self._path_role = "sender"  # which path _getaddr is parsing (MAIL or RCPT)
        self._command_line: bytes | None = None  # the last command line, as read
        self._reply_logged = False  # the next refusal pushed was logged by the relay already
        self._listener = "smtps" if implicit_tls else "starttls"
        self._open_gauge: Gauge | None = None  # the gauge this connection was counted in
        super().__init__(handler, proxy_protocol_timeout=proxy.timeout if proxy else None,
                         **kwargs)

    @property
    def tls_active(self) -> bool:
        return self._implicit_tls or self._tls_protocol is not None

    def _create_session(self) -> RelaySession:
        return RelaySession(self.loop)

    def _create_envelope(self) -> RelayEnvelope:
        self._retire("reset")
        if self._txn_deadline is not None:
            # The transaction is over: its deadline no longer applies; a fresh idle period.
            self._txn_deadline = None
            self._reset_timeout()
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

    @functools.wraps(SMTP.smtp_RCPT)  # keeps aiosmtpd's HELP text for RCPT
    async def smtp_RCPT(self, arg: str | None) -> None:
        self._path_role = "recipient"
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the body read in bulk and kept in wire form (read_data);
        the checks before the 354 and the replies are aiosmtpd's own."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert isinstance(envelope, RelayEnvelope)
        if not envelope.rcpt_tos:
            await self.push(errors.DATA_NEED_RCPT)
            return
        if arg:
            await self.push(errors.DATA_SYNTAX)
            return
        await self.push(errors.DATA_START)
        try:
            read = await read_data(self._reader, size_limit=self.data_size_limit,
                                   line_limit=self.line_length_limit)
        except asyncio.CancelledError:
            # The connection was lost during DATA (aiosmtpd cancels this task).
            self.session_log.info("data.connection_lost")
            self._writer.close()
            raise
        if read.problem is not None:
            self.session_log.warning("data.refused", reason=read.problem.value, size=read.size)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            self.mark_reply_logged()
            await self.push(errors.LINE_TOO_LONG if read.problem is DataProblem.LINE_TOO_LONG
                            else errors.DATA_TOO_MUCH)
            return
        envelope.message = WireMessage(read.chunks, clean=read.clean)
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(errors.DATA_OK if status is MISSING else status)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self._record_command_lines()
            metrics = self._relay_handler.services.metrics
            metrics.connections(self._listener).inc()
            self._open_gauge = metrics.connections_open(self._listener)
            self._open_gauge.inc()
            peer = transport.get_extra_info("peername")
            self.client_ip = normalize_ip(peer[0]) if peer else None
            self._peer_port = int(peer[1]) if peer else None
            self.session_log = self.session_log.bind(peer=self.client_ip)
            if self._proxy is None:
                self._refusal = self._admit()
            elif self._proxy.trusts(self.client_ip):
                # aiosmtpd now reads the PROXY header, then calls handle_PROXY.
                self.session_log.debug("proxy.waiting")
            else:
                self._proxy_phase = _ProxyPhase.DONE
                self._refusal = UntrustedPeerError()
                self._refusal.log_refusal(self.session_log, "proxy.untrusted", level="warning")
        elif self.tls_active:
            if self._client_peer is not None and self.session is not None:
                # aiosmtpd starts a new Session after STARTTLS, with the balancer as its peer.
                # aiosmtpd types peer as str; it holds the (host, port) tuple asyncio gives.
                self.session.peer = self._client_peer  # type: ignore[assignment]
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
        if self._proxy_phase is _ProxyPhase.WAITING:
            self._proxy_phase = _ProxyPhase.DONE
            self._log_missing_header()
        if self._counted_as is not None:
            self._connections.release(self._counted_as)
            self._counted_as = None
            self._log("session.closed")

    def eof_received(self) -> bool | None:
        super().eof_received()  # cancels aiosmtpd's connection task
        if self._proxy_phase is _ProxyPhase.WAITING:
            # aiosmtpd would keep a half-closed connection until the PROXY timeout; the
            # balancer is gone, so end it now.
            self._proxy_phase = _ProxyPhase.DONE
            self._log_missing_header()
        # Always close on EOF: the connection task is cancelled, so nothing would answer a
        # half-closed client anyway. aiosmtpd keeps the transport open (True) and relies on
        # the cancelled task to close the writer; on uvloop the EOF of a connect-and-close
        # (a TCP health check) arrives before that task has run once, its cancellation then
        # skips the close, and the connection's slot and descriptor leaked for good.
        return False

    def data_received(self, data: bytes) -> None:
        self._last_activity = self.loop.time()
        if self._proxy_phase is _ProxyPhase.WAITING:
            self._proxy_bytes += len(data)
        super().data_received(data)

    # -- admission: connection limits, PROXY ------------------------------------------------
    @property
    def _level(self) -> RefusalLevel:
        """The level of the session's life-cycle lines: debug for the balancer's own (health
        check) sessions, so that they do not drown the clients' lines."""
        return "debug" if self._quiet else "info"

    def _log(self, event: str, **fields: Any) -> None:
        """Session life-cycle lines; at debug for the balancer's own (health check) sessions."""
        if self._quiet:
            self.session_log.debug(event, **fields)
        else:
            self.session_log.info(event, **fields)

    def _admit(self) -> RelayError | None:
        """Count the connection against the limits, now that the client is known."""
        key = client_key(self.client_ip or "unknown")
        try:
            self._connections.acquire(key)
        except TooManyConnectionsError as exc:
            exc.log_refusal(self.session_log, "session.refused", level="warning",
                            reason="too_many_connections", scope=exc.scope, limit=exc.limit)
            return exc
        self._counted_as = key
        self._log("session.opened", tls=self._implicit_tls)
        return None

    def _refuse(self, error: RelayError) -> None:
        """Answer ``error`` in place of the greeting and close (RFC 5321 §3.1: 421 then
        close)."""
        self._write_reply(error)
        if self.transport is not None:
            self.transport.close()

    def _write_reply(self, error: RelayError) -> None:
        # Written directly, not with push(): there is nothing to wait for, and the
        # connection may already be going away.
        # Duck-typed: uvloop's transports are not asyncio.WriteTransport subclasses, and an
        # isinstance check there silently dropped every 421 before the socket closed.
        transport = self.transport
        if transport is not None and not transport.is_closing():
            cast(asyncio.WriteTransport, transport).write(error.reply.encode("ascii") + b"\r\n")


    def accept_proxy(self, data: Any) -> bool:
        """Called by ``handle_PROXY`` with a well-formed header from a trusted balancer: take
        the client it names (or keep the balancer's own address for LOCAL/UNKNOWN), then
        apply the connection limits. False closes the connection."""
        self._proxy_phase = _ProxyPhase.DONE
        balancer = self.client_ip
        try:
            client = client_from_header(data)
        except ProxyHeaderError as exc:
            self.session_log.warning("proxy.refused", reason=str(exc), version=data.version)
            return False
        if client is None or (client.ip, client.port) == (balancer, self._peer_port):
            # The balancer speaks for itself: a health check. HAProxy's v2 checks say LOCAL;
            # its v1 checks name the check connection's own endpoints. Keep its address, log
            # quietly.
            self._quiet = True
            self.session_log = self.session_log.bind(proxy="local")
        else:
            self.client_ip = client.ip
            self._client_peer = (client.ip, client.port)
            if self.session is not None:  # the Received: header names the client
                # aiosmtpd types peer as str; it holds the (host, port) tuple asyncio gives.
                self.session.peer = self._client_peer  # type: ignore[assignment]
            self.session_log = self.session_log.bind(peer=client.ip, proxy=balancer)
        refusal = self._admit()
        if refusal is not None:
            self._refuse(refusal)
            return False
        return True

    def _log_missing_header(self) -> None:
        """The connection ended before a usable PROXY header: say why."""
        data = self.session.proxy_data if self.session is not None else None
        if data is not None:  # aiosmtpd parsed something invalid and closed
            self.session_log.warning("proxy.refused", reason=data.error or "invalid header",
                                     version=data.version)
        elif self._proxy_bytes:
            self.session_log.warning("proxy.refused",
                                     reason="connection closed inside the PROXY header")
        else:
            # Connect and close without a byte: a balancer's plain TCP health check.
            self.session_log.debug("proxy.closed_without_header")

    # -- timeouts -----------------------------------------------------------------------------
    @functools.wraps(SMTP.smtp_MAIL)  # keeps aiosmtpd's HELP text for MAIL
    async def smtp_MAIL(self, arg: str | None) -> None:
        self._path_role = "sender"
        await super().smtp_MAIL(arg)
        envelope = self.envelope
        if (self._txn_deadline is None and isinstance(envelope, RelayEnvelope)
                and envelope.txn is not None):
            # A transaction began: from here to the end of DATA it has transaction_timeout,
            # however busy the client keeps the connection.
            self._txn_deadline = self.loop.time() + self._transaction_timeout
            self._reset_timeout()

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd arms one timer at each command (and for the PROXY header). Here it is a
        # check, not a verdict: _timeout_cb looks at what the session is doing when it fires.
        self._last_activity = self.loop.time()
        seconds = duration or self._timeout_duration
        if self._txn_deadline is not None:
            seconds = min(seconds, max(self._txn_deadline - self.loop.time(), 0.001))
        super()._reset_timeout(seconds)

    def _client_gone(self) -> bool:
        """Whether nothing more can be written to the client. After STARTTLS the writer's
        transport is the TLS layer, which does not notice that the socket under it died:
        look at both."""
        transport = self._writer.transport if self._writer is not None else None
        original = self._original_transport
        return (transport is None or transport.is_closing()
                or (original is not None and original.is_closing()))

    def mark_reply_logged(self) -> None:
        """The next reply is a refusal the caller has logged already (not again as
        command.refused)."""
        self._reply_logged = True

    def _waiting_for_client(self) -> bool:
        """Whether the session is blocked on the client: reading its next bytes, or writing
        to it while it does not read. Anything else is the relay's own work (Redis, the
        upstream, a password check), which must never count against the client."""
        reader_waits = getattr(self._reader, "_waiter", None) is not None
        return reader_waits or bool(getattr(self, "_paused", False))

    def _timeout_cb(self) -> None:
        now = self.loop.time()
        if self._proxy_phase is _ProxyPhase.WAITING:
            self._proxy_phase = _ProxyPhase.DONE
            self.session_log.warning("proxy.refused", reason="no PROXY header in time",
                                     seconds=self._proxy.timeout if self._proxy else None)
            super()._timeout_cb()  # type: ignore[no-untyped-call]
            return
        if not self._waiting_for_client():
            # The relay is forwarding or waiting on Redis or the upstream (each bounded by
            # its own timeout): never cut its own work. Look again a full idle period
            # later, or by the transaction's deadline, and once that has passed, soon
            # after the work ends (the idle clock restarts with the reply).
            seconds = self._timeout_duration
            if self._txn_deadline is not None:
                seconds = min(seconds, max(self._txn_deadline - now, _BUSY_RECHECK_SECONDS))
            self._arm(seconds)
            return
        idle_left = self._last_activity + self._timeout_duration - now
        deadline_left = (self._txn_deadline - now) if self._txn_deadline is not None else None
        if idle_left > 0 and (deadline_left is None or deadline_left > 0):
            self._arm(idle_left if deadline_left is None else min(idle_left, deadline_left))
            return
        error = SessionTimeoutError()
        error.log_refusal(self.session_log, "session.timeout", level=self._level,
                          timeout="idle" if idle_left <= 0 else "transaction")
        self._write_reply(error)
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def _arm(self, seconds: float) -> None:
        """Re-arm aiosmtpd's timer without touching the idle clock."""
        super()._reset_timeout(max(seconds, 0.001))

    async def push(self, status: str | bytes) -> None:
        # Every reply ends the relay's work on a command: the client's idle time starts now.
        self._last_activity = self.loop.time()
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

    async def _handle_client(self) -> None:
        # aiosmtpd's connection task: refuse here rather than greet, when admission failed.
        if self._refusal is not None:
            self._refuse(self._refusal)
            return
        try:
            await super()._handle_client()
        except ConnectionError as exc:
            # aiosmtpd re-raises a reset out of its task, where asyncio would report it as
            # "Task exception was never retrieved" at error level.
            self._log("session.lost", during="command", error=type(exc).__name__)


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
    """``method`` (an smtp_* command) behind the relay's command-line rules (relay.
    commandsyntax): invalid UTF-8 or a control character is refused before aiosmtpd parses
    anything."""
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


class _ProxyPhase(enum.Enum):
    OFF = "off"  # PROXY protocol not in use on this listener
    WAITING = "waiting"  # trusted peer, header not yet accepted
    DONE = "done"  # accepted, refused or given up


if TYPE_CHECKING:
    def _serves_the_hooks(server: RelaySMTP) -> SessionServer:
        """For mypy: RelaySMTP provides everything the hooks use of it (``SessionServer``)."""
        return server
