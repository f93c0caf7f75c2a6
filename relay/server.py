"""The aiosmtpd ``SMTP`` subclass and the listeners (STYLE §1 step 1).

One ``RelaySMTP`` per connection. It gives each connection a session id and a bound logger,
hangs a ``Transaction`` on the envelope, and retires an unfinished transaction whenever
aiosmtpd drops its envelope (RSET, HELO/EHLO, STARTTLS, end of DATA) or the connection ends.
Served with ``loop.create_server`` on the relay's own loop (not aiosmtpd's threaded
Controller), so the Redis client and the upstream pool share one event loop.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import ssl
from typing import Any

import structlog
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from relay import errors
from relay.handler import RelayHandler
from relay.settings import Endpoint
from relay.smtpdata import DataProblem, read_data
from relay.transaction import Transaction
from relay.wire import WireMessage

log = structlog.get_logger()

IDENT = "Command Email Relay"
# The common shape of a MAIL FROM / RCPT TO argument: <dot-atom@hostname> and parameters.
# For it, aiosmtpd's parser (email._header_value_parser, a class created per call) gives the
# address unchanged; anything else still goes through that parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_SIMPLE_PATH = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*)>")
# aiosmtpd counts every command against this budget per connection; only AUTH is limited
# (a guard against password guessing on one connection), the rest effectively unbounded.
COMMAND_LIMITS = {"AUTH": 5, "*": 10**9}


class RelaySession(Session):
    auth_data: Any


class RelayEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.txn: Transaction | None = None
        # The body in wire form, set by RelaySMTP.smtp_DATA (envelope.content stays None).
        self.message: WireMessage | None = None


class RelaySMTP(SMTP):
    def __init__(self, handler: RelayHandler, *, implicit_tls: bool, **kwargs: Any) -> None:
        self.session_id = secrets.token_hex(6)
        self.session_log: structlog.typing.FilteringBoundLogger = log.bind(
            session_id=self.session_id)
        self._relay_handler = handler
        self._implicit_tls = implicit_tls
        super().__init__(handler, **kwargs)

    @property
    def tls_active(self) -> bool:
        return self._implicit_tls or self._tls_protocol is not None

    def _create_session(self) -> RelaySession:
        return RelaySession(self.loop)

    def _create_envelope(self) -> RelayEnvelope:
        self._retire("reset")
        return RelayEnvelope()

    def _retire(self, reason: str) -> None:
        envelope = getattr(self, "envelope", None)
        if isinstance(envelope, RelayEnvelope) and envelope.txn is not None:
            self._relay_handler.retire(envelope.txn, reason)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        simple = _SIMPLE_PATH.match(arg)
        # The parser also eats the blanks after ">" (CFWS); a comment there goes to it.
        rest = arg[simple.end():].lstrip(" \t") if simple else ""
        if simple is None or rest.startswith("(") or (
                self.local_part_limit
                and len(simple.group(1).rpartition("@")[0]) > self.local_part_limit):
            return super()._getaddr(arg)
        return simple.group(1), rest

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the body read in bulk and kept in wire form (relay.smtpdata);
        the checks before the 354 and the replies are aiosmtpd's own."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert isinstance(envelope, RelayEnvelope)
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
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
            await self.push(errors.LINE_TOO_LONG if read.problem is DataProblem.LINE_TOO_LONG
                            else errors.DATA_TOO_MUCH)
            return
        envelope.message = WireMessage(read.chunks, clean=read.clean)
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            peer = transport.get_extra_info("peername")
            self.session_log = self.session_log.bind(peer=peer[0] if peer else None)
            self.session_log.info("session.opened", tls=self._implicit_tls)
        elif self.tls_active:
            self.session_log.info("session.starttls")

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._retire("disconnect")
        self.session_log.info("session.closed")


def make_factory(handler: RelayHandler, *, hostname: str, data_size_limit: int,
                 idle_timeout: float, tls_context: ssl.SSLContext | None,
                 allow_plaintext_auth: bool, implicit_tls: bool) -> Any:
    """A protocol factory for ``loop.create_server``."""
    def factory() -> RelaySMTP:
        return RelaySMTP(
            handler,
            implicit_tls=implicit_tls,
            hostname=hostname,  # explicit, or aiosmtpd would call socket.getfqdn() (DNS)
            ident=IDENT,
            data_size_limit=data_size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=None if implicit_tls else tls_context,
            timeout=idle_timeout,
            # AUTH is enforced by handle_MAIL (530 5.7.0) rather than aiosmtpd's
            # auth_required, which warns on every connection when TLS is not required.
            auth_required=False,
            # On an implicit-TLS listener the whole connection is encrypted already.
            auth_require_tls=not (allow_plaintext_auth or implicit_tls),
            command_call_limit=COMMAND_LIMITS,
        )
    return factory


async def listen(factory: Any, endpoint: Endpoint,
                 ssl_context: ssl.SSLContext | None = None,
                 sock: socket.socket | None = None) -> asyncio.Server:
    """Listen on ``endpoint``, or on ``sock`` when a supervisor bound it for its workers."""
    loop = asyncio.get_running_loop()
    if sock is not None:
        return await loop.create_server(factory, sock=sock, ssl=ssl_context)
    return await loop.create_server(factory, host=endpoint.host, port=endpoint.port,
                                    ssl=ssl_context, reuse_address=True)
