"""The forecast (relay/decisions/forecast.py): a cases table of what it says and when it says
nothing, and properties over generated months, counts and moments: never before now, never
at or after the reset, never later for more sends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config.zones import zone
from relay.decisions.forecast import MIN_ELAPSED, MIN_SENDS, Forecast, forecast, forecast_data
from relay.decisions.months import Period, period_named

NOV_UTC = period_named("2026-11", zone("UTC"))
DAY = timedelta(days=1)


def at(period: Period, elapsed: timedelta) -> datetime:
    """The moment ``elapsed`` (real time) after the period began, in UTC."""
    return period.starts_at.astimezone(UTC) + elapsed


@pytest.mark.parametrize(("case", "delivered", "limit", "elapsed", "expected"), [
    # 2,500 of 5,000 in 10 days: the limit 20 days in.
    ("half in a third", 2500, 5000, 10 * DAY, "2026-11-21T00:00:00+00:00"),
    ("just enough days", 2500, 5000, MIN_ELAPSED, "2026-11-07T00:00:00+00:00"),
    ("just enough sends", MIN_SENDS, 11, 3 * DAY, "2026-11-04T07:12:00+00:00"),
    # 29 d 23 h * 3,000 / 2,999: 14 min 23.087695 s later, still in November.
    ("minutes before the reset", 2999, 3000, 29 * DAY + 23 * timedelta(hours=1),
     "2026-11-30T23:14:23.087695+00:00"),
    # 29 d 23 h 50 min * 3,000 / 2,999: 4 min 24 s into December: after the reset.
    ("minutes after the reset", 2999, 3000, 29 * DAY + timedelta(hours=23, minutes=50), None),
    ("too early", 4000, 5000, MIN_ELAPSED - timedelta(seconds=1), None),
    ("too few sends", MIN_SENDS - 1, 10, 20 * DAY, None),
    ("no sends", 0, 5000, 20 * DAY, None),
    ("the pace misses the reset", 1000, 5000, 10 * DAY, None),
    ("reaches it at the reset exactly", 1000, 3000, 10 * DAY, None),
    ("limit reached", 5000, 5000, 20 * DAY, None),
    ("past the limit", 5100, 5000, 20 * DAY, None),
    ("plan not in plans.toml", 2500, None, 10 * DAY, None),
])
def test_forecast_cases(case: str, delivered: int, limit: int | None, elapsed: timedelta,
                        expected: str | None) -> None:
    """The projected moment, or silence, for each case (November 2026, UTC: 30 days)."""
    found = forecast(delivered, limit, NOV_UTC, at(NOV_UTC, elapsed))
    if expected is None:
        assert found is None, case
    else:
        assert found is not None, case
        assert found.reaches_at.isoformat() == expected, case


def test_forecast_says_nothing_outside_its_month() -> None:
    """A report of another month (October, asked in November) carries no forecast."""
    october = period_named("2026-10", zone("UTC"))
    assert forecast(2500, 5000, october, at(NOV_UTC, 10 * DAY)) is None
    assert forecast(2500, 5000, NOV_UTC, at(NOV_UTC, -DAY)) is None
    assert forecast(2500, 5000, NOV_UTC, NOV_UTC.resets_at) is None


def test_forecast_text_and_data() -> None:
    """The sentence the notices and usage show, and the JSON form events and reports carry."""
    found = forecast(2500, 5000, NOV_UTC, at(NOV_UTC, 10 * DAY))
    assert found == Forecast(5000, datetime(2026, 11, 21, tzinfo=zone("UTC")))
    assert found.text == "At this pace you will reach your 5,000-send limit around November 21."
    assert forecast_data(2500, 5000, NOV_UTC, at(NOV_UTC, 10 * DAY)) == {
        "limit": 5000, "reaches_at": "2026-11-21T00:00:00+00:00", "date": "2026-11-21",
        "text": "At this pace you will reach your 5,000-send limit around November 21."}
    assert forecast_data(10, 5000, NOV_UTC, at(NOV_UTC, 10 * DAY)) is None
    big = forecast(20_000, 25_000, NOV_UTC, at(NOV_UTC, 20 * DAY))
    assert big is not None and big.text == (
        "At this pace you will reach your 25,000-send limit around November 26.")


def test_forecast_counts_real_hours_across_a_dst_change() -> None:
    """Chicago's November 2026 begins in daylight time (UTC-5) and ends in standard time
    (UTC-6): 30 days and 1 hour. 2,500 of 5,000 after 10 days and 1 hour of real time reach
    5,000 at 20 days 2 hours: November 21, 01:00 local (wall-clock arithmetic would say
    00:00 and lose the hour)."""
    chicago = period_named("2026-11", zone("America/Chicago"))
    now = datetime(2026, 11, 11, 6, 0, tzinfo=UTC)  # midnight local, standard time
    found = forecast(2500, 5000, chicago, now)
    assert found is not None
    assert found.reaches_at.isoformat() == "2026-11-21T01:00:00-06:00"


def test_forecast_names_the_users_own_day() -> None:
    """Auckland (UTC+13 in November): the limit is reached at 11:00 UTC on November 20,
    which is November 21 there; the forecast names the 21st."""
    auckland = period_named("2026-11", zone("Pacific/Auckland"))
    found = forecast(2500, 5000, auckland, at(auckland, 10 * DAY))
    assert found is not None
    assert found.reaches_at.astimezone(UTC) == datetime(2026, 11, 20, 11, tzinfo=UTC)
    assert found.day.isoformat() == "2026-11-21"
    assert found.text.endswith("around November 21.")


# -- properties ---------------------------------------------------------------------------
ZONES = ["UTC", "America/Chicago", "Pacific/Auckland", "Asia/Kolkata", "Europe/London",
         "Pacific/Chatham", "America/St_Johns"]
MONTHS = [f"{year}-{month:02d}" for year in (2025, 2026, 2027) for month in range(1, 13)]
RUN = settings(max_examples=300, deadline=None, derandomize=True, database=None)


@st.composite
def moments(draw: st.DrawFn) -> tuple[Period, datetime]:
    """A user's month and a moment inside it."""
    period = period_named(draw(st.sampled_from(MONTHS)), zone(draw(st.sampled_from(ZONES))))
    length = period.resets_at.astimezone(UTC) - period.starts_at.astimezone(UTC)
    micros = draw(st.integers(0, length // timedelta(microseconds=1) - 1))
    return period, at(period, timedelta(microseconds=micros))


LIMITS = st.integers(1, 10**9)


@RUN
@given(moments(), LIMITS, st.integers(0, 10**9))
def test_forecast_is_never_before_now_nor_at_or_after_the_reset(
        moment: tuple[Period, datetime], limit: int, delivered: int) -> None:
    """Any forecast falls in [now, reset), in the user's zone, after enough days and sends,
    for a limit not yet reached."""
    period, now = moment
    found = forecast(delivered, limit, period, now)
    if found is None:
        return
    assert now <= found.reaches_at.astimezone(UTC) < period.resets_at.astimezone(UTC)
    assert found.reaches_at.utcoffset() == found.reaches_at.astimezone(
        period.resets_at.tzinfo).utcoffset()
    assert now - period.starts_at >= MIN_ELAPSED
    assert MIN_SENDS <= delivered < limit


@RUN
@given(moments(), LIMITS, st.integers(0, 10**9), st.integers(0, 10**9))
def test_forecast_is_monotone_in_usage(moment: tuple[Period, datetime], limit: int,
                                       fewer: int, more: int) -> None:
    """More sends at the same moment never put the day later, and never silence a forecast
    unless they reach the limit."""
    period, now = moment
    fewer, more = sorted((fewer, more))
    low = forecast(fewer, limit, period, now)
    high = forecast(more, limit, period, now)
    if low is not None:
        if more < limit:
            assert high is not None
            assert high.reaches_at <= low.reaches_at
        else:
            assert high is None


@RUN
@given(moments(), LIMITS, st.integers(0, 10**9))
def test_forecast_is_silent_early_in_the_month(moment: tuple[Period, datetime], limit: int,
                                               delivered: int) -> None:
    """Before MIN_ELAPSED of the month has passed, nothing is forecast, whatever the count."""
    period, now = moment
    if now - period.starts_at < MIN_ELAPSED:
        assert forecast(delivered, limit, period, now) is None
