"""Honest history: the plan and limit that governed each month (issue 14).

A plan change rewrites the user record, so the record alone would show every past month
with today's terms (a downgraded user's October with November's limit). Each month's usage
hash therefore keeps the terms in force for it: ``reserve.lua`` writes the terms it applied
with every reservation, and ``plan_change.lua`` writes the terms in force after the change
into the current and the next month. The latest write wins, so a month whose custom limit
changed part-way reports the terms it ended with (or its latest, while it runs).

What a month reports:

* the current month (or a future one): the terms in force now (``terms_in_force``), the ones
  the next reservation will apply (source ``in_force``);
* a past month: the terms recorded for it (``recorded``);
* a past month with nothing recorded (sent nothing and saw no change, or older than this
  feature): the user's current terms as they apply to that month, said so (``fallback``).
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config.policies import Policies
from relay.decisions.quota import Usage
from relay.decisions.subscriptions import terms_in_force
from relay.identity.accounts import User

IN_FORCE = "in_force"
RECORDED = "recorded"
FALLBACK = "fallback"


@dataclass(frozen=True, slots=True)
class MonthTerms:
    """The plan and limit reported for one month, and where they come from."""

    plan: str
    custom_limit: int | None
    limit: int | None  # None: a plan no longer in plans.toml, without a custom limit
    source: str  # IN_FORCE, RECORDED or FALLBACK


def month_terms(user: User, period: str, current: str, usage: Usage,
                policies: Policies) -> MonthTerms:
    """The terms reported for ``period`` (YYYY-MM) when the user's month is ``current``,
    from that month's ``usage`` (see the module docstring)."""
    if period < current and usage.terms is not None:
        recorded = usage.terms
        return MonthTerms(recorded.plan, recorded.custom_limit, recorded.limit, RECORDED)
    terms = terms_in_force(user, period, policies)
    return MonthTerms(terms.plan, terms.custom_limit, terms.limit,
                      IN_FORCE if period >= current else FALLBACK)
