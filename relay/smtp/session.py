"""The per-connection and per-transaction state aiosmtpd carries, and the server side the
hooks see (a leaf: nothing of the smtp package is imported here).
"""

from __future__ import annotations

from typing import Any

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

