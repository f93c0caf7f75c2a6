"""One message from MAIL FROM to its outcome: route, reserve, forward, commit or refund
(STYLE §1 steps 4-7).

Two ways to decide, chosen per app in ``routing.toml``:

* **at RCPT** (the default): the route is chosen at MAIL FROM, the upstream transaction is
  opened then, and each recipient is reserved (on a counted route) and mirrored upstream in
  step, so each gets its own reply;
* **at the end of DATA** (apps with ``timeline`` or ``route_header``): the recipients are
  collected, and only with the headers in hand (X-KW-Route, the SmartPlan and contact ids)
  is the route chosen, the quota reserved for every recipient at once, and the upstream
  asked. The message is sent whole or refused whole, and a refused SmartPlan email is
  written to the Contact Timeline.

A reservation counts against the limit from the moment it is made. The upstream's 250 after
DATA makes the units final (commit); a refusal, RSET, disconnect or timeout gives them back
(refund). The client's final dot hands the message to ``deliver``, which then owns the
outcome: a client leaving afterwards does not cut it. If the upstream never answers, or the
relay stops before it does, the units stay counted: high by what was in flight, never low.
Every outcome ends in one canonical ``delivery.finished`` log line.
"""

from __future__ import annotations

import asyncio
import itertools

from relay.config.routing import Route
from relay.decisions.quota import Reservation, refusal_for
from relay.decisions.routing import choose_route
from relay.decisions.settle import PendingSettlement
from relay.errors import (
    MESSAGE_ACCEPTED_CODE,
    PlanMisconfiguredError,
    QuotaExceededError,
    RelayError,
    RouteRefusedError,
    SmtpUtf8RequiredError,
    StoreUnavailableError,
    TooManyRecipientsError,
    UpstreamOutcomeUnknownError,
)
from relay.events import stream as events
from relay.message.controls import read_controls
from relay.message.headers import CONTROL_HEADER_PREFIX
from relay.message.wire import Outgoing, WireMessage
from relay.smtp.record import State, TransactionRecord
from relay.smtp.services import Opened
from relay.smtp.unsubscribe import check_recipient, unsubscribe_fields


class Transaction(TransactionRecord):
    """Per-message state, created at MAIL FROM once the sender is resolved. ``opened`` is
    given when deciding at RCPT, None when deciding at the end of DATA."""

    # -- recipients ---------------------------------------------------------------------------
    async def add_recipient(self, address: str, options: list[str]) -> None:
        """Accept one recipient, or raise the refusal (RelayError).

        At RCPT: reserve one unit on a counted route, then mirror RCPT upstream (refunding
        if the upstream refuses). At the end of DATA: only collected.
        """
        rcpt_domain = address.rpartition("@")[2].lower()
        try:
            if not address.isascii() and not self._smtputf8:
                raise SmtpUtf8RequiredError()
            if len(self.accepted) >= self._services.max_recipients:
                raise TooManyRecipientsError()
            check_recipient(self._app.unsubscribe, len(self.accepted))
            if not self.deferred:
                self._accepted_nos.append(await self._add_in_step(address, options))
        except RelayError as exc:
            self.refused += 1
            counter = self._services.metrics.recipients("refused", exc.reason)
            exc.log_refusal(self.log, "rcpt.refused", counter, rcpt_domain=rcpt_domain,
                            reason=exc.reason, used=self._last_used, limit=self._last_limit)
            raise
        self._services.metrics.recipients("accepted", "none").inc()
        self.accepted.append(address)
        self.log.debug("rcpt.accepted", rcpt_domain=rcpt_domain, used=self._last_used,
                      limit=self._last_limit, deferred=self.deferred)

    async def _add_in_step(self, address: str, options: list[str]) -> int:
        """Reserve and mirror one recipient: its number, or the refusal. A reservation
        whose reply was lost may have been made all the same: the commit or the abort gives
        it back."""
        assert self._opened is not None
        self._next_rcpt += 1
        rcpt_no = self._next_rcpt
        if self._opened.route.counted:
            try:
                await self._reserve(rcpt_no, address)
            except QuotaExceededError as refusal:
                await self._publish(events.REJECTED, recipient=address,
                                    smtp_code=refusal.code, reply=refusal.reply)
                raise
        else:  # no reservation to fold the user's list into: both lists at once
            await self._services.screen.at_rcpt(self.user.id, self.period.label, address,
                                                self.log)
        try:
            await self._opened.session.rcpt(address, options)
        except RelayError:
            if self._opened.route.counted:
                # The client hears the upstream's refusal, whatever Redis does meanwhile.
                await self._refund([rcpt_no])
            raise
        return rcpt_no

    async def _reserve(self, rcpt_nos: int | list[int], address: str | None = None) -> None:
        """Reserve units (all or nothing); raises the over-limit or account refusal, or, for
        an ``address`` on the suppression list (global, then the user's in reserve.lua),
        the suppression refusal."""
        recipient = "" if address is None else await self._services.screen.before_reserve(
            self.user.id, self.period.label, address, self.log)
        result = await self._services.quota.reserve(
            self.user.id, self.period.label, self.txn_id, rcpt_nos,
            self._policies.plan_limits(), recipient=recipient)
        self._last_used, self._last_limit = result.used, result.limit
        self._shadow.reserved(result, rcpt_nos)
        self._raise_for(result)

    def _raise_for(self, result: Reservation) -> None:
        refusal = refusal_for(result, over_limit=self._policies.over_limit,
                              permanent=self._app.timeline, resets_on=self.period.resets_on)
        if isinstance(refusal, PlanMisconfiguredError):
            self.log.error("quota.unknown_plan", plan=self.user.plan)
        if refusal is not None:
            raise refusal

    # -- the message ----------------------------------------------------------------------------
    async def deliver(self, message: WireMessage, trace: bytes) -> str:
        """Send ``trace`` + ``message`` (control and other routes' headers removed) upstream;
        commit on 250, refund on a refusal. Returns the upstream's reply. Raises the refusal
        (RelayError); at the end of DATA, for the whole message.

        The client's final dot commits the message: from here on the delivery owns the
        outcome, and ``abort`` (the client leaving, a reset) leaves it alone. The handler runs
        this in a task of its own, so the client's connection going away cannot cut it.
        Cancelled itself (the relay stopping past its deadline), it ends like an abort."""
        self._delivering = True
        try:
            return await self._deliver(message, trace)
        except asyncio.CancelledError:
            self._delivering = False
            await self.abort("cancelled")
            raise

    async def _deliver(self, message: WireMessage, trace: bytes) -> str:
        header = message.header_content()
        if self.deferred:
            self._controls = read_controls(header)
            if self._controls.problems:
                self.log.warning("controls.ignored", problems=list(self._controls.problems))
        trace += await self._unsubscribe_fields(message)
        if self.deferred:
            try:
                route = self._choose_at_data()
                # Suppressed recipients leave the message before anything is claimed.
                await self._drop_suppressed()
                self._sending = await self._claims.claim(
                    header, list(zip(self.accepted, itertools.count(1))))
                if not self._sending:
                    return self._duplicate(len(message))
                await self._open_at_data(route)
            except RelayError as exc:
                self.state = State.DONE
                await self._claims.conclude("released")
                await self._refuse_whole(exc)
                self._finish("failed" if exc.permanent else "deferred", exc.code, len(message))
                raise
        elif not await self._dedupe_in_step(header, len(message)):
            return self._duplicate(len(message))
        assert self._opened is not None
        prefixes = (CONTROL_HEADER_PREFIX, *(p.encode() for p in
                    self._policies.routing.stripped_prefixes(self._opened.route)))
        return await self._send(message.outgoing(trace, prefixes))

    async def _unsubscribe_fields(self, message: WireMessage) -> bytes:
        """The List-Unsubscribe fields the app's policy adds (relay/smtp/unsubscribe.py). Its
        refusal comes before anything is sent: units reserved at RCPT are given back."""
        try:
            return unsubscribe_fields(
                self._app.unsubscribe, message, user_id=self.user.id, recipients=self.accepted,
                links=self._services.links, metrics=self._services.metrics, log=self.log)
        except RelayError as exc:
            self.state = State.DONE
            if self._opened is not None:  # decided at RCPT: opened at MAIL FROM
                await self._opened.session.release(reusable=True)
                await self._refund_all()
            # Refused before any claim: for every recipient.
            await self._refuse_whole(exc, self.accepted)
            self._finish("failed", exc.code, len(message))
            raise

    def _choose_at_data(self) -> Route:
        """The route, chosen with the headers in hand (events about the message name it from
        here on); RouteRefusedError when the rules refuse it."""
        decision = choose_route(self._policies.routing, app=self.principal.app,
                                preference=self.user.preferences.get(self.principal.app),
                                header=self._controls.route)
        self._shadow.route(decision, header=self._controls.route)
        self.log = self.log.bind(rule=decision.rule, route=decision.route and
                                 decision.route.name)
        if decision.route is None:
            raise RouteRefusedError(decision.refusal)
        self._chosen = decision.route
        return decision.route

    async def _open_at_data(self, route: Route) -> None:
        """Reserve every recipient at once (on a counted route: before anything is asked of
        the upstream, so an over-limit message costs it nothing), open the route, and mirror
        the recipients (all must be accepted).

        A failover never changes whether a route is counted (checked on load), so the
        reservation made for the chosen route holds for the route actually used.
        """
        numbers = [number for _, number in self._sending]
        self._next_rcpt = len(self.accepted)
        self._accepted_nos = numbers
        if route.counted:
            try:
                await self._reserve(numbers)
            except StoreUnavailableError:
                # The reply was lost, not necessarily the reservation (Redis may have run
                # it, then died). The message is refused, so whatever it took is given back,
                # in the background: the client hears its 451 now, not a timeout later.
                self._settle_later(PendingSettlement(
                    "refund", self.user.id, self.period.label, self.txn_id, self.log))
                raise
        try:
            await self._open(route, [address for address, _ in self._sending])
        except RelayError:
            await self._refund_all()
            raise

    async def _open(self, route: Route, addresses: list[str]) -> None:
        """Open a transaction on ``route`` and mirror ``addresses`` (all must be accepted)."""
        route, session, upstream = await self._services.routes.begin(
            route, self.user, self.sender, self._mail_options, smtputf8=self._smtputf8)
        self._opened = Opened(route, session, upstream)
        self.log = self.log.bind(route=route.name)
        try:
            for address in addresses:
                await session.rcpt(address, [])
        except RelayError:
            await session.release(reusable=True)
            raise

    async def _dedupe_in_step(self, header: bytes, size: int) -> bool:
        """Decided at RCPT: claim the recipients (the upstream has them all already). False
        when every one is a duplicate (the upstream transaction and the units given up);
        with some, the upstream transaction is opened again with the others only."""
        assert self._opened is not None
        numbered = list(zip(self.accepted, self._accepted_nos, strict=True))
        try:
            self._sending = await self._claims.claim(header, numbered)
            if len(self._sending) < len(numbered):
                await self._opened.session.release(reusable=True)
                self._accepted_nos = [number for _, number in self._sending]
                if self._sending:
                    await self._open(self._opened.route, [a for a, _ in self._sending])
        except RelayError as exc:
            self.state = State.DONE
            await self._opened.session.release(reusable=True)
            await self._claims.conclude("released")
            if isinstance(exc, StoreUnavailableError):  # Redis just failed: no second wait
                self._settle_later(PendingSettlement(
                    "refund", self.user.id, self.period.label, self.txn_id, self.log))
            else:
                await self._refund_all()
            self._finish("failed" if exc.permanent else "deferred", exc.code, size)
            raise
        if not self._sending:
            await self._refund_all()
        return bool(self._sending)

    def _duplicate(self, size: int) -> str:
        """Every recipient was accepted upstream before (a resubmission): 250, nothing sent."""
        self.state = State.DONE
        self._finish("duplicate", MESSAGE_ACCEPTED_CODE, size)
        return "duplicate"

    async def _drop_suppressed(self) -> None:
        """Recipients on the suppression list leave a message decided at the end of DATA:
        not sent, not counted; a timeline app hears of each (timeline.email_failed, reason
        suppressed) so its SmartPlan moves on. None left: the message is refused whole."""
        self.accepted, dropped = await self._services.screen.drop(
            self.user.id, self.period.label, self.accepted, self.log)
        self.refused += len(dropped)
        for address, refusal in dropped.items():
            if self._app.timeline:
                await self._publish(events.TIMELINE_EMAIL_FAILED, recipient=address,
                                    reason="suppressed", suppression=refusal.suppression,
                                    smtp_code=refusal.code, reply=refusal.reply,
                                    **self._controls.ids())
        if dropped and not self.accepted:
            raise next(iter(dropped.values()))

    async def _refuse_whole(self, refusal: RelayError,
                            recipients: list[str] | None = None) -> None:
        """Events for a message refused whole at the end of DATA: for ``recipients``, by
        default those this transaction claimed (not those another one sent already)."""
        if recipients is None:
            recipients = [address for address, _ in self._sending]
        if isinstance(refusal, QuotaExceededError):
            for address in recipients:
                await self._publish(events.REJECTED, recipient=address, smtp_code=refusal.code,
                                    reply=refusal.reply, **self._controls.ids())
        if self._app.timeline and (isinstance(refusal, QuotaExceededError)
                                   or refusal.permanent):
            reason = "quota" if isinstance(refusal, QuotaExceededError) else "refused"
            for address in recipients:
                await self._publish(events.TIMELINE_EMAIL_FAILED, recipient=address,
                                    reason=reason, smtp_code=refusal.code,
                                    reply=refusal.reply, **self._controls.ids())

    async def _send(self, content: Outgoing) -> str:
        assert self._opened is not None
        session = self._opened.session
        self.state = State.SENDING
        try:
            await self._claims.confirm()
            reply = await session.data(content)
        except UpstreamOutcomeUnknownError as exc:
            self.state = State.DONE
            await session.release(reusable=False)
            await self._claims.conclude("unknown")
            self._log_unreconciled("upstream_no_reply")
            self._finish("deferred", exc.code, len(content))
            raise
        except RelayError as exc:
            self.state = State.DONE
            await session.release(reusable=True)
            await self._claims.conclude("released")
            await self._refund_all()
            if self.deferred:
                await self._refuse_whole(exc)
            self._finish("deferred" if not exc.permanent else "failed", exc.code, len(content))
            raise
        self.state = State.DONE
        await self._settle()
        await session.release(reusable=True)
        self._finish("delivered", MESSAGE_ACCEPTED_CODE, len(content), upstream_reply=reply[:200])
        return reply

    async def _settle(self) -> None:
        """After the upstream's 250: commit a counted route's units (they become final and are
        tallied per route); tally an uncounted route's recipients."""
        assert self._opened is not None
        route = self._opened.route
        try:
            if route.counted:
                # Commit before handing the connection back: the units become final as soon
                # as possible after the upstream's 250.
                plan_limits = self._policies.plan_limits()
                thresholds = self._policies.notifications.threshold_argument
                claims = self._claims.settlement()  # made accepted by the commit, same step
                try:
                    settlement = await self._services.quota.commit(
                        self.user.id, self.period.label, self.txn_id, route.name,
                        plan_limits, thresholds, self._accepted_nos, claims)
                except RelayError:
                    # Delivered mail stays counted (reserve took the units); the commit that
                    # makes them final is written once Redis is back.
                    self._settle_later(PendingSettlement(
                        "commit", self.user.id, self.period.label, self.txn_id, self.log,
                        route=route.name, plan_limits=plan_limits, thresholds=thresholds,
                        rcpt_nos=self._accepted_nos, on_committed=self._notify_crossing,
                        claims=claims))
                    return
                self._last_used = settlement.used
                if settlement.released:
                    self.log.info("quota.refunded", units=settlement.released,
                                  used=settlement.used)
                await self._notify_crossing(settlement)
            else:
                await self._claims.conclude("accepted")
                await self._services.quota.tally(self.user.id, self.period.label, route.name,
                                                 len(self._accepted_nos))
        except RelayError:
            # A tally is not idempotent (HINCRBY), so it is not retried: the per-route count
            # of an uncounted route is for reports only and may be low by this message.
            self.log.warning("quota.tally_failed", rcpt_accepted=len(self.accepted))

    async def abort(self, reason: str) -> None:
        """End an unfinished transaction (RSET, new EHLO, disconnect, timeout). Never raises;
        idempotent."""
        if self.state is State.DONE or self._delivering:
            return
        session = self._opened.session if self._opened else None
        if self.state is State.SENDING:
            # Cut off while the upstream was answering DATA: it may have accepted the
            # message, so the units stay counted.
            self.state = State.DONE
            if session is not None:
                await session.release(reusable=False)
            await self._claims.conclude("unknown")
            self._log_unreconciled(reason)
            self._finish("deferred", None, None, reason=reason)
            return
        self.state = State.DONE
        if session is not None:
            await session.release(reusable=True)
        await self._claims.conclude("released")
        if self._next_rcpt:
            await self._refund_all()
        self._finish("abandoned" if self.accepted else "rejected", None, None, reason=reason)
