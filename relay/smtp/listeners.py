"""Listening sockets: the protocol factory for one listener and the server bound to it."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

import structlog

from relay.config.endpoints import Endpoint
from relay.smtp.admission import ConnectionLimiter
from relay.smtp.hooks import RelayHandler
from relay.smtp.protocol import RelaySMTP
from relay.smtp.proxy import ProxyPolicy
from relay.smtp.session import COMMAND_LIMITS, IDENT

log = structlog.get_logger()

# asyncio's default backlog is 100: a burst of clients connecting at once (a campaign
# starting, a balancer's pool refilling) overflows it, and the kernel drops their SYNs, which
# they resend after 1, 3, 7… seconds. The kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = socket.SOMAXCONN


def make_factory(handler: RelayHandler, *, hostname: str, data_size_limit: int,
                 idle_timeout: float, tls_context: ssl.SSLContext | None,
                 allow_plaintext_auth: bool, implicit_tls: bool,
                 connections: ConnectionLimiter | None = None,
                 proxy: ProxyPolicy | None = None,
                 transaction_timeout: float = 600.0,
                 tls_handshake_timeout: float = 10.0) -> Any:
    """A protocol factory for ``loop.create_server``. ``connections`` is shared by every
    listener of the process; ``proxy`` turns the PROXY protocol on."""
    def factory() -> RelaySMTP:
        return RelaySMTP(
            handler,
            implicit_tls=implicit_tls,
            connections=connections,
            proxy=proxy,
            transaction_timeout=transaction_timeout,
            tls_handshake_timeout=tls_handshake_timeout,
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
                 sock: socket.socket | None = None,
                 tls_handshake_timeout: float = 10.0) -> asyncio.Server:
    """Listen on ``endpoint``, or on ``sock`` when a supervisor bound it for its workers.
    With ``ssl_context`` (implicit TLS), a handshake gets ``tls_handshake_timeout`` seconds."""
    loop = asyncio.get_running_loop()
    tls: dict[str, Any] = {}
    if ssl_context is not None:
        tls = {"ssl": ssl_context, "ssl_handshake_timeout": tls_handshake_timeout}
    if sock is not None:
        return await loop.create_server(factory, sock=sock, backlog=LISTEN_BACKLOG, **tls)
    return await loop.create_server(factory, host=endpoint.host, port=endpoint.port,
                                    reuse_address=True, backlog=LISTEN_BACKLOG, **tls)

