"""A client TLS context that resumes its previous session, for the load generator's
``--resume`` (a returning client: the CRM's mailer reconnecting).

aiosmtplib's ``starttls`` cannot pass ``session=``, but both asyncio's and uvloop's SSL
protocols create their SSLObject through ``sslcontext.wrap_bio(incoming, outgoing,
server_side=…, server_hostname=…)``: this subclass adds the session it was last given. One
instance per load-generator session (a session must be offered to the context that made
it), so concurrent sessions never share one.
"""

from __future__ import annotations

import ssl
from typing import Any


class ResumingContext(ssl.SSLContext):
    """``wrap_bio`` offers ``self.offer``, the session of the previous connection."""

    offer: ssl.SSLSession | None = None

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        return super().wrap_bio(incoming, outgoing, server_side=server_side,
                                server_hostname=server_hostname,
                                session=session if session is not None else self.offer)

    def keep(self, ssl_object: Any) -> tuple[bool, bool]:
        """After the handshake and a reply read over TLS (a TLS 1.3 ticket follows the
        handshake; it is in by then): whether this connection offered a session and whether
        it resumed; its session is offered next time."""
        offered = self.offer is not None
        resumed = bool(ssl_object is not None and ssl_object.session_reused)
        self.offer = ssl_object.session if ssl_object is not None else None
        return offered, resumed


def resuming_context() -> ResumingContext:
    # The server's certificate is the bench's own self-signed one; traffic stays on loopback.
    context = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
