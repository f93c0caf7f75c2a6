"""What every part of one SMTP connection shares: the base of ``RelaySMTP``.

``RelaySMTP`` (``relay/smtp/protocol.py``) is aiosmtpd's ``SMTP`` with one job per module,
each a mixin over this base: admission before the greeting (``relay/smtp/admission.py``),
the idle and transaction timers (``relay/smtp/timeouts.py``), DATA (``relay/smtp/data.py``).
This holds what they all use: the session id and its logger, the real client's address,
whether the next refusal is logged already, and the direct write of a reply.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, cast

import structlog
from aiosmtpd.smtp import SMTP

from relay.errors import RefusalLevel, RelayError
from relay.smtp.setup import init_smtp

log = structlog.get_logger()


class ConnectionBase(SMTP):
    def __init__(self, handler: Any, *, implicit_tls: bool, **kwargs: Any) -> None:
        self.session_id = secrets.token_hex(6)
        self.session_log: structlog.typing.FilteringBoundLogger = log.bind(
            session_id=self.session_id)
        self._implicit_tls = implicit_tls
        # The real client: the socket's peer, or the source a trusted PROXY header names.
        # Logs, connection limits and AUTH throttling all use it.
        self.client_ip: str | None = None
        self._quiet = False  # the balancer's own connection (a health check): debug logs only
        self._reply_logged = False  # the next refusal pushed was logged by the relay already
        # aiosmtpd's SMTP.__init__, with its class walks done once per listener (setup.py).
        init_smtp(self, handler, **kwargs)

    @property
    def tls_active(self) -> bool:
        return self._implicit_tls or self._tls_protocol is not None

    @property
    def _level(self) -> RefusalLevel:
        """The level of the session's life-cycle lines: debug for the balancer's own (health
        check) sessions, so that they do not drown the clients' lines."""
        return "debug" if self._quiet else "info"

    def _log(self, event: str, **fields: Any) -> None:
        """Session life-cycle lines; at debug for the balancer's own (health check) sessions."""
        getattr(self.session_log, self._level)(event, **fields)

    def mark_reply_logged(self) -> None:
        """The next reply is a refusal the caller has logged already (not again as
        command.refused)."""
        self._reply_logged = True

    def _write_reply(self, error: RelayError) -> None:
        # Written directly, not with push(): there is nothing to wait for, and the
        # connection may already be going away.
        # Duck-typed: uvloop's transports are not asyncio.WriteTransport subclasses, and an
        # isinstance check there silently dropped every 421 before the socket closed.
        transport = self.transport
        if transport is not None and not transport.is_closing():
            cast(asyncio.WriteTransport, transport).write(error.reply.encode("ascii") + b"\r\n")

    def _client_gone(self) -> bool:
        """Whether nothing more can be written to the client. After STARTTLS the writer's
        transport is the TLS layer, which does not notice that the socket under it died:
        look at both."""
        transport = self._writer.transport if self._writer is not None else None
        original = self._original_transport
        return (transport is None or transport.is_closing()
                or (original is not None and original.is_closing()))
