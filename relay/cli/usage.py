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
    if report["suppressed"]:
        lines.append(f"  refused as suppressed: {report['suppressed']:,} ("
                     + ", ".join(f"{reason} {count:,}" for reason, count in
                                 report["suppressed_reasons"].items()) + ")")
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
    past = [h for h in report["history"] if h["used"]]
    if past:
        lines.append("  history: " + ", ".join(f"{h['period']} {h['used']:,}" for h in past))
    return "\n".join(lines)
