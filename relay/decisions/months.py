"""Calendar months in a user's time zone: the quota period (STYLE §1 step 5, §6).

A month is a calendar month in the user's zone, never "30 days" (limits' counter-example).
The reset on the 1st needs no job: the next month is a new Redis key that starts at 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol
from zoneinfo import ZoneInfo

# A month from 1970-01 to 2999-12 (the same pattern as relay/admin/openapi.json's ``period``;
# "$(?!\n)" is the end of the text in Python and in ECMAScript alike).
PERIOD_PATTERN = r"^(19[7-9][0-9]|2[0-9]{3})-(0[1-9]|1[0-2])$(?!\n)"
_LABEL = re.compile(PERIOD_PATTERN)


class Clock(Protocol):
    """Where the relay gets "now"; tests inject a fixed or settable clock."""

    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Period:
    """One quota month: label ``YYYY-MM`` and when the next one starts (aware datetime)."""

    label: str
    starts_at: datetime
    resets_at: datetime

    @property
    def following(self) -> Period:
        """The next month, in the same time zone."""
        tz = self.resets_at.tzinfo
        assert isinstance(tz, ZoneInfo)
        return period_at(self.resets_at, tz)

    @property
    def resets_on(self) -> str:
        """Human date of the reset, e.g. ``December 1, 2026``."""
        return f"{self.resets_at:%B} {self.resets_at.day}, {self.resets_at.year}"


def period_at(now: datetime, tz: ZoneInfo) -> Period:
    """The calendar month containing ``now`` (aware) as seen in ``tz``."""
    local = now.astimezone(tz)
    start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    # Building the next 1st from fields (not adding days) keeps it at local midnight across DST.
    resets = datetime(year, month, 1, tzinfo=tz)
    return Period(label=f"{local.year:04d}-{local.month:02d}", starts_at=start, resets_at=resets)


def period_named(label: str, tz: ZoneInfo) -> Period:
    """The period for a ``YYYY-MM`` label; raises ValueError for a malformed label."""
    try:
        if not _LABEL.match(label):
            raise ValueError(label)
        start = datetime.strptime(label, "%Y-%m").replace(tzinfo=tz)
    except ValueError as exc:
        raise ValueError(f"period must look like YYYY-MM, a month from 1970-01 to 2999-12, "
                         f"got {label!r}") from exc
    return period_at(start, tz)
