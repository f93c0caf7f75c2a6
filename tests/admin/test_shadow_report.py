"""relay/admin/shadow_report.py: the report of ``shadow report``, from Redis day counts and
from log lines, as plain data."""

from __future__ import annotations

import json
from datetime import date

from relay.admin.shadow_report import from_counts, from_log, last_days
from relay.cli.shadow import format_report
from relay.decisions.shadow_counts import DayCounts


def test_last_days_end_today_oldest_first() -> None:
    assert last_days(date(2026, 3, 1), 3) == ["2026-02-27", "2026-02-28", "2026-03-01"]


def test_from_counts_adds_the_days_up_and_keeps_the_newest_examples() -> None:
    days = [DayCounts("2026-11-14", {"route": 2}, {"campaigns": {"route": 2}},
                      {"route": [{"n": 2}, {"n": 1}]}),
            DayCounts("2026-11-15", {"route": 1, "refusal": 3},
                      {"campaigns": {"route": 1}, "direct": {"refusal": 3}},
                      {"route": [{"n": 3}]})]
    report = from_counts(days, examples=2)
    assert report["days"] == ["2026-11-14", "2026-11-15"]
    assert (report["total"], report["by_kind"]) == (6, {"route": 3, "refusal": 3,
                                                        "notice": 0})
    # Most differences first, then by name.
    assert list(report["by_app"].items()) == [("campaigns", {"route": 3}),
                                              ("direct", {"refusal": 3})]
    assert report["examples"] == {"route": [{"n": 3}, {"n": 2}], "refusal": [], "notice": []}


def test_from_log_counts_only_shadow_differs_lines() -> None:
    lines = [json.dumps({"event": "shadow.differs", "kind": "route", "app": "a", "n": n,
                         "timestamp": f"2026-11-{10 + n}T00:00:00Z", "level": "info"})
             for n in range(5)]
    lines += ['{"event": "delivery.finished"}', "shadow.differs but {not json",
              json.dumps(["shadow.differs"])]
    report = from_log(lines, examples=2, since="2026-11-11")
    assert report["by_kind"]["route"] == 4
    assert report["days"] == ["2026-11-11", "2026-11-12", "2026-11-13", "2026-11-14"]
    assert [e["n"] for e in report["examples"]["route"]] == [4, 3]
    assert report["examples"]["route"][0] == {"kind": "route", "app": "a", "n": 4,
                                              "at": "2026-11-14T00:00:00Z"}


def test_format_report_without_differences_says_so() -> None:
    text = format_report(from_log([], examples=3, source="relay.log"))
    assert text.startswith("shadow trial: no differences, no day (relay.log)")
