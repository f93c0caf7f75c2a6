"""The per-connection and per-transaction state aiosmtpd carries, and ``SessionServer``: the
part of the protocol object the hooks may use. The hooks see the server only through that
Protocol, so ``hooks`` never imports ``protocol`` (which imports the hooks).
"""

from __future__ import annotations

from typing import Any, Protocol

import structlog
from aiosmtpd.smtp import Envelope, Session

from relay.message.wire import WireMessage
from relay.smtp.transaction import Transaction

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
        # The body in wire form, set by RelaySMTP.smtp_DATA (envelope.content stays None).
        self.message: WireMessage | None = None



class SessionServer(Protocol):
    """What ``RelayHandler``'s hooks use of the ``RelaySMTP`` serving the connection."""

    AuthLoginUsernameChallenge: str
    AuthLoginPasswordChallenge: str
    client_ip: str | None
    session_log: structlog.typing.FilteringBoundLogger

    @property
    def tls_active(self) -> bool: ...

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> Any: ...

    def accept_proxy(self, data: Any) -> bool: ...

    def mark_reply_logged(self) -> None: ...
