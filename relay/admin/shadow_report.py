"""What ``command-relay shadow report`` summarises (docs/shadow.md): the shadow trial's
differences by kind, by app and kind, and a few examples of each kind, read from the Redis
counts of the last days (``relay.decisions.shadow_counts``) or from the relay's JSON log
lines (``shadow.differs``). Both give the same document; the CLI prints it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import date, timedelta
from typing import Any

from relay.config.shadow import KINDS
from relay.decisions.shadow_counts import DayCounts

EVENT = "shadow.differs"
# Log fields that are the logger's, not the difference's: left out of an example.
_LOG_FIELDS = frozenset({"event", "level", "timestamp", "logger", "worker"})


def last_days(today: date, count: int) -> list[str]:
    """``count`` UTC days ending with ``today``, oldest first, as YYYY-MM-DD."""
    return [(today - timedelta(days=n)).isoformat() for n in range(count - 1, -1, -1)]


def _empty(source: str) -> dict[str, Any]:
    return {"source": source, "days": [], "total": 0, "by_kind": dict.fromkeys(KINDS, 0),
            "by_app": {}, "examples": {kind: [] for kind in KINDS}}


def from_counts(days: list[DayCounts], *, examples: int) -> dict[str, Any]:
    """The report of days read from Redis (newest examples first)."""
    report = _empty("redis")
    report["days"] = [d.day for d in days]
    for day in days:
        for kind, count in day.by_kind.items():
            report["by_kind"][kind] = report["by_kind"].get(kind, 0) + count
        for app, kinds in day.by_app.items():
            row = report["by_app"].setdefault(app, {})
            for kind, count in kinds.items():
                row[kind] = row.get(kind, 0) + count
    for day in reversed(days):  # the newest day's examples first
        for kind, found in day.examples.items():
            kept = report["examples"].setdefault(kind, [])
            kept.extend(found[:max(0, examples - len(kept))])
    return _finish(report)


def from_log(lines: Iterable[str], *, examples: int, since: str | None = None,
             source: str = "log") -> dict[str, Any]:
    """The report of the ``shadow.differs`` lines among ``lines`` (JSON log lines; any
    prefix before the JSON object, such as a collector's timestamp, is skipped, and other
    lines are ignored). ``since``: only lines of that UTC day (YYYY-MM-DD) or later.
    Examples: the latest of each kind."""
    report = _empty(source)
    days: set[str] = set()
    latest: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for line in lines:
        if EVENT not in line:
            continue
        start = line.find("{")
        try:
            entry = json.loads(line[start:]) if start >= 0 else None
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("event") != EVENT:
            continue
        day = str(entry.get("timestamp", ""))[:10]
        if since is not None and day < since:
            continue
        kind, app = str(entry.get("kind", "?")), str(entry.get("app", "?"))
        if day:
            days.add(day)
        report["by_kind"][kind] = report["by_kind"].get(kind, 0) + 1
        row = report["by_app"].setdefault(app, {})
        row[kind] = row.get(kind, 0) + 1
        kept = latest.setdefault(kind, [])
        kept.append({("at" if k == "timestamp" else k): v for k, v in entry.items()
                     if k not in _LOG_FIELDS or k == "timestamp"})
        if len(kept) > examples:
            del kept[0]
    report["days"] = sorted(days)
    report["examples"] = {kind: list(reversed(found)) for kind, found in latest.items()}
    return _finish(report)


def _finish(report: dict[str, Any]) -> dict[str, Any]:
    report["total"] = sum(report["by_kind"].values())
    report["by_app"] = {app: {k: kinds[k] for k in sorted(kinds)}
                        for app, kinds in sorted(report["by_app"].items(),
                                                 key=lambda item: (-sum(item[1].values()),
                                                                   item[0]))}
    return report
