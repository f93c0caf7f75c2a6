"""The monthly quota: reserve, commit, refund, read usage (STYLE §1 steps 5 and 7, §6).

Each operation is one Lua script in ``relay/decisions/lua/``, registered once; redis-py re-sends the
body after a NOSCRIPT (a restarted Redis, a promoted replica, a new Cluster node). The script
is the unit of atomicity: no WATCH/MULTI loops; its keys share the user's hash tag, so it runs
on one Cluster node. Redis errors surface as StoreUnavailableError (fail closed).

With replicas to wait for (``RELAY_REDIS_WAIT_REPLICAS``), a reservation counts as made only
once that many replicas acknowledged it: one that is not acknowledged in time is given back
and the recipient gets a 451. A unit the client is told 250 for is then on that many
replicas, so a failover promoting one of them cannot lose it (docs/scaling.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import structlog

from relay.decisions.dedup import ClaimSettlement
from relay.decisions.suppression import SuppressionReason, reason_of
from relay.errors import (
    OverLimitReply,
    PlanMisconfiguredError,
    QuotaExceededError,
    RecipientSuppressedError,
    RelayError,
    StoreUnavailableError,
    UnknownSenderError,
    UserDisabledError,
)
from relay.observe.metrics import RelayMetrics, detached
from relay.store import hot, keys
from relay.store.client import RedisClient, durability, eval_replicated, store_errors
from relay.store.scripts import lua_source

log = structlog.get_logger()

# Usage hashes are kept ~13 months for the usage history, then expire by themselves.
USAGE_TTL_SECONDS = 400 * 24 * 3600
# Open reservations outlive any SMTP transaction; one left behind by a dead process stays
# counted (high, never low) and is kept a week for an operator to reconcile.
RESERVATION_TTL_SECONDS = 7 * 24 * 3600


class ReserveStatus(IntEnum):
    RESERVED = 0
    OVER_LIMIT = 1
    ALREADY_RESERVED = 2
    USER_DISABLED = 3
    USER_MISSING = 4
    UNKNOWN_PLAN = 5
    SUPPRESSED = 6


@dataclass(frozen=True, slots=True)
class Reservation:
    status: ReserveStatus
    used: int
    limit: int
    # SUPPRESSED: the reason of the recipient's entry on the user's suppression list.
    suppressed: SuppressionReason | None = None


def refusal_for(result: Reservation, *, over_limit: OverLimitReply, permanent: bool,
                resets_on: str) -> RelayError | None:
    """What a reservation's status means for the recipient: None when its units were
    taken, else the refusal to answer. ``permanent``: the app must not retry a refused
    email (a timeline app moves on to its next step), so an over-limit refusal is a 5xx
    whatever the policy's code says."""
    if result.status is ReserveStatus.OVER_LIMIT:
        reply = over_limit.as_permanent() if permanent else over_limit
        return QuotaExceededError(reply, used=result.used, limit=result.limit,
                                  resets_on=resets_on)
    if result.status is ReserveStatus.USER_DISABLED:
        return UserDisabledError()
    if result.status is ReserveStatus.USER_MISSING:
        return UnknownSenderError()
    if result.status is ReserveStatus.UNKNOWN_PLAN:
        return PlanMisconfiguredError()
    if result.status is ReserveStatus.SUPPRESSED:
        return RecipientSuppressedError(str(result.suppressed or SuppressionReason.MANUAL),
                                        "user")
    return None


@dataclass(frozen=True, slots=True)
class Settlement:
    """The result of a commit or refund: units affected and the month's count after it."""

    units: int
    used: int
    # A commit's: the month's delivered count after it, the limit in force, and the highest
    # notification threshold (percent; 100 = limit reached) it crossed for the first time
    # this month at this limit, else 0. Decided inside commit.lua, by delivered sends.
    delivered: int = 0
    limit: int = 0
    crossed: int = 0
    # A commit's: units of the transaction it gave back because they were not delivered.
    released: int = 0
    # A commit's: units of earlier attempts at the same message whose outcome was unknown,
    # given back because this one delivered their recipients (relay/decisions/dedup.py).
    settled: int = 0


@dataclass(frozen=True, slots=True)
class RecordedTerms:
    """The plan and limit a month's usage hash records as governing it (written by
    reserve.lua and plan_change.lua; the latest write wins)."""

    plan: str
    custom_limit: int | None
    limit: int


@dataclass(frozen=True, slots=True)
class Usage:
    used: int
    delivered: int
    # Notification thresholds already crossed this month: limit -> percents.
    notified: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # Recipients delivered per route this month (counted and uncounted routes alike).
    routes: dict[str, int] = field(default_factory=dict)
    # Recipients refused this month as suppressed (both scopes), and by reason.
    suppressed: int = 0
    suppressed_reasons: dict[str, int] = field(default_factory=dict)
    # The month's own terms, None for a month with nothing recorded (older keys).
    terms: RecordedTerms | None = None

    @property
    def in_flight(self) -> int:
        """Reserved but not yet committed: open transactions, or units a dead process left."""
        return max(self.used - self.delivered, 0)


class QuotaStore:
    def __init__(self, redis: RedisClient, metrics: RelayMetrics | None = None) -> None:
        self._redis = redis
        self._reserve = hot.register_script(redis,
            lua_source("relay.decisions", "reserve.lua", prologues=["terms.lua"]))
        self._commit = hot.register_script(redis,
            lua_source("relay.decisions", "commit.lua",
                       prologues=["terms.lua", "units.lua", "claims.lua"]))
        self._refund = hot.register_script(redis,
            lua_source("relay.decisions", "refund.lua", prologues=["units.lua"]))
        m = self._metrics = metrics or detached()
        self._reserved = {status: m.reservations(status.name.lower()) for status in ReserveStatus}
        self._reserve_failed = m.reservations("error")
        # The user's own list is read by reserve.lua (the global one by the transaction).
        self._suppressed = {reason: m.suppressed(reason.value, "user")
                            for reason in SuppressionReason}
        self._seconds = {step: m.redis_seconds(step) for step in ("reserve", "commit", "refund",
                                                                  "tally")}
        self._errors = {step: m.redis_errors(step) for step in self._seconds}

    def _observe(self, step: str, started: float) -> None:
        self._seconds[step].observe(time.perf_counter() - started)

    async def reserve(self, user_id: str, period: str, txn_id: str, rcpt_no: int | list[int],
                      plan_limits: list[str | int], *, recipient: str = "") -> Reservation:
        """Take one unit for recipient ``rcpt_no`` of ``txn_id`` (or one for each of a list,
        all or nothing) if under the limit. ``recipient`` (a normalised address; "" for
        none) is looked up on the user's suppression list first, in the same script: on it,
        nothing is taken, the refusal is counted in the month's usage, and the status is
        SUPPRESSED with the entry's reason.

        Idempotent per (txn_id, rcpt_no). Raises StoreUnavailableError.
        """
        numbers = [rcpt_no] if isinstance(rcpt_no, int) else rcpt_no
        units = len(numbers)
        script_keys = [keys.user(user_id), keys.usage(user_id, period),
                       keys.reservations(user_id, txn_id), keys.suppressions(user_id)]
        args: list[str | int] = [" ".join(str(n) for n in numbers), USAGE_TTL_SECONDS,
                                 RESERVATION_TTL_SECONDS, period, recipient, *plan_limits]
        wanted = durability(self._redis)
        replicated = True
        started = time.perf_counter()
        try:
            with store_errors():
                if wanted.replicas:
                    raw, replicated = await eval_replicated(self._redis, self._reserve,
                                                            script_keys, args, wanted)
                else:
                    raw = await self._reserve(keys=script_keys, args=args)
        except StoreUnavailableError:
            self._errors["reserve"].inc()
            self._reserve_failed.inc(units)
            raise
        self._observe("reserve", started)
        result = Reservation(ReserveStatus(int(raw[0])), int(raw[1]), int(raw[2]))
        if result.status is ReserveStatus.SUPPRESSED:
            reason = reason_of(str(raw[3]))
            result = Reservation(result.status, result.used, result.limit, reason)
            self._suppressed[reason].inc()
        if not replicated and result.status in {ReserveStatus.RESERVED,
                                                ReserveStatus.ALREADY_RESERVED}:
            self._reserve_failed.inc(units)
            await self._give_back_unreplicated(user_id, period, txn_id, numbers, result)
        self._reserved[result.status].inc(units)
        return result

    async def _give_back_unreplicated(self, user_id: str, period: str, txn_id: str,
                                      numbers: list[int], result: Reservation) -> None:
        """The units are on the master only: refund them (a failover may have lost both the
        reservation and this refund, which leaves the count as it was) and refuse with a
        451, so the client retries once a replica is back."""
        log.warning("quota.unreplicated", user_id=user_id, txn_id=txn_id, units=len(numbers),
                    used=result.used, limit=result.limit)
        try:
            await self.refund(user_id, period, txn_id, numbers)
        except StoreUnavailableError:
            pass  # counted high until the transaction's own refund: never low
        raise StoreUnavailableError()

    async def commit(self, user_id: str, period: str, txn_id: str, route: str = "command",
                     plan_limits: Sequence[str | int] = (), thresholds: str = "",
                     rcpt_nos: Sequence[int] | None = None,
                     claims: ClaimSettlement | None = None) -> Settlement:
        """Make the open reservations of ``rcpt_nos`` (the recipients delivered; every open
        one when None) final, counted under ``route``, give back any other open unit of
        ``txn_id`` (never delivered: the transaction is over), and mark any of
        ``thresholds`` (space-separated percents) the delivered count crossed. ``claims``:
        the message's claims become accepted and the earlier attempts' units are given back
        in the same step (relay/decisions/dedup.py).
        Idempotent: a repeat commits, gives back and crosses nothing."""
        delivered_nos = "*" if rcpt_nos is None else " ".join(str(n) for n in rcpt_nos)
        claim_keys, claim_argument = claims.keys_and_argument() if claims else ([], "")
        started = time.perf_counter()
        try:
            with store_errors():
                raw = await self._commit(
                    keys=[keys.user(user_id), keys.usage(user_id, period),
                          keys.reservations(user_id, txn_id), *claim_keys],
                    args=[route, period, thresholds, delivered_nos, claim_argument,
                          *plan_limits])
        except StoreUnavailableError:
            self._errors["commit"].inc()
            raise
        self._observe("commit", started)
        units, used, delivered, limit, crossed, released, settled = (int(v) for v in raw)
        self._metrics.units_committed.inc(units)
        self._metrics.units_refunded.inc(released + settled)
        return Settlement(units, used, delivered, limit, crossed, released, settled)

    async def tally(self, user_id: str, period: str, route: str, units: int) -> None:
        """Count ``units`` sent through an uncounted route (shown in usage, never limited)."""
        started = time.perf_counter()
        try:
            with store_errors():
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.hincrby(keys.usage(user_id, period), f"route:{route}", units)
                    pipe.expire(keys.usage(user_id, period), USAGE_TTL_SECONDS)
                    await pipe.execute()
        except StoreUnavailableError:
            self._errors["tally"].inc()
            raise
        self._observe("tally", started)

    async def count_suppressed(self, user_id: str, period: str,
                               reasons: Sequence[SuppressionReason]) -> None:
        """Count recipients refused as suppressed outside reserve.lua (the global list; either
        list on an uncounted route or at the end of DATA), one per reason given: the month's
        ``suppressed`` and ``suppressed:<reason>``, shown in usage. Not idempotent (HINCRBY,
        like ``tally``): a report, never a limit. Raises StoreUnavailableError."""
        if not reasons:
            return
        usage_key = keys.usage(user_id, period)
        with store_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(usage_key, "suppressed", len(reasons))
                for reason in sorted(set(reasons)):
                    pipe.hincrby(usage_key, f"suppressed:{reason}", reasons.count(reason))
                pipe.expire(usage_key, USAGE_TTL_SECONDS)
                await pipe.execute()

    async def refund(self, user_id: str, period: str, txn_id: str,
                     rcpt_nos: list[int] | None = None) -> Settlement:
        """Give back the open units of ``rcpt_nos`` (all when None). Idempotent; committed
        units are never refunded."""
        if rcpt_nos is not None and not rcpt_nos:
            # An empty list refunds nothing; the script would read "no ARGV" as "all".
            return Settlement(0, (await self.usage(user_id, period)).used)
        started = time.perf_counter()
        try:
            with store_errors():
                units, used = await self._refund(
                    keys=[keys.usage(user_id, period), keys.reservations(user_id, txn_id)],
                    args=rcpt_nos or [])
        except StoreUnavailableError:
            self._errors["refund"].inc()
            raise
        self._observe("refund", started)
        self._metrics.units_refunded.inc(int(units))
        return Settlement(int(units), int(used))

    async def usage(self, user_id: str, period: str) -> Usage:
        with store_errors():
            record = await self._redis.hgetall(keys.usage(user_id, period))
        return _usage_from(record)  # type: ignore[arg-type]  # decode_responses=True

    async def history(self, user_id: str, periods: list[str]) -> dict[str, Usage]:
        """Usage of several months in one round trip (pipelined; one user, one slot)."""
        with store_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                for period in periods:
                    pipe.hgetall(keys.usage(user_id, period))
                records = await pipe.execute()
        return {period: _usage_from(record) for period, record in zip(periods, records,
                                                                        strict=True)}


def _usage_from(record: dict[str, str]) -> Usage:
    notified: dict[int, list[int]] = {}
    routes = {name.removeprefix("route:"): int(value) for name, value in record.items()
              if name.startswith("route:")}
    for name in record:
        # n:<limit>:<percent>, written by commit.lua when a threshold is crossed.
        if name.startswith("n:"):
            _, limit, percent = name.split(":")
            notified.setdefault(int(limit), []).append(int(percent))
    # suppressed:<reason>, by reserve.lua (the user's list) and QuotaStore.count_suppressed.
    reasons = {name.removeprefix("suppressed:"): int(value) for name, value in record.items()
               if name.startswith("suppressed:")}
    terms = None
    if record.get("limit"):
        custom = record.get("custom_limit")
        terms = RecordedTerms(record.get("plan", ""), int(custom) if custom else None,
                              int(record["limit"]))
    return Usage(int(record.get("used", 0)), int(record.get("delivered", 0)),
                 {limit: tuple(sorted(p)) for limit, p in notified.items()}, routes,
                 int(record.get("suppressed", 0)), reasons, terms)
