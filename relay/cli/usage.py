"""How ``command-relay usage`` shows one user's report to a person; the report itself (the
same one the admin API returns) is built by ``relay.decisions.usage.usage_report``.
"""

from __future__ import annotations

from typing import Any


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of ``usage_report``."""
    limit = report["limit"]
    lines = [
        f"{report['email']} ({report['user_id']}), plan {report['plan']}"
        + (f" (custom limit {report['custom_limit']:,})" if report["custom_limit"] else "")
        + f", {report['status']}",
        f"  {report['period']} ({report['tz']}): used {report['used']:,} of "
        + (f"{limit:,} ({report['percent']}%), {report['remaining']:,} remaining"
           if limit is not None else "? (plan not in plans.toml)"),
        f"  resets {report['resets_at']}",
    ]
    if report["routes"]:
        lines.append("  by route: " + ", ".join(f"{name} {count:,}" for name, count in
                                                sorted(report["routes"].items())))
    if report["thresholds_notified"]:
        lines.append("  notified at " + ", ".join(f"{p}%" for p in
                                                  report["thresholds_notified"]))
    if report["in_flight"]:
        lines.append(f"  {report['in_flight']} reserved, not yet confirmed delivered")
    if report["pending_change"]:
        change = report["pending_change"]
        lines.append(f"  pending: plan {change['plan']}"
                     + (f" (custom limit {change['custom_limit']:,})"
                        if change["custom_limit"] else "")
                     + f" from {change['effective_from']}")
    if report["terms_source"] == "fallback":
        lines.append(f"  no plan recorded for {report['period']}: today's terms shown")
    if report["forecast"]:
        lines.append(f"  {report['forecast']['text']}")
    past = [h for h in report["history"] if h["used"]]
    if past:
        lines.append("  history: " + ", ".join(_past_month(h) for h in past))
        if any(h["terms_source"] == "fallback" for h in past):
            lines.append("  * no plan recorded for that month: today's terms shown")
    return "\n".join(lines)


def _limit(limit: int | None) -> str:
    return f"{limit:,}" if limit is not None else "?"


def _past_month(month: dict[str, Any]) -> str:
    """``2026-10 4,000 of 10,000 (plus)``; ``*`` marks terms not recorded for the month."""
    mark = "*" if month["terms_source"] == "fallback" else ""
    return f"{month['period']} {month['used']:,} of {_limit(month['limit'])} " \
        f"({month['plan']}{mark})"


def format_months(report: dict[str, Any]) -> list[str]:
    """The plan and limit of each month of ``usage_report`` that has them on record (and the
    current month's, in force): what ``plan history`` prints under the audit trail."""
    lines = [f"  {report['period']}  {_terms(report)} (in force)"]
    for month in report["history"]:
        if month["terms_source"] == "recorded":
            lines.append(f"  {month['period']}  {_terms(month)}")
    return lines


def _terms(month: dict[str, Any]) -> str:
    custom = " (custom)" if month["custom_limit"] is not None else ""
    return f"{month['plan']} {_limit(month['limit'])}{custom}"
