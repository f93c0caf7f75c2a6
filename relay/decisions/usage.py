"""A user's usage report: what the admin API returns and ``command-relay usage`` prints
(in the words of ``relay.cli.usage``).

One builder for every view of a user's usage (the CLI, the admin API, the agent's usage
page), so none can disagree on a number: ``usage_report`` gives the month with its own
terms (``relay.decisions.history``) and the forecast (``relay.decisions.forecast``), and
the previous months with theirs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from relay.config.policies import Policies
from relay.config.zones import UnknownTimeZoneError, zone
from relay.decisions.forecast import forecast_data
from relay.decisions.history import month_terms
from relay.decisions.months import Period, period_at, period_named
from relay.decisions.quota import QuotaStore
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
                       policies: Policies, now: datetime,
                       history: int = HISTORY_MONTHS) -> dict[str, Any]:
    """Plan, limit, used, remaining, percent, reset, thresholds notified, pending change, the
    forecast and the previous months' counts, each month with the plan and limit that
    governed it (``terms_source``: in_force, recorded or fallback; relay.decisions.history).

    ``now`` comes from the relay's clock: it tells the current month (whose terms are those
    in force) from past ones (whose terms are their own), and the forecast is made only for
    the month containing it (None otherwise, or when the rule says nothing). Raises
    StoreUnavailableError."""
    previous = _previous(period, history)
    months = await quota.history(user.id, [period.label, *previous])
    tz = period.resets_at.tzinfo
    assert isinstance(tz, ZoneInfo)  # months.py builds periods in a ZoneInfo
    current = period_at(now, tz).label
    usage = months[period.label]
    terms = month_terms(user, period.label, current, usage, policies)
    limit = terms.limit
    pending = None
    if user.pending is not None and user.pending.effective_from > period.label:
        pending = {"plan": user.pending.plan, "custom_limit": user.pending.custom_limit,
                   "effective_from": user.pending.effective_from}
    past = []
    for label in previous:
        month = months[label]
        then = month_terms(user, label, current, month, policies)
        past.append({"period": label, "used": month.used, "delivered": month.delivered,
                     "routes": dict(month.routes), "plan": then.plan,
                     "custom_limit": then.custom_limit, "limit": then.limit,
                     "terms_source": then.source})
    return {
        "user_id": user.id, "email": user.email, "status": user.status,
        "plan": terms.plan, "custom_limit": terms.custom_limit, "limit": limit,
        "terms_source": terms.source,
        "period": period.label, "tz": user.tz,
        "used": usage.used, "delivered": usage.delivered, "in_flight": usage.in_flight,
        # Recipients delivered per route this month; uncounted routes (MailChimp) included.
        "routes": dict(usage.routes),
        "remaining": max(limit - usage.used, 0) if limit is not None else None,
        "percent": round(100 * usage.used / limit, 1) if limit else None,
        "resets_at": period.resets_at.isoformat(),
        "thresholds_notified": list(usage.notified.get(limit, ())) if limit else [],
        "pending_change": pending,
        "forecast": forecast_data(usage.delivered, limit, period, now),
        "history": past,
    }
