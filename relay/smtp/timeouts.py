"""The session's timers: aiosmtpd's idle timer, capped by a per-transaction deadline,
answering 421 4.4.2 when either runs out (RFC 5321 §4.5.3.2).

Only the client's silence counts: while the relay itself works (Redis, the upstream, a
password check, each bounded by its own timeout) the timer looks again later rather than
cut the session. A transaction (MAIL FROM to the end of DATA) gets ``transaction_timeout``
however busy the client keeps the connection.
"""

from __future__ import annotations

from typing import Any

from relay.errors import SessionTimeoutError
from relay.smtp.connection import ConnectionBase
from relay.smtp.session import RelayEnvelope

# How often a session whose transaction deadline passed during the relay's own work looks
# whether that work has ended (then the client is cut).
_BUSY_RECHECK_SECONDS = 0.25


class TimeoutMixin(ConnectionBase):
    """The timer part of ``RelaySMTP``: ``_client_active`` restarts the idle clock,
    ``_start_transaction_deadline`` and ``_end_transaction_deadline`` bound a transaction."""

    def __init__(self, handler: Any, *, transaction_timeout: float = 600.0,
                 **kwargs: Any) -> None:
        self._transaction_timeout = transaction_timeout
        self._txn_deadline: float | None = None  # loop time when the open transaction ends
        # The idle clock: loop time of the last byte from the client or the last reply to it,
        # whichever is later. The timer compares against it rather than being re-armed per
        # read, so counting a busy client as active costs a float store per network read.
        self._last_activity = 0.0
        super().__init__(handler, **kwargs)

    def _client_active(self) -> None:
        """A byte came from the client, or a reply went to it: its idle time starts now."""
        self._last_activity = self.loop.time()

    def data_received(self, data: bytes) -> None:
        self._client_active()
        super().data_received(data)

    def _start_transaction_deadline(self) -> None:
        envelope = self.envelope
        if (self._txn_deadline is None and isinstance(envelope, RelayEnvelope)
                and envelope.txn is not None):
            # A transaction began: from here to the end of DATA it has transaction_timeout,
            # however busy the client keeps the connection.
            self._txn_deadline = self.loop.time() + self._transaction_timeout
            self._reset_timeout()

    def _end_transaction_deadline(self) -> None:
        if self._txn_deadline is not None:
            # The transaction is over: its deadline no longer applies; a fresh idle period.
            self._txn_deadline = None
            self._reset_timeout()

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd arms one timer at each command (and for the PROXY header). Here it is a
        # check, not a verdict: _timeout_cb looks at what the session is doing when it fires.
        self._last_activity = self.loop.time()
        seconds = duration or self._timeout_duration
        if self._txn_deadline is not None:
            seconds = min(seconds, max(self._txn_deadline - self.loop.time(), 0.001))
        super()._reset_timeout(seconds)

    def _waiting_for_client(self) -> bool:
        """Whether the session is blocked on the client: reading its next bytes, or writing
        to it while it does not read. Anything else is the relay's own work (Redis, the
        upstream, a password check), which must never count against the client."""
        reader_waits = getattr(self._reader, "_waiter", None) is not None
        return reader_waits or bool(getattr(self, "_paused", False))

    def _timeout_cb(self) -> None:
        now = self.loop.time()
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
