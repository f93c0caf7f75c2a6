"""``command-relay shadow report``: what candidate policies would have done otherwise
(docs/shadow.md), from the Redis counts of the last days or, with ``--log``, from the
relay's JSON log lines. The summary is built in ``relay.admin.shadow_report``; this module
reads its sources and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, timedelta
from typing import IO, Any

from relay.admin.operations import Admin
from relay.admin.shadow_report import from_counts, from_log, last_days
from relay.config.policies import Policies
from relay.config.settings import Settings
from relay.config.shadow import KINDS, load_candidate
from relay.decisions.months import Clock, SystemClock
from relay.decisions.shadow_counts import ShadowCounts

DEFAULT_DAYS = 7
# The example fields printed in brackets after the outcome, when present.
_CONTEXT = ("at", "app", "user_id", "txn_id")
_SHOWN = frozenset({*_CONTEXT, "kind", "live", "candidate", "plan", "period",
                    "sender_domain", "session_id", "peer", "login", "route"})


class ShadowLogError(Exception):
    """The ``--log`` file cannot be read; the message says which and why."""


def describe_shadow(settings: Settings, live: Policies) -> str:
    """check-config's line for the shadow folder; raises PolicyError for a bad file (the
    relay would serve with the trial off)."""
    directory = settings.shadow_policies_dir
    if directory is None:
        return "shadow policies: off"
    candidate = load_candidate(directory, live)
    if candidate is None:
        return f"shadow policies: {directory}: no policy file (nothing trialled)"
    return f"shadow policies OK: {directory}: {', '.join(candidate.files)} (trialled, " \
           "never enforced)"


async def report_from_redis(args: argparse.Namespace, settings: Settings,
                            admin: Admin) -> None:
    days = last_days(admin.clock.now().astimezone(UTC).date(), args.days or DEFAULT_DAYS)
    counted = await ShadowCounts(admin.redis).read(days)
    _print(from_counts(counted, examples=args.examples), args.json)


def report_from_log(args: argparse.Namespace, clock: Clock | None = None) -> None:
    since = None
    if args.days:
        today = (clock or SystemClock()).now().astimezone(UTC).date()
        since = (today - timedelta(days=args.days - 1)).isoformat()
    with _opened(args.log) as lines:
        report = from_log(lines, examples=args.examples, since=since,
                          source="stdin" if args.log == "-" else args.log)
    _print(report, args.json)


@contextmanager
def _opened(name: str) -> Iterator[IO[str]]:
    if name == "-":
        yield sys.stdin
        return
    try:
        stream = open(name, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ShadowLogError(f"cannot read {name}: {exc.strerror or exc}") from None
    with stream:
        yield stream


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    print(format_report(report))


def format_report(report: dict[str, Any]) -> str:
    days = report["days"]
    span = (f"{days[0]} to {days[-1]}" if len(days) > 1 else days[0]) if days else "no day"
    source = "Redis counts" if report["source"] == "redis" else report["source"]
    if not report["total"]:
        return (f"shadow trial: no differences, {span} ({source}): the candidate policies "
                "decided as the live ones did, or no trial ran (RELAY_SHADOW_POLICIES_DIR)")
    lines = [f"shadow trial: {report['total']:,} differences, {span} ({source})"]
    for kind in KINDS:
        lines.append(f"  {kind:<8} {report['by_kind'].get(kind, 0):>9,}")
    lines.append("")
    lines.append(f"  {'APP':<20}" + "".join(f" {kind.upper():>9}" for kind in KINDS))
    for app, kinds in report["by_app"].items():
        lines.append(f"  {app:<20}" + "".join(f" {kinds.get(k, 0):>9,}" for k in KINDS))
    for kind in KINDS:
        found = report["examples"].get(kind) or []
        if not found:
            continue
        lines.append("")
        lines.append(f"  {kind} (latest):")
        for example in found:
            context = " ".join(f"{k}={example[k]}" for k in _CONTEXT if example.get(k))
            extra = ", ".join(f"{k}={v}" for k, v in example.items()
                              if k not in _SHOWN and v is not None)
            lines.append(f"    {context}")
            lines.append(f"      live: {example.get('live')}  ->  candidate: "
                         f"{example.get('candidate')}" + (f"  ({extra})" if extra else ""))
    return "\n".join(lines)
