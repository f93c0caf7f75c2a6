"""One message from MAIL FROM to its outcome: reserve, forward, commit or refund
(STYLE §1 steps 5-7).

A reservation counts against the limit from the moment it is made. The upstream's 250 after
DATA makes the transaction's units final (commit); a refusal, RSET, disconnect or timeout
gives them back (refund). If the connection dies after the message was sent and before the
upstream answered, the units stay counted: the count may be high by what was in flight,
never low. Every outcome ends in one canonical ``delivery.finished`` log line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

import structlog

from relay import events
from relay.accounts import Principal, User
from relay.errors import (
    PlanMisconfiguredError,
    QuotaExceededError,
    RelayError,
    TooManyRecipientsError,
    UnknownSenderError,
    UserDisabledError,
)
from relay.period import Period
from relay.policies import Policies
from relay.quota import QuotaStore, ReserveStatus
from relay.upstream import UpstreamOutcomeUnknownError, UpstreamSession


class State(Enum):
    OPEN = "open"          # recipients being added
    SENDING = "sending"    # DATA handed to the upstream, reply not yet known
    DONE = "done"          # committed, refunded or left counted; nothing more to do


@dataclass(frozen=True, slots=True)
class Limits:
    max_recipients: int


class Transaction:
    """Per-message state, created at MAIL FROM once the sender is resolved."""

    def __init__(self, *, txn_id: str, principal: Principal, user: User, sender: str,
                 period: Period, session: UpstreamSession, upstream_name: str,
                 quota: QuotaStore, events: events.EventLog, policies: Policies,
                 limits: Limits, log: structlog.typing.FilteringBoundLogger) -> None:
        self.txn_id = txn_id
        self.principal = principal
        self.user = user
        self.sender = sender
        self.period = period
        self.accepted: list[str] = []
        self.refused = 0
        self.state = State.OPEN
        self._session = session
        self._upstream_name = upstream_name
        self._quota = quota
        self._events = events
        self._policies = policies
        self._limits = limits
        self._next_rcpt = 0
        self._started = time.monotonic()
        self._last_used = 0
        self._last_limit = 0
        self.log = log.bind(txn_id=txn_id, user_id=user.id, plan=user.plan,
                            sender_domain=sender.rpartition("@")[2].lower(),
                            period=period.label)

    async def add_recipient(self, address: str, options: list[str]) -> None:
        """Reserve one unit, then mirror RCPT upstream; refund if the upstream refuses.

        Raises QuotaExceededError, TooManyRecipientsError, UserDisabledError,
        PlanMisconfiguredError, StoreUnavailableError or the upstream's refusal.
        """
        rcpt_domain = address.rpartition("@")[2].lower()
        try:
            await self._add_recipient(address, options)
        except RelayError as exc:
            self.refused += 1
            self.log.info("rcpt.refused", rcpt_domain=rcpt_domain, smtp_code=exc.code,
                          reason=type(exc).__name__, used=self._last_used,
                          limit=self._last_limit)
            raise
        self.log.info("rcpt.accepted", rcpt_domain=rcpt_domain, used=self._last_used,
                      limit=self._last_limit)

    async def _add_recipient(self, address: str, options: list[str]) -> None:
        if len(self.accepted) >= self._limits.max_recipients:
            raise TooManyRecipientsError()
        self._next_rcpt += 1
        rcpt_no = self._next_rcpt
        result = await self._quota.reserve(
            self.user.id, self.period.label, self.txn_id, rcpt_no,
            self._policies.plan_limits(), self._policies.notifications.threshold_argument)
        self._last_used, self._last_limit = result.used, result.limit
        if result.crossed:
            await self._publish(events.REACHED if result.crossed == 100 else events.THRESHOLD,
                                percent=result.crossed)
        if result.status is ReserveStatus.OVER_LIMIT:
            refusal = QuotaExceededError(self._policies.over_limit, used=result.used,
                                         limit=result.limit, resets_on=self.period.resets_on)
            await self._publish(events.REJECTED, recipient=address, smtp_code=refusal.code,
                                reply=refusal.reply)
            raise refusal
        if result.status is ReserveStatus.USER_DISABLED:
            raise UserDisabledError()
        if result.status is ReserveStatus.USER_MISSING:
            raise UnknownSenderError()
        if result.status is ReserveStatus.UNKNOWN_PLAN:
            self.log.error("quota.unknown_plan", plan=self.user.plan)
            raise PlanMisconfiguredError()
        try:
            await self._session.rcpt(address, options)
        except RelayError:
            settlement = await self._quota.refund(self.user.id, self.period.label,
                                                  self.txn_id, [rcpt_no])
            self._last_used = settlement.used
            raise
        self.accepted.append(address)

    async def _publish(self, kind: str, **data: object) -> None:
        """Append one event about this transaction's user (never fails the SMTP reply)."""
        await self._events.publish_quietly(events.new_event(
            kind, self.user.id, email=self.user.email, app=self.principal.app,
            sender=self.sender, txn_id=self.txn_id, period=self.period.label,
            used=self._last_used, limit=self._last_limit,
            resets_at=self.period.resets_at.isoformat(), resets_on=self.period.resets_on,
            **data), self.log)

    async def deliver(self, content: bytes) -> str:
        """Send the message upstream; commit on 250, refund on a refusal. Returns the
        upstream's queue reply. Raises the upstream's refusal (RelayError)."""
        self.state = State.SENDING
        try:
            reply = await self._session.data(content)
        except UpstreamOutcomeUnknownError as exc:
            self.state = State.DONE
            await self._session.release(reusable=False)
            self._log_unreconciled("upstream_no_reply")
            self._finish("deferred", exc.code, len(content))
            raise
        except RelayError as exc:
            self.state = State.DONE
            await self._session.release(reusable=True)
            await self._refund_all()
            self._finish("deferred" if not exc.permanent else "failed", exc.code, len(content))
            raise
        self.state = State.DONE
        try:
            # Commit before handing the connection back: the units become final as soon as
            # possible after the upstream's 250.
            settlement = await self._quota.commit(self.user.id, self.period.label, self.txn_id)
            self._last_used = settlement.used
        except RelayError:
            # Delivered mail stays counted: reserve already took the units. Only the
            # bookkeeping of "final" is missing; log it for reconciliation.
            self._log_unreconciled("commit_failed")
        await self._session.release(reusable=True)
        self._finish("delivered", 250, len(content), upstream_reply=reply[:200])
        return reply

    async def abort(self, reason: str) -> None:
        """End an unfinished transaction (RSET, new EHLO, disconnect, timeout). Never raises;
        idempotent."""
        if self.state is State.DONE:
            return
        if self.state is State.SENDING:
            # Cut off while the upstream was answering DATA: it may have accepted the
            # message, so the units stay counted.
            self.state = State.DONE
            await self._session.release(reusable=False)
            self._log_unreconciled(reason)
            self._finish("deferred", None, None, reason=reason)
            return
        self.state = State.DONE
        await self._session.release(reusable=True)
        if self.accepted or self._next_rcpt:
            await self._refund_all()
        self._finish("abandoned" if self.accepted else "rejected", None, None, reason=reason)

    async def _refund_all(self) -> None:
        try:
            settlement = await self._quota.refund(self.user.id, self.period.label, self.txn_id)
        except RelayError:
            self._log_unreconciled("refund_failed")
            return
        self._last_used = settlement.used
        if settlement.units:
            self.log.info("quota.refunded", units=settlement.units, used=settlement.used)

    def _log_unreconciled(self, reason: str) -> None:
        # The reservation key relay:resv:{user}:<txn_id> keeps the units for a week; this line
        # is what an operator greps to reconcile a count that may be high.
        self.log.warning("quota.unreconciled", reason=reason, rcpt_accepted=len(self.accepted))

    def _finish(self, outcome: str, smtp_code: int | None, size: int | None,
                **extra: object) -> None:
        self.log.info(
            "delivery.finished", outcome=outcome, smtp_code=smtp_code, size=size,
            rcpt_accepted=len(self.accepted), rcpt_refused=self.refused,
            used=self._last_used, limit=self._last_limit, upstream=self._upstream_name,
            duration_ms=round((time.monotonic() - self._started) * 1000, 1), **extra)
