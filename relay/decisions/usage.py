"""A user's usage report: what the admin API returns and ``command-relay usage`` prints
(in the words of ``relay.cli.usage``).

One builder for both, so the CLI and the API can never disagree on a number.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from relay.config.policies import Policies
from relay.config.zones import UnknownTimeZoneError, zone
from relay.decisions.months import Period, period_at, period_named
from relay.decisions.quota import QuotaStore
from relay.decisions.subscriptions import terms_in_force
from relay.identity.accounts import User

HISTORY_MONTHS = 6


def user_period(user: User, now: datetime, default_tz: str, label: str | None = None) -> Period:
    """The user's month at ``now`` (or the one named ``label``, YYYY-MM; ValueError if bad)."""
    try:
        tz = zone(user.tz)
    except UnknownTimeZoneError:
        tz = zone(default_tz)
    return period_named(label, tz) if label is not None else period_at(now, tz)


def _previous(period: Period, count: int) -> list[str]:
    labels = []
    year, month = map(int, period.label.split("-"))
    for _ in range(count):
        year, month = (year - 1, 12) if month == 1 else (year, month - 1)
        labels.append(f"{year:04d}-{month:02d}")
    return labels


async def usage_report(user: User, period: Period, *, quota: QuotaStore,
                       policies: Policies, history: int = HISTORY_MONTHS) -> dict[str, Any]:
    """Plan, limit, used, remaining, percent, reset, thresholds notified, recipients refused
    as suppressed, pending change and the previous months' counts. Raises
    StoreUnavailableError."""
    months = await quota.history(user.id, [period.label, *_previous(period, history)])
    usage = months[period.label]
    terms = terms_in_force(user, period.label, policies)
    limit = terms.limit
    pending = None
    if user.pending is not None and user.pending.effective_from > period.label:
        pending = {"plan": user.pending.plan, "custom_limit": user.pending.custom_limit,
                   "effective_from": user.pending.effective_from}
    return {
        "user_id": user.id, "email": user.email, "status": user.status,
        "plan": terms.plan, "custom_limit": terms.custom_limit, "limit": limit,
        "period": period.label, "tz": user.tz,
        "used": usage.used, "delivered": usage.delivered, "in_flight": usage.in_flight,
        # Recipients delivered per route this month; uncounted routes (MailChimp) included.
        "routes": dict(usage.routes),
        # Recipients refused (or dropped at the end of DATA) as suppressed this month, never
        # counted in "used"; by the entry's reason (docs/suppression.md).
        "suppressed": usage.suppressed,
        "suppressed_reasons": dict(sorted(usage.suppressed_reasons.items())),
        "remaining": max(limit - usage.used, 0) if limit is not None else None,
        "percent": round(100 * usage.used / limit, 1) if limit else None,
        "resets_at": period.resets_at.isoformat(),
        "thresholds_notified": list(usage.notified.get(limit, ())) if limit else [],
        "pending_change": pending,
        "history": [{"period": label, "used": months[label].used,
                     "delivered": months[label].delivered, "routes": dict(months[label].routes)}
                    for label in _previous(period, history)],
    }
