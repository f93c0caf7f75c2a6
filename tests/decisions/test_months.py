"""relay.period: the quota month is a calendar month in the user's time zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from relay.config.zones import UnknownTimeZoneError, zone
from relay.decisions.months import period_at, period_named

LA = zone("America/Los_Angeles")
AUCKLAND = zone("Pacific/Auckland")
UTC_ZONE = zone("UTC")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def test_period_at_utc_mid_month() -> None:
    """In UTC, mid-November is 2026-11, starting Nov 1 and resetting Dec 1 at midnight."""
    period = period_at(utc(2026, 11, 15, 12), UTC_ZONE)
    assert period.label == "2026-11"
    assert period.starts_at == utc(2026, 11, 1)
    assert period.resets_at == utc(2026, 12, 1)


@pytest.mark.parametrize(("instant", "tz", "label"), [
    # Los Angeles is UTC-8 in winter: 05:00Z on Dec 1 is still Nov 30 there.
    (utc(2026, 12, 1, 5), LA, "2026-11"),
    (utc(2026, 12, 1, 7, 59, 59), LA, "2026-11"),
    (utc(2026, 12, 1, 8), LA, "2026-12"),
    # Auckland is UTC+13 in (southern) summer: 11:00Z on Nov 30 is already Dec 1 there.
    (utc(2026, 11, 30, 10, 59, 59), AUCKLAND, "2026-11"),
    (utc(2026, 11, 30, 11), AUCKLAND, "2026-12"),
    (utc(2026, 12, 1, 5), UTC_ZONE, "2026-12"),
    (utc(2026, 11, 30, 23, 59, 59), UTC_ZONE, "2026-11"),
])
def test_period_at_month_edges_follow_the_zone(instant: datetime, tz: object,
                                               label: str) -> None:
    """The month label is the local calendar month, not the UTC one."""
    assert period_at(instant, tz).label == label  # type: ignore[arg-type]


def test_period_at_los_angeles_resets_at_local_midnight() -> None:
    """A Los Angeles November resets at 00:00 PST on Dec 1, which is 08:00 UTC."""
    period = period_at(utc(2026, 12, 1, 5), LA)
    assert period.resets_at == utc(2026, 12, 1, 8)
    assert (period.resets_at.hour, period.resets_at.minute) == (0, 0)
    assert period.resets_on == "December 1, 2026"


def test_period_at_auckland_resets_at_local_midnight() -> None:
    """An Auckland November resets at 00:00 NZDT on Dec 1, which is 11:00 UTC on Nov 30."""
    period = period_at(utc(2026, 11, 30, 10), AUCKLAND)
    assert period.label == "2026-11"
    assert period.resets_at == utc(2026, 11, 30, 11)
    assert period.starts_at == utc(2026, 10, 31, 11)


@pytest.mark.parametrize(("instant", "tz", "label", "resets_utc", "resets_on"), [
    (utc(2026, 12, 31, 23, 59, 59), UTC_ZONE, "2026-12", utc(2027, 1, 1), "January 1, 2027"),
    # Already 2027 in Auckland while 2026 in UTC.
    (utc(2026, 12, 31, 11), AUCKLAND, "2027-01", utc(2027, 1, 31, 11), "February 1, 2027"),
    (utc(2026, 12, 31, 10, 59), AUCKLAND, "2026-12", utc(2026, 12, 31, 11), "January 1, 2027"),
    # Still 2026 in Los Angeles while 2027 in UTC.
    (utc(2027, 1, 1, 7), LA, "2026-12", utc(2027, 1, 1, 8), "January 1, 2027"),
])
def test_period_at_december_rolls_over_to_january(instant: datetime, tz: object, label: str,
                                                  resets_utc: datetime,
                                                  resets_on: str) -> None:
    """December's reset is January 1 of the next year, in the user's zone."""
    period = period_at(instant, tz)  # type: ignore[arg-type]
    assert period.label == label
    assert period.resets_at == resets_utc
    assert period.resets_on == resets_on


def test_period_at_reset_stays_at_midnight_when_dst_starts() -> None:
    """Los Angeles March (DST from Mar 8) starts at 00:00 PST and resets at 00:00 PDT."""
    period = period_at(utc(2026, 3, 20), LA)
    assert period.starts_at == utc(2026, 3, 1, 8)
    assert period.resets_at == utc(2026, 4, 1, 7)
    assert period.resets_at.utcoffset() == timedelta(hours=-7)
    # Same-zone subtraction is wall-clock time in Python; compare elapsed time in UTC.
    elapsed = period.resets_at.astimezone(UTC) - period.starts_at.astimezone(UTC)
    assert elapsed == timedelta(days=31, hours=-1)


def test_period_at_reset_stays_at_midnight_when_dst_ends() -> None:
    """Los Angeles November (DST ends Nov 1, 02:00) starts 00:00 PDT and resets 00:00 PST."""
    period = period_at(utc(2026, 11, 1, 10), LA)
    assert period.label == "2026-11"
    assert period.starts_at == utc(2026, 11, 1, 7)
    assert period.resets_at == utc(2026, 12, 1, 8)
    # Same-zone subtraction is wall-clock time in Python; compare elapsed time in UTC.
    elapsed = period.resets_at.astimezone(UTC) - period.starts_at.astimezone(UTC)
    assert elapsed == timedelta(days=30, hours=1)


def test_period_at_auckland_reset_across_dst() -> None:
    """Auckland September (DST from Sep 27) resets at 00:00 NZDT (+13) on Oct 1."""
    period = period_at(utc(2026, 9, 15), AUCKLAND)
    assert period.starts_at == utc(2026, 8, 31, 12)
    assert period.resets_at == utc(2026, 9, 30, 11)
    assert period.resets_at.utcoffset() == timedelta(hours=13)


@pytest.mark.parametrize("tz", [UTC_ZONE, LA, AUCKLAND], ids=str)
def test_period_at_contains_now_all_year(tz: object) -> None:
    """For every 6 hours of 2026: starts_at <= now < resets_at, both at local midnight on a 1st,
    and the label names the local month of starts_at."""
    instant = utc(2026, 1, 1)
    while instant < utc(2027, 1, 1):
        period = period_at(instant, tz)  # type: ignore[arg-type]
        assert period.starts_at <= instant < period.resets_at, instant
        for edge in (period.starts_at, period.resets_at):
            local = edge.astimezone(tz)  # type: ignore[arg-type]
            assert (local.day, local.hour, local.minute) == (1, 0, 0), edge
        assert period.label == f"{period.starts_at.astimezone(tz):%Y-%m}"  # type: ignore[arg-type]
        instant += timedelta(hours=6)


def test_period_resets_on_text() -> None:
    """resets_on is the English date of the reset, without a leading zero."""
    assert period_at(utc(2026, 11, 15), UTC_ZONE).resets_on == "December 1, 2026"
    assert period_at(utc(2026, 8, 15), UTC_ZONE).resets_on == "September 1, 2026"


@pytest.mark.parametrize(("label", "tz", "starts", "resets"), [
    ("2026-11", UTC_ZONE, utc(2026, 11, 1), utc(2026, 12, 1)),
    ("2026-12", UTC_ZONE, utc(2026, 12, 1), utc(2027, 1, 1)),
    ("2026-11", LA, utc(2026, 11, 1, 7), utc(2026, 12, 1, 8)),
    ("2026-12", AUCKLAND, utc(2026, 11, 30, 11), utc(2026, 12, 31, 11)),
])
def test_period_named_parses_label(label: str, tz: object, starts: datetime,
                                   resets: datetime) -> None:
    """period_named("YYYY-MM") is the same month, starting and resetting at local midnight."""
    period = period_named(label, tz)  # type: ignore[arg-type]
    assert period.label == label
    assert period.starts_at == starts
    assert period.resets_at == resets


@pytest.mark.parametrize("label", ["2026-13", "2026-00", "nope", "", "2026/11", "2026-11-05"])
def test_period_named_rejects_malformed_label(label: str) -> None:
    """A label that is not YYYY-MM is a ValueError quoting it and the expected form."""
    with pytest.raises(ValueError, match="YYYY-MM") as info:
        period_named(label, UTC_ZONE)
    assert repr(label) in str(info.value)


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "America/Los Angeles", "", "/etc/passwd",
                                  "../zoneinfo/UTC"])
def test_zone_unknown_name_is_named(name: str) -> None:
    """zone() refuses a name that is not an IANA zone with UnknownTimeZoneError naming it."""
    with pytest.raises(UnknownTimeZoneError) as info:
        zone(name)
    assert repr(name) in str(info.value)


def test_zone_known_name() -> None:
    """zone() returns the IANA zone for a valid name."""
    assert zone("Pacific/Auckland").key == "Pacific/Auckland"
