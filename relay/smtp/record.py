"""What one transaction holds and records of itself, apart from its flow: the per-message
state, the events it publishes (never failing the SMTP reply), the refunds and late
settlements, and the canonical ``delivery.finished`` line with its metrics.

``relay/smtp/transaction.py`` is the flow (recipients, the message, commit or refund) built
on this base; the two were one 540-line module.
"""

from __future__ import annotations

import time
from enum import Enum

import structlog

from relay.config.routing import Route
from relay.decisions.forecast import forecast_data
from relay.decisions.months import Period
from relay.decisions.quota import Settlement
from relay.decisions.settle import PendingSettlement
from relay.errors import RelayError
from relay.events import stream as events
from relay.identity.accounts import Principal, User
from relay.message.controls import Controls
from relay.smtp.services import Opened, Services


class State(Enum):
    OPEN = "open"          # recipients being added
    SENDING = "sending"    # DATA handed to the upstream, reply not yet known
    DONE = "done"          # committed, refunded or left counted; nothing more to do


class TransactionRecord:
    """A transaction's state, and what it records of itself: events, refunds, the
    unreconciled units an operator greps for, the canonical ``delivery.finished`` line.
    ``Transaction`` (relay/smtp/transaction.py) is the flow over it."""

    def __init__(self, *, txn_id: str, principal: Principal, user: User, sender: str,
                 mail_options: list[str], smtputf8: bool, period: Period,
                 opened: Opened | None, services: Services,
                 log: structlog.typing.FilteringBoundLogger) -> None:
        self.txn_id = txn_id
        self.principal = principal
        self.user = user
        self.sender = sender
        self.period = period
        self.accepted: list[str] = []
        # The recipient numbers of ``accepted``: what a commit makes final (it gives back
        # any other unit of the transaction: a refused recipient's, never sent).
        self._accepted_nos: list[int] = []
        self.refused = 0
        self.state = State.OPEN
        # Set once the client's final dot handed the message to ``deliver``.
        self._delivering = False
        self.deferred = opened is None
        self._opened = opened
        # The route chosen at the end of DATA, before it is opened: events about a message
        # refused then (over the limit, say) still name it.
        self._chosen: Route | None = None
        self._mail_options = mail_options
        self._smtputf8 = smtputf8
        self._services = services
        self._policies = services.policies
        self._app = services.policies.routing.app(principal.app)
        self._controls = Controls()
        self._next_rcpt = 0
        self._started = time.monotonic()
        self._last_used = 0
        self._last_limit = 0
        self.log = log.bind(txn_id=txn_id, user_id=user.id, plan=user.plan,
                            sender_domain=sender.rpartition("@")[2].lower(),
                            period=period.label, route=opened.route.name if opened else None)
        # Idempotent resubmission: the claims on the message's recipients (made at the end of
        # DATA), and the recipients it goes to with their unit numbers: those accepted, less
        # the duplicates of an earlier send (relay/smtp/resubmission.py).
        self._claims = services.resubmissions.begin(user_id=user.id, txn_id=txn_id,
                                                    period=period.label, log=self.log)
        self._sending: list[tuple[str, int]] = []
        self._shadow = services.shadow.watch(user=user, period=period, app=principal.app,
                                             log=self.log)

    @property
    def route(self) -> Route | None:
        return self._opened.route if self._opened else None

    # -- bookkeeping --------------------------------------------------------------------------
    async def _publish(self, kind: str, **data: object) -> None:
        """Append one event about this transaction's user (never fails the SMTP reply).
        ``used`` and ``limit`` default to the transaction's last known count and limit."""
        route = self.route or self._chosen
        counts = {"used": self._last_used, "limit": self._last_limit}
        await self._services.events.publish_quietly(events.new_event(
            kind, self.user.id, email=self.user.email, app=self.principal.app,
            sender=self.sender, txn_id=self.txn_id, period=self.period.label,
            route=route.name if route else None,
            resets_at=self.period.resets_at.isoformat(), resets_on=self.period.resets_on,
            **(counts | data)), self.log)

    async def _notify_crossing(self, settlement: Settlement) -> None:
        """The event for a threshold this commit's delivered sends crossed: it names the
        delivered count ("16 of 20"), the sends that really went out, and the forecast."""
        self._shadow.committed(settlement)
        if settlement.crossed:
            kind = events.REACHED if settlement.crossed == 100 else events.THRESHOLD
            await self._publish(kind, percent=settlement.crossed,
                                used=settlement.delivered, limit=settlement.limit,
                                forecast=forecast_data(settlement.delivered, settlement.limit,
                                                       self.period, self._services.clock.now()))

    async def _refund_all(self) -> None:
        await self._refund(None)

    async def _refund(self, rcpt_nos: list[int] | None) -> None:
        """Give back the open units of ``rcpt_nos`` (all when None); a refund that meets
        Redis away is written once it is back. Never raises a Redis failure."""
        try:
            settlement = await self._services.quota.refund(self.user.id, self.period.label,
                                                           self.txn_id, rcpt_nos)
        except RelayError:
            self._settle_later(PendingSettlement(
                "refund", self.user.id, self.period.label, self.txn_id, self.log,
                rcpt_nos=rcpt_nos))
            return
        self._last_used = settlement.used
        if settlement.units:
            self.log.info("quota.refunded", units=settlement.units, used=settlement.used)

    def _settle_later(self, pending: PendingSettlement) -> None:
        settlements = self._services.settlements
        if settlements is None:
            self._log_unreconciled(f"{pending.kind}_failed")
        else:
            settlements.add(pending)

    def _log_unreconciled(self, reason: str) -> None:
        # The reservation key relay:resv:{user}:<txn_id> keeps the units for a week; this line
        # is what an operator greps to reconcile a count that may be high.
        self._services.metrics.unreconciled(reason).inc()
        self.log.warning("quota.unreconciled", reason=reason, rcpt_accepted=len(self.accepted))

    def _finish(self, outcome: str, smtp_code: int | None, size: int | None,
                **extra: object) -> None:
        seconds = time.monotonic() - self._started
        metrics = self._services.metrics
        metrics.messages(outcome, self._opened.route.name if self._opened else "none").inc()
        metrics.transaction_seconds(outcome).observe(seconds)
        if size is not None:
            metrics.message_bytes.observe(size)
        self.log.info(
            "delivery.finished", outcome=outcome, smtp_code=smtp_code, size=size,
            rcpt_accepted=len(self.accepted), rcpt_refused=self.refused,
            used=self._last_used, limit=self._last_limit,
            upstream=self._opened.upstream if self._opened else None,
            duration_ms=round(seconds * 1000, 1),
            **self._controls.ids(), **extra)
