"""IANA time zones by name: the one place a zone name is checked (settings, users, API)."""

from __future__ import annotations

from functools import cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones


class UnknownTimeZoneError(ValueError):
    pass


def zone(name: str) -> ZoneInfo:
    """The IANA zone called ``name``; raises UnknownTimeZoneError for a bad name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise UnknownTimeZoneError(f"unknown time zone {name!r}") from exc


@cache
def time_zone_names() -> frozenset[str]:
    """Every IANA zone name a new user may be given (what the admin API document lists)."""
    return frozenset(available_timezones())

