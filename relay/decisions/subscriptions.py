"""Plans in force, plan changes and their audit trail (issue: subscriptions).

The rules, decided atomically in ``plan_change.lua``:

* an **upgrade** (a plan or custom limit at least as high as the one in force) applies at
  once to the current month: sends already made still count, a blocked user can send again
  at the next recipient, and nothing refused before is retried by the relay;
* a **downgrade** or **cancellation** (back to the default plan) waits for the next monthly
  reset; the current month keeps the limit already paid for, and the pending change shows
  in ``usage``;
* every change appends (who, when, old, new, effective from) to the user's audit stream;
* every change records the terms in force for the current and the next month in those
  months' usage hashes (reserve.lua records them too), so a past month reports its own
  plan and limit, not today's (``relay.decisions.history``).

``terms_in_force`` is the Python twin of ``terms.lua`` for read-only views (usage, API).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

from redis.commands.core import AsyncScript

from relay.config.policies import Policies, check_limit
from relay.decisions.months import Period
from relay.decisions.quota import USAGE_TTL_SECONDS
from relay.identity.accounts import User
from relay.store import keys
from relay.store.client import RedisClient, store_errors
from relay.store.scripts import lua_source


class PlanChangeError(ValueError):
    """The change was refused (unknown user or plan); the message says why."""


@dataclass(frozen=True, slots=True)
class Terms:
    """What a user's month is governed by."""

    plan: str
    custom_limit: int | None
    limit: int | None  # None when the plan is not in plans.toml (sends get 451 4.3.5)


@dataclass(frozen=True, slots=True)
class PlanChange:
    outcome: str  # upgrade, change, downgrade, unchanged
    effective_from: str  # YYYY-MM
    old_plan: str
    old_limit: int | None
    new_plan: str
    new_limit: int


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: str
    at: str
    by: str
    outcome: str
    old_plan: str
    old_limit: int | None
    new_plan: str
    new_limit: int | None
    effective_from: str


def terms_in_force(user: User, period: str, policies: Policies) -> Terms:
    """The plan and limit governing ``period`` (YYYY-MM), as terms.lua resolves them."""
    plan, custom = user.plan, user.custom_limit
    if user.pending is not None and period >= user.pending.effective_from:
        plan, custom = user.pending.plan, user.pending.custom_limit
    known = policies.plans.get(plan)
    limit = custom if custom is not None else (known.monthly_limit if known else None)
    return Terms(plan, custom, limit)


def _int_or_none(text: str) -> int | None:
    return int(text) if text else None


class SubscriptionStore:
    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self._change: AsyncScript = redis.register_script(
            lua_source("relay.decisions", "plan_change.lua", prologues=["terms.lua"]))

    async def change_plan(self, user: User, plan: str, *, custom_limit: int | None,
                          by: str, now: datetime, period: Period,
                          policies: Policies) -> PlanChange:
        """Apply or schedule a plan change for ``user`` (see the module docstring).

        ``period`` is the user's current month. Raises PlanChangeError for an unknown plan
        (without a custom limit) or a vanished user; StoreUnavailableError.
        """
        if plan not in policies.plans:
            raise PlanChangeError(f"unknown plan {plan!r}; plans: {', '.join(policies.plans)}")
        if custom_limit is not None:
            try:
                check_limit(custom_limit)
            except ValueError as exc:
                # Refused before anything is written: the Lua step would store the number
                # but format it inexactly (7.7628786148293e+17) in the audit trail.
                raise PlanChangeError(str(exc)) from None
        with store_errors():
            outcome, effective_from, old_plan, _old_custom, old_limit, new_limit = \
                await self._change(
                    keys=[keys.user(user.id), keys.audit(user.id),
                          keys.usage(user.id, period.label),
                          keys.usage(user.id, period.following.label)],
                    args=[plan, "" if custom_limit is None else custom_limit, period.label,
                          period.following.label, by, now.isoformat(timespec="seconds"),
                          USAGE_TTL_SECONDS, *policies.plan_limits()])
        if outcome == "missing":
            raise PlanChangeError(f"no user {user.id}")
        if outcome == "unknown_plan":  # pragma: no cover - checked above
            raise PlanChangeError(f"unknown plan {plan!r}")
        return PlanChange(outcome, effective_from, old_plan, _int_or_none(old_limit), plan,
                          int(new_limit))

    async def history(self, user_id: str, count: int = 50) -> list[AuditEntry]:
        """The newest ``count`` audit entries, oldest first."""
        with store_errors():
            raw = await self._redis.xrevrange(keys.audit(user_id), count=count)
        entries = cast(list[tuple[str, dict[str, str]]], raw)  # decode_responses=True
        return [AuditEntry(
            id=str(entry_id), at=f["at"], by=f["by"], outcome=f["outcome"],
            old_plan=f["old_plan"], old_limit=_int_or_none(f["old_limit"]),
            new_plan=f["new_plan"], new_limit=_int_or_none(f["new_limit"]),
            effective_from=f["effective_from"]) for entry_id, f in reversed(entries)]
