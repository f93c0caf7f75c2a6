"""Connection admission, before the greeting: the PROXY header of a trusted balancer, then
the connection limits for the real client.

With PROXY protocol on, only a trusted balancer may connect and its header names the real
client (``relay/smtp/proxy.py``); then the limits on open connections apply to that client.
A refusal is a 421 in place of the greeting, then the connection closes (RFC 5321 §3.1).

The limits are per process on purpose: they protect this process's memory and file
descriptors and need no cleanup when a process dies; with ``serve --workers N`` each worker
has its own. A client is keyed by ``relay.identity.throttle.client_key`` (IPv4 address,
IPv6 /64).
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from typing import Any

from aiosmtpd.smtp import SMTP

from relay.errors import RelayError, TooManyConnectionsError, UntrustedPeerError
from relay.identity.throttle import client_key
from relay.smtp.connection import ConnectionBase
from relay.smtp.proxy import ProxyHeaderError, ProxyPolicy, client_from_header, normalize_ip


class ConnectionLimiter:
    """Open connections in this process, in total and per client key. A limit of 0 is off."""

    def __init__(self, *, total: int, per_client: int) -> None:
        self.total_limit = total
        self.per_client_limit = per_client
        self._open: Counter[str] = Counter()
        self.total = 0

    def acquire(self, client: str) -> None:
        """Count one more connection from ``client`` (a ``client_key``).

        Raises TooManyConnectionsError (nothing counted) when a limit would be exceeded.
        """
        if self.total_limit and self.total >= self.total_limit:
            raise TooManyConnectionsError("total", self.total_limit)
        if self.per_client_limit and self._open[client] >= self.per_client_limit:
            raise TooManyConnectionsError("ip", self.per_client_limit)
        self._open[client] += 1
        self.total += 1

    def release(self, client: str) -> None:
        """Forget one connection counted by ``acquire``."""
        self._open[client] -= 1
        if self._open[client] <= 0:
            del self._open[client]
        self.total -= 1


class _ProxyPhase(enum.Enum):
    OFF = "off"  # PROXY protocol not in use on this listener
    WAITING = "waiting"  # trusted peer, header not yet accepted
    DONE = "done"  # accepted, refused or given up


class AdmissionMixin(ConnectionBase):
    """The admission part of ``RelaySMTP``: ``_admit_peer`` when the connection is made,
    ``accept_proxy`` for a trusted header, ``_end_admission`` when it is lost."""

    def __init__(self, handler: Any, *, connections: ConnectionLimiter | None = None,
                 proxy: ProxyPolicy | None = None, **kwargs: Any) -> None:
        self._client_peer: tuple[str, int] | None = None  # session.peer again after STARTTLS
        self._peer_port: int | None = None
        self._connections = connections or ConnectionLimiter(total=0, per_client=0)
        self._counted_as: str | None = None  # the client key this connection holds
        self._refusal: RelayError | None = None  # answered instead of the greeting
        self._proxy = proxy
        self._proxy_phase = _ProxyPhase.OFF if proxy is None else _ProxyPhase.WAITING
        self._proxy_bytes = 0  # bytes seen before the header was complete
        super().__init__(handler, proxy_protocol_timeout=proxy.timeout if proxy else None,
                         **kwargs)

    def _admit_peer(self, transport: asyncio.BaseTransport) -> None:
        """The connection is made: admit its peer now, or wait for the PROXY header of a
        trusted balancer, or refuse an untrusted one (the refusal is answered in place of
        the greeting)."""
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

    def _restore_client_peer(self) -> None:
        if self._client_peer is not None and self.session is not None:
            # aiosmtpd starts a new Session after STARTTLS, with the balancer as its peer.
            # aiosmtpd types peer as str; it holds the (host, port) tuple asyncio gives.
            self.session.peer = self._client_peer  # type: ignore[assignment]

    def _end_admission(self) -> None:
        """The connection is lost: say why a PROXY header never came, free the slot."""
        if self._proxy_phase is _ProxyPhase.WAITING:
            self._proxy_phase = _ProxyPhase.DONE
            self._log_missing_header()
        if self._counted_as is not None:
            self._connections.release(self._counted_as)
            self._counted_as = None
            self._log("session.closed")

    def eof_received(self) -> bool | None:
        closing = super().eof_received()  # cancels aiosmtpd's connection task
        if self._proxy_phase is _ProxyPhase.WAITING:
            # aiosmtpd would keep a half-closed connection until the PROXY timeout; the
            # balancer is gone, so end it now.
            self._proxy_phase = _ProxyPhase.DONE
            self._log_missing_header()
        return closing

    def data_received(self, data: bytes) -> None:
        if self._proxy_phase is _ProxyPhase.WAITING:
            self._proxy_bytes += len(data)
        super().data_received(data)

    def _timeout_cb(self) -> None:
        if self._proxy_phase is not _ProxyPhase.WAITING:
            super()._timeout_cb()  # type: ignore[no-untyped-call]
            return
        self._proxy_phase = _ProxyPhase.DONE
        self.session_log.warning("proxy.refused", reason="no PROXY header in time",
                                 seconds=self._proxy.timeout if self._proxy else None)
        # aiosmtpd's own: close. The idle and transaction rules (relay/smtp/timeouts.py) are
        # for a session that was greeted.
        SMTP._timeout_cb(self)  # type: ignore[no-untyped-call]

    async def _handle_client(self) -> None:
        # aiosmtpd's connection task: refuse here rather than greet, when admission failed.
        if self._refusal is not None:
            self._refuse(self._refusal)
            return
        await super()._handle_client()

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
