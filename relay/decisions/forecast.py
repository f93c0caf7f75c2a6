"""The forecast: when, at this month's pace, a user reaches the monthly limit (issue 14).

A pure function of the month's delivered sends, the limit, the user's month (its start and
its reset, in the user's time zone: ``relay.decisions.months``) and "now" from the relay's
clock. It is shown in ``usage`` (text and ``--json``), the admin API's usage answer and the
threshold notices (email and webhook), and says nothing rather than something wild:

* the month must have run at least ``MIN_ELAPSED`` (three days from local midnight on the
  1st: a morning's burst on the 1st is no pace);
* at least ``MIN_SENDS`` sends must have been delivered this month;
* the limit must be known and not yet reached;
* the projected moment must fall before the reset (a pace that never reaches the limit this
  month is no news).

The pace is linear over the elapsed part of the month: with ``d`` sends delivered in the
first ``e`` of it, the limit ``L`` is reached ``e * L / d`` after the month began. Computed
in whole microseconds (integers), so the answer is exact and never earlier than ``now``, and
more sends never move it later (docs/plans.md, "The forecast").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from relay.decisions.months import Period

MIN_ELAPSED = timedelta(days=3)
MIN_SENDS = 10  # at least 1: the pace divides by it

_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Forecast:
    """The limit is reached around ``reaches_at`` (aware, in the user's time zone)."""

    limit: int
    reaches_at: datetime

    @property
    def day(self) -> date:
        """The user's calendar day of the projected moment."""
        return self.reaches_at.date()

    @property
    def text(self) -> str:
        """``At this pace you will reach your 5,000-send limit around December 24.``"""
        return (f"At this pace you will reach your {self.limit:,}-send limit around "
                f"{self.reaches_at:%B} {self.reaches_at.day}.")

    def as_data(self) -> dict[str, Any]:
        """The JSON form (usage reports, event payloads): ``limit``, ``reaches_at`` (ISO 8601
        with the user's offset), ``date`` (YYYY-MM-DD, the user's day) and ``text``."""
        return {"limit": self.limit, "reaches_at": self.reaches_at.isoformat(timespec="seconds"),
                "date": self.day.isoformat(), "text": self.text}


def forecast(delivered: int, limit: int | None, period: Period,
             now: datetime) -> Forecast | None:
    """When ``delivered`` sends in ``period`` so far, at the same pace, reach ``limit``; None
    when the rule of the module docstring says nothing (too early, too few sends, no limit,
    limit reached, or not before the reset). ``now`` is aware; outside ``period`` nothing
    is forecast."""
    if limit is None or limit <= 0 or delivered < MIN_SENDS or delivered >= limit:
        return None
    # Aware datetimes with the same tzinfo subtract and compare as wall times: in UTC, so a
    # DST change inside the month counts its real hours.
    start = period.starts_at.astimezone(UTC)
    reset = period.resets_at.astimezone(UTC)
    moment = now.astimezone(UTC)
    if not start <= moment < reset:
        return None
    elapsed = moment - start
    if elapsed < MIN_ELAPSED:
        return None
    offset = (elapsed // _MICROSECOND) * limit // delivered
    reaches = start + offset * _MICROSECOND
    if reaches >= reset:
        return None
    return Forecast(limit, reaches.astimezone(period.resets_at.tzinfo))


def forecast_data(delivered: int, limit: int | None, period: Period,
                  now: datetime) -> dict[str, Any] | None:
    """``forecast(...)`` in its JSON form, or None: what an event or a report carries."""
    found = forecast(delivered, limit, period, now)
    return found.as_data() if found is not None else None
