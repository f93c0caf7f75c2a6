"""The aiosmtpd ``SMTP`` subclass and the listeners (STYLE §1 step 1).

One ``RelaySMTP`` per connection. It gives each connection a session id and a bound logger,
hangs a ``Transaction`` on the envelope, and retires an unfinished transaction whenever
aiosmtpd drops its envelope (RSET, HELO/EHLO, STARTTLS, end of DATA) or the connection ends.
Served with ``loop.create_server`` on the relay's own loop (not aiosmtpd's threaded
Controller), so the Redis client and the upstream pool share one event loop.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from typing import Any

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session
from prometheus_client import Gauge

from relay.handler import RelayHandler
from relay.settings import Endpoint
from relay.transaction import Transaction

log = structlog.get_logger()

IDENT = "Command Email Relay"
# aiosmtpd counts every command against this budget per connection; only AUTH is limited
# (a guard against password guessing on one connection), the rest effectively unbounded.
COMMAND_LIMITS = {"AUTH": 5, "*": 10**9}


class RelaySession(Session):
    auth_data: Any


class RelayEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.txn: Transaction | None = None


class RelaySMTP(SMTP):
    def __init__(self, handler: RelayHandler, *, implicit_tls: bool, **kwargs: Any) -> None:
        self.session_id = secrets.token_hex(6)
        self.session_log: structlog.typing.FilteringBoundLogger = log.bind(
            session_id=self.session_id)
        self._relay_handler = handler
        self._implicit_tls = implicit_tls
        self._listener = "smtps" if implicit_tls else "starttls"
        self._open_gauge: Gauge | None = None  # the gauge this connection was counted in
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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            metrics = self._relay_handler.services.metrics
            metrics.connections(self._listener).inc()
            self._open_gauge = metrics.connections_open(self._listener)
            self._open_gauge.inc()
            peer = transport.get_extra_info("peername")
            self.session_log = self.session_log.bind(peer=peer[0] if peer else None)
            self.session_log.info("session.opened", tls=self._implicit_tls)
        elif self.tls_active:
            self.session_log.info("session.starttls")

    def connection_lost(self, error: Exception | None) -> None:
        if self._open_gauge is not None:
            self._open_gauge.dec()
            self._open_gauge = None
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
                 ssl_context: ssl.SSLContext | None = None) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, host=endpoint.host, port=endpoint.port,
                                    ssl=ssl_context, reuse_address=True)
