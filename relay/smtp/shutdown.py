"""Graceful shutdown of the SMTP sessions (STYLE §2): the relay's side of a SIGTERM.

``SessionTracker`` wraps the listeners' protocol factory, so it knows every open session
without the session knowing about it. ``drain`` then does what operators expect of a mail
service being restarted:

* a session between transactions is told ``421 4.3.2`` and closed at once (RFC 5321 §3.8);
* a session in a transaction (after MAIL FROM, while receiving DATA, while the upstream
  answers) may finish it, and is closed with the same ``421`` as soon as it is between
  transactions again;
* whatever is still open when the drain timeout runs out is cut: its transaction is retired,
  which refunds the reservations (or keeps them counted when the message may already have
  reached the upstream, exactly as for a client that disconnects).

The listeners are closed before ``drain`` is called, and the handler refuses new MAIL FROM
while draining, so no new transaction starts meanwhile.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import cast

import structlog

from relay.errors import ShuttingDownError
from relay.smtp.protocol import RelaySMTP
from relay.smtp.session import RelayEnvelope

log = structlog.get_logger()

# How often a drain looks for sessions that finished their transaction. aiosmtpd gives no
# event for "between transactions"; a short poll costs nothing next to a shutdown.
_POLL_SECONDS = 0.05


def _idle(session: RelaySMTP) -> bool:
    """Between transactions: no MAIL FROM accepted (aiosmtpd resets the envelope after RSET,
    EHLO and the end of DATA)."""
    envelope = session.envelope
    return envelope is None or envelope.mail_from is None


def _transport(session: RelaySMTP) -> asyncio.Transport | None:
    # aiosmtpd types it as a BaseTransport; it is a stream transport (uvloop's is not an
    # asyncio.Transport subclass, so no isinstance check).
    return cast("asyncio.Transport | None", session.transport)


def _connected(session: RelaySMTP) -> bool:
    return session.transport is not None


class SessionTracker:
    def __init__(self) -> None:
        # Weak: a session that ended is forgotten without any bookkeeping on its side.
        self._sessions: weakref.WeakSet[RelaySMTP] = weakref.WeakSet()
        self._closing: weakref.WeakSet[RelaySMTP] = weakref.WeakSet()

    def track(self, factory: Callable[[], RelaySMTP]) -> Callable[[], RelaySMTP]:
        """``factory``, noting each session it makes."""
        def tracked() -> RelaySMTP:
            session = factory()
            self._sessions.add(session)
            return session
        return tracked

    def open_sessions(self) -> list[RelaySMTP]:
        """Sessions whose connection_made ran and connection_lost did not. (One accepted
        over TLS whose handshake never finishes never gets there, and must not hold up a
        drain.)"""
        return [s for s in self._sessions if _connected(s)]

    def _goodbye(self, session: RelaySMTP) -> None:
        transport = _transport(session)
        if session in self._closing or transport is None:
            return
        self._closing.add(session)
        # After STARTTLS ``transport`` is the TLS layer: the reply is encrypted like any other.
        transport.write(f"{ShuttingDownError().reply}\r\n".encode())
        transport.close()

    async def drain(self, seconds: float) -> int:
        """Close idle sessions now and busy ones once idle, for up to ``seconds``; then cut
        the rest. Returns how many were cut."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        # A connection accepted just before the listener closed gets connection_made on the
        # next loop iteration: let it, so that it is greeted with the 421 too.
        await asyncio.sleep(0)
        while True:
            busy = []
            for session in self.open_sessions():
                if _idle(session):
                    self._goodbye(session)
                elif session not in self._closing:
                    busy.append(session)
            if not busy:
                break
            if loop.time() >= deadline:
                return self._cut(busy)
            await asyncio.sleep(_POLL_SECONDS)
        return 0

    def _cut(self, sessions: list[RelaySMTP]) -> int:
        cut = 0
        for session in sessions:
            if session.transport is None:
                continue
            envelope = session.envelope
            txn = envelope.txn if isinstance(envelope, RelayEnvelope) else None
            session.session_log.warning("session.cut", reason="drain_timeout",
                                        txn_id=txn.txn_id if txn else None)
            # Retire first, so the log names the shutdown rather than a disconnect; the abort
            # runs in its own task and is idempotent (connection_lost retires again).
            session._retire("shutdown")
            self._goodbye(session)
            # close() would wait for a client that is not reading (mid-DATA) to take the
            # 421; abort() drops the connection now.
            transport = _transport(session)
            if transport is not None:
                transport.abort()
            cut += 1
        return cut

    async def wait_closed(self, seconds: float) -> None:
        """Until every session's connection_lost ran (its transaction retired); after
        ``seconds``, connections still closing (a client that does not read) are dropped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        aborted = False
        while True:
            left = [s for s in self._sessions if _connected(s)]
            if not left:
                return
            if loop.time() >= deadline:
                if aborted:
                    return
                # connection_lost follows an abort within a loop iteration or two (TLS
                # layers add one): give it a moment more.
                aborted, deadline = True, loop.time() + 1
                for session in left:
                    transport = _transport(session)
                    if transport is not None:
                        transport.abort()
            await asyncio.sleep(_POLL_SECONDS)
