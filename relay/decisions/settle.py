"""Commits and refunds that could not be written when they were due, written later
(STYLE §1 step 7).

A commit after the upstream's 250, or a refund after a refusal or a reset, that meets Redis
away (killed, paused, failing over) is not dropped: the transaction hands it here, and one
background task retries it until Redis takes it, so ``delivered`` and ``in_flight`` are
right again once Redis is back, without an operator. Both scripts are idempotent per
transaction (commit.lua makes the delivered recipients' units final once and gives back the
rest, refund.lua gives each back at most once), so retrying one that did reach Redis before
its reply was lost changes nothing, and a commit written before a refund still queued for
the same transaction leaves that refund nothing to do.

While Redis is away, a round stops at the first failure and waits (backoff doubling up to
``max_delay``), so an outage costs one probe per interval whatever is pending. The queue
lives in this process: a relay that dies with settlements pending leaves their open
reservations counted (high, never low), and ``close`` logs each one it could not write as
``quota.unreconciled`` for an operator, as before.

A resubmitted message's claims that could not be concluded (released, or marked unknown)
wait here too, as an idempotent ``action`` (relay/smtp/resubmission.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import structlog

from relay.decisions.dedup import ClaimSettlement
from relay.decisions.quota import QuotaStore, Settlement
from relay.errors import StoreUnavailableError
from relay.observe.metrics import RelayMetrics, detached

log = structlog.get_logger()

# "conclude": a message's claims (relay/decisions/dedup.py) to end, written by ``action``.
Kind = Literal["commit", "refund", "conclude"]


@dataclass(slots=True)
class PendingSettlement:
    """One commit or refund still to be written. ``rcpt_nos``: a refund's recipients (None:
    every open unit of the transaction), a commit's delivered recipients (None: every open
    unit; any other is given back); ``on_committed`` runs once a late commit is written (the
    threshold notice it may have crossed)."""

    kind: Kind
    user_id: str
    period: str
    txn_id: str
    log: structlog.typing.FilteringBoundLogger
    route: str = "command"
    plan_limits: Sequence[str | int] = ()
    thresholds: str = ""
    rcpt_nos: list[int] | None = None
    on_committed: Callable[[Settlement], Awaitable[None]] | None = None
    # A commit's: the message's claims, made accepted in the same step.
    claims: ClaimSettlement | None = None
    # A conclusion's: the idempotent write to try again.
    action: Callable[[], Awaitable[object]] | None = None
    since: float = field(default_factory=time.monotonic)
    attempts: int = 0


class LateSettlements:
    """The pending commits and refunds of this process, and the task that writes them."""

    def __init__(self, quota: QuotaStore, metrics: RelayMetrics | None = None, *,
                 first_delay: float = 0.1, max_delay: float = 2.0) -> None:
        self._quota = quota
        self._metrics = metrics or detached()
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._pending: deque[PendingSettlement] = deque()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, pending: PendingSettlement) -> None:
        """Queue ``pending`` (its first attempt failed) and make sure the writer runs."""
        self._pending.append(pending)
        self._metrics.settlements_pending.set(len(self._pending))
        pending.log.warning("quota.settlement_pending", kind=pending.kind,
                            pending=len(self._pending))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        failures = 0
        while self._pending:
            if await self._round():
                failures = 0
                continue
            failures += 1
            # A new pending settlement does not cut the wait short: Redis failed a moment
            # ago, and the wait is what keeps an outage to one probe per interval.
            await asyncio.sleep(min(self._max_delay, self._first_delay * 2 ** (failures - 1)))

    async def _round(self) -> bool:
        """Write what is pending, oldest first; False at the first Redis failure."""
        while self._pending:
            pending = self._pending[0]
            pending.attempts += 1
            try:
                await self._write(pending)
            except StoreUnavailableError:
                return False
            self._pending.popleft()
            self._metrics.settlements_pending.set(len(self._pending))
        return True

    async def _write(self, pending: PendingSettlement) -> None:
        quota = self._quota
        if pending.action is not None:
            await pending.action()
            pending.log.info("quota.settled_late", kind=pending.kind, attempts=pending.attempts,
                             waited_s=round(time.monotonic() - pending.since, 2))
            return
        if pending.kind == "commit":
            settlement = await quota.commit(pending.user_id, pending.period, pending.txn_id,
                                            pending.route, pending.plan_limits,
                                            pending.thresholds, pending.rcpt_nos,
                                            pending.claims)
        else:
            settlement = await quota.refund(pending.user_id, pending.period, pending.txn_id,
                                            pending.rcpt_nos)
        # released: a late commit's units of the transaction that were not delivered.
        pending.log.info("quota.settled_late", kind=pending.kind, units=settlement.units,
                         released=settlement.released, used=settlement.used,
                         attempts=pending.attempts,
                         waited_s=round(time.monotonic() - pending.since, 2))
        if pending.on_committed is not None:
            await pending.on_committed(settlement)

    async def close(self, seconds: float) -> int:
        """Try for up to ``seconds`` more to write what is pending (the relay is stopping),
        then stop; each settlement left is logged as ``quota.unreconciled``. Returns how
        many were left."""
        if self._task is not None:
            # One writer at a time: a round of the task and one of ours would both write
            # the head of the queue and both pop it.
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        deadline = time.monotonic() + seconds
        while self._pending and time.monotonic() < deadline:
            if not await self._round():
                await asyncio.sleep(min(self._first_delay, max(deadline - time.monotonic(), 0)))
        left = len(self._pending)
        while self._pending:
            pending = self._pending.popleft()
            self._metrics.unreconciled(f"{pending.kind}_failed").inc()
            pending.log.warning("quota.unreconciled", reason=f"{pending.kind}_failed",
                                attempts=pending.attempts)
        self._metrics.settlements_pending.set(0)
        return left
