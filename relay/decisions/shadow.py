"""What candidate policies would have done differently, pure (docs/shadow.md).

Each function takes one live decision's inputs and its outcome, evaluates the candidate
policies on the same inputs, and returns the ``Difference`` or None. No I/O and nothing is
enforced: the trial (``relay.decisions.shadow_trial``) logs and counts what these return.

* **route**: ``choose_route`` with the candidate's routing, for the same app, saved
  preference and ``X-KW-Route`` value;
* **refusal**: would the candidate's limit have refused (or accepted) the units the live
  reservation was asked for, given the count it returned, and with which reply;
* **notice**: which threshold the candidate's thresholds and limit would have crossed with
  the delivered count the live commit returned, and on which channels.

The candidate is judged against the live count, one decision at a time: a candidate that
would have refused earlier recipients would have a lower count by now, which no shadow can
know. A decision the live terms cannot explain (the user's plan changed since MAIL FROM) is
not compared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from relay.config.policies import Notifications, Policies
from relay.config.routing import Routing
from relay.config.shadow import NOTICE, REFUSAL, ROUTE
from relay.decisions.months import Period
from relay.decisions.quota import Reservation, ReserveStatus, Settlement, refusal_for
from relay.decisions.routing import Decision, choose_route
from relay.decisions.subscriptions import terms_in_force
from relay.errors import QuotaExceededError, RelayError
from relay.identity.accounts import User

# Event kinds of the notices a commit's crossing raises (relay.events.stream's names).
_REACHED, _THRESHOLD = "quota.reached", "quota.threshold"


@dataclass(frozen=True, slots=True)
class Difference:
    """What the live policy did and what the candidate would have done, in a few words
    (``"command (counted)"``, ``"refused 550 5.7.1"``, ``"80% (in_app, email)"``), with
    the figures behind them for the log line."""

    kind: str
    live: str
    candidate: str
    detail: Mapping[str, str | int | None] = field(default_factory=dict)


def route_difference(live: Decision, candidate: Routing, *, app: str,
                     preference: str | None, header: str) -> Difference | None:
    """Another route (or a refusal instead of a route, or the other way round)."""
    would = choose_route(candidate, app=app, preference=preference, header=header)
    said, would_say = _route_text(live), _route_text(would)
    if said == would_say:
        return None
    return Difference(ROUTE, said, would_say,
                      {"live_rule": live.rule, "candidate_rule": would.rule})


def _route_text(decision: Decision) -> str:
    if decision.route is None:
        return f"refused ({decision.refusal})"
    return f"{decision.route.name} ({'counted' if decision.route.counted else 'not counted'})"


def refusal_difference(live: Reservation, *, units: int, user: User, period: Period,
                       app: str, policies: Policies, candidate: Policies
                       ) -> Difference | None:
    """A refusal the candidate would have made (or not made, or made with another reply)
    for ``units`` recipients whose live reservation returned ``live``. Only a reservation
    that was made or refused for the limit is compared (a disabled user is refused by
    either, and a retry's count already holds its units)."""
    if live.status not in (ReserveStatus.RESERVED, ReserveStatus.OVER_LIMIT):
        return None
    in_force = terms_in_force(user, period.label, policies)
    if in_force.limit != live.limit:
        return None  # the user's terms changed since MAIL FROM: nothing to compare with
    before = live.used - units if live.status is ReserveStatus.RESERVED else live.used
    limit = terms_in_force(user, period.label, candidate).limit
    if limit is None:
        would = Reservation(ReserveStatus.UNKNOWN_PLAN, 0, 0)
    elif before + units <= limit:
        would = Reservation(ReserveStatus.RESERVED, before + units, limit)
    else:
        would = Reservation(ReserveStatus.OVER_LIMIT, before, limit)
    if would.status is live.status is ReserveStatus.RESERVED:
        return None  # the common case, decided without building a reply
    refused = _refusal(live, policies, app, period)
    would_refuse = _refusal(would, candidate, app, period)
    if _reply_key(refused, policies) == _reply_key(would_refuse, candidate):
        return None
    detail: dict[str, str | int | None] = {
        "plan": in_force.plan, "used": before, "units": units, "live_limit": live.limit,
        "candidate_limit": limit}
    if would_refuse is not None:
        detail["candidate_reply"] = would_refuse.reply
    return Difference(REFUSAL, _outcome(refused), _outcome(would_refuse), detail)


def _refusal(result: Reservation, policies: Policies, app: str,
             period: Period) -> RelayError | None:
    return refusal_for(result, over_limit=policies.over_limit,
                       permanent=policies.routing.app(app).timeline, resets_on=period.resets_on)


def _reply_key(refusal: RelayError | None, policies: Policies) -> tuple[object, ...] | None:
    """What makes two refusals differ: the code, the status and the reply's template (the
    same template with other figures in it is the same policy)."""
    if refusal is None:
        return None
    template = policies.over_limit.text if isinstance(refusal, QuotaExceededError) \
        else refusal.text
    return (refusal.code, refusal.status, template)


def _outcome(refusal: RelayError | None) -> str:
    return "accepted" if refusal is None else f"refused {refusal.code} {refusal.status}"


def notice_difference(live: Settlement, *, user: User, period: Period, policies: Policies,
                      candidate: Policies) -> Difference | None:
    """Another notice (threshold, or channels) for the delivered sends a live commit made
    final: the candidate crosses a percent of its limit when the count before this commit
    was below it and the delivered count after it is at or above it."""
    if live.units <= 0 or live.limit <= 0:
        return None  # a repeat commit crosses nothing; a user or plan gone has no limit
    in_force = terms_in_force(user, period.label, policies)
    if in_force.limit != live.limit:
        return None
    limit = terms_in_force(user, period.label, candidate).limit
    percents = _percents(candidate.notifications)
    if limit == live.limit and percents == _percents(policies.notifications):
        crossed = live.crossed  # the same marks: the live commit's answer is the candidate's
    elif limit is None:
        crossed = 0  # commit.lua crosses nothing without a limit
    else:
        before = live.delivered - live.units
        crossed = max((p for p in percents
                       if before * 100 < limit * p <= live.delivered * 100), default=0)
    if crossed == live.crossed == 0:
        return None  # neither notifies: the common case
    said = _notice_text(live.crossed, policies.notifications)
    would_say = _notice_text(crossed, candidate.notifications)
    if said == would_say:
        return None
    return Difference(NOTICE, said, would_say,
                      {"delivered": live.delivered, "units": live.units,
                       "live_limit": live.limit, "candidate_limit": limit})


def _percents(notifications: Notifications) -> tuple[int, ...]:
    return (*notifications.thresholds, *((100,) if notifications.notify_limit_reached else ()))


def _notice_text(percent: int, notifications: Notifications) -> str:
    """``"none"``, or the percent and the channels its event goes to."""
    if not percent:
        return "none"
    kind = _REACHED if percent == 100 else _THRESHOLD
    channels = [name for name, channel in (("in_app", notifications.in_app),
                                           ("timeline", notifications.timeline),
                                           ("email", notifications.email))
                if channel.enabled and kind in channel.kinds]
    return f"{percent}% ({', '.join(channels) or 'no channel'})"
