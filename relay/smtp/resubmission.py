"""Idempotent resubmission on the SMTP path (docs/resubmission.md; STYLE §1 step 6).

An app that lost the reply to its DATA sends the message again. The Message-ID is known
only at the end of DATA, so that is where a transaction claims its recipients
(relay/decisions/dedup.py), before the upstream is sent the message: a recipient the
upstream already accepted is a duplicate (not sent again, not counted: 250 all the same), one
another transaction is sending right now makes the message wait (451), one whose earlier
outcome is unknown is sent again and counted once. ``Transaction`` calls this module at
four points: the claim, the moment before DATA goes upstream (a claim that might lapse
before the reply is renewed), the commit (which makes the claims accepted in its own step)
and every other end (released, or unknown when the upstream's reply was lost).

A claim holds long enough for the upstream's reply to DATA and the commit after it; if the
relay dies meanwhile, it lapses, and the next attempt takes the outcome as unknown.
"""

from __future__ import annotations

from functools import partial

import structlog

from relay.decisions.dedup import (
    ClaimSettlement,
    ClaimStatus,
    DedupStore,
    EarlierUnit,
    Outcome,
    RecipientClaim,
    digest,
)
from relay.decisions.months import Clock, SystemClock
from relay.decisions.settle import LateSettlements, PendingSettlement
from relay.errors import ResubmissionInProgressError, StoreUnavailableError
from relay.identity.accounts import normalize_address
from relay.message.msgid import message_id
from relay.observe.metrics import RelayMetrics, detached

# Seconds a claim holds beyond what the steps after it may take (clock skew between relays,
# a slow Redis once the upstream has answered).
MARGIN_SECONDS = 30.0
_RESULTS = {ClaimStatus.CLAIMED: "claimed", ClaimStatus.RESEND: "resent",
            ClaimStatus.DUPLICATE: "duplicate", ClaimStatus.BUSY: "in_progress"}


class Resubmissions:
    """One per relay: the store, the clock, the window (``RELAY_DEDUP_WINDOW``; 0 = off) and
    how long a claim holds: the upstream's reply to DATA and the commit after it, twice
    over, so a claim renewed just before DATA (``MessageClaims.confirm``) still holds when
    the commit makes it accepted."""

    def __init__(self, store: DedupStore | None, clock: Clock, *, window: int,
                 upstream_timeout: float, redis_timeout: float,
                 metrics: RelayMetrics | None = None,
                 settlements: LateSettlements | None = None) -> None:
        self.store = store if window > 0 else None
        self.clock = clock
        self.window = window
        # What must be left of a claim when DATA goes upstream; a claim holds twice that.
        self.needed = upstream_timeout + redis_timeout + MARGIN_SECONDS
        self.holds = 2 * self.needed
        self.metrics = metrics or detached()
        self.settlements = settlements

    @classmethod
    def off(cls) -> Resubmissions:
        return cls(None, SystemClock(), window=0, upstream_timeout=0, redis_timeout=0)

    def begin(self, *, user_id: str, txn_id: str, period: str,
              log: structlog.typing.FilteringBoundLogger) -> MessageClaims:
        return MessageClaims(self, user_id=user_id, txn_id=txn_id, period=period, log=log)


class MessageClaims:
    """One transaction's claims on its message's recipients (none until ``claim``)."""

    def __init__(self, owner: Resubmissions, *, user_id: str, txn_id: str, period: str,
                 log: structlog.typing.FilteringBoundLogger) -> None:
        self._owner = owner
        self._user_id = user_id
        self._txn_id = txn_id
        self._period = period
        self.log = log
        self._digest = ""
        self._claimed: list[tuple[str, int]] = []
        self._earlier: tuple[EarlierUnit, ...] = ()
        self._claimed_at = 0.0
        # Claims made (or perhaps made: a reply lost) and not concluded yet.
        self._open = False

    def _now(self) -> float:
        return self._owner.clock.now().timestamp()

    async def claim(self, header: bytes,
                    recipients: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Claim ``recipients`` (address, unit number) of the message whose header section
        is ``header``; returns those to send (all of them for a message without a
        Message-ID, or with resubmission off). Raises ResubmissionInProgressError (nothing
        claimed) or StoreUnavailableError (claims that Redis may have made are released
        once it is back)."""
        store = self._owner.store
        found_id = message_id(header) if store is not None else None
        if store is None or found_id is None or not recipients:
            return recipients
        self._digest = digest(found_id)
        unique: dict[str, int] = {}
        for address, number in recipients:
            unique.setdefault(normalize_address(address), number)
        claims = await self._ask(list(unique.items()))
        by_address = dict(zip(unique, claims, strict=True))
        for result in claims:
            self._owner.metrics.claims(_RESULTS[result.status]).inc()
        busy = sorted({c.other for c in claims if c.status is ClaimStatus.BUSY})
        if busy:
            self.log.info("delivery.in_progress", other_txn_ids=busy,
                          recipients=sum(c.status is ClaimStatus.BUSY for c in claims))
            raise ResubmissionInProgressError()
        self._claimed = [(a, n) for a, n in unique.items()
                         if by_address[a].status < ClaimStatus.DUPLICATE]
        self._earlier = tuple(unit for c in claims for unit in c.earlier)
        self._log(claims)
        return [(address, number) for address, number in recipients
                if by_address[normalize_address(address)].status < ClaimStatus.DUPLICATE]

    async def _ask(self, recipients: list[tuple[str, int]]) -> list[RecipientClaim]:
        store = self._owner.store
        assert store is not None
        now = self._now()
        try:
            claims = await store.claim(
                self._user_id, self._digest, self._txn_id, self._period, recipients,
                now_ms=int(now * 1000), holds_ms=int((now + self._owner.holds) * 1000),
                window=self._owner.window)
        except StoreUnavailableError:
            # The script may have run: whatever it claimed is released once Redis is back
            # (not now: Redis just failed, and the client hears its 451 without a wait).
            self._open = True
            await self.conclude("released", later=True)
            raise
        if all(c.status is not ClaimStatus.BUSY for c in claims):  # else nothing was claimed
            self._open = self._open or any(c.status < ClaimStatus.DUPLICATE for c in claims)
        self._claimed_at = now
        return claims

    def _log(self, claims: list[RecipientClaim]) -> None:
        duplicates = [c.other for c in claims if c.status is ClaimStatus.DUPLICATE]
        if duplicates:
            # Both transactions named: this one and the one(s) the upstream accepted from.
            self.log.info("delivery.duplicate", earlier_txn_ids=sorted(set(duplicates)),
                          duplicates=len(duplicates), to_send=len(self._claimed))
        if self._earlier:
            self.log.info("delivery.resent",
                          earlier_txn_ids=sorted({u.txn_id for u in self._earlier}),
                          resent=sum(c.status is ClaimStatus.RESEND for c in claims))

    async def confirm(self) -> None:
        """Just before the message goes upstream: a claim that might lapse before the
        upstream's reply (the steps since the claim were slow) is renewed. Raises
        ResubmissionInProgressError when another transaction took one over meanwhile."""
        if not self._claimed or not self._open:
            return
        if self._claimed_at + self._owner.holds - self._now() >= self._owner.needed:
            return
        claims = await self._ask(self._claimed)
        if any(c.status >= ClaimStatus.DUPLICATE for c in claims):
            self.log.warning("delivery.claim_lost")
            raise ResubmissionInProgressError()

    def settlement(self) -> ClaimSettlement | None:
        """For the commit after the upstream's 250, which concludes the claims (accepted)
        and gives back the earlier attempts' units in its own step."""
        if not self._open:
            return None
        self._open = False
        return ClaimSettlement(self._user_id, self._digest, self._txn_id, self._owner.window,
                               self._earlier)

    async def conclude(self, outcome: Outcome, *, later: bool = False) -> None:
        """End the claims: accepted (a route that is not counted: no commit), released
        (nothing was sent) or unknown (the upstream's reply was lost). Never raises; one
        that meets Redis away (or ``later``) is written once it is back (until then the
        claim holds, and lapses into an unknown outcome if the relay stops first)."""
        store = self._owner.store
        if not self._open or store is None:
            return
        self._open = False
        write = partial(store.conclude, self._user_id, self._digest, self._txn_id, outcome,
                        self._owner.window)
        try:
            if later:
                raise StoreUnavailableError()
            await write()
        except StoreUnavailableError:
            settlements = self._owner.settlements
            if settlements is None:
                self.log.warning("dedup.conclude_failed", outcome=outcome)
            else:
                settlements.add(PendingSettlement("conclude", self._user_id, self._period,
                                                  self._txn_id, self.log, action=write))
