"""Concurrent sessions (issue 15): the standard load (2 KB, plaintext AUTH as the app,
``--per-connection`` messages per connection) at ``--sessions`` concurrent sessions (20, 100
and 1,000): throughput, transaction p50/p99, the relay's peak RSS (every worker, VmHWM reset
before each run) and what each session adds to it.

A session count the relay matrix already runs (``--concurrency``: 1, 20, 100) is not run
again: its plaintext row (``relay-2k-cN-pcP-plain``) is the figure, so the report has one row
per shape. The other counts run here, repetitions interleaved, and their rows join the main
table. More than ``loadgen.PER_SOURCE`` sessions come from several loopback addresses
(127.0.1.x, a hundred each), so the relay's per-address limit (RELAY_MAX_CONNECTIONS_PER_IP,
200 per process) stays as in production.

Each added count sends at least ``sessions x per_connection`` messages, so that every
session does a whole connection's worth and the figure is the steady state rather than the
burst of a thousand connections and AUTHs; its time cap grows in proportion (at most 30 s).
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from dataclasses import asdict
from typing import Any

from bench import report
from bench.harness import KB, MB, Bench, Scenario
from bench.loadgen import PER_SOURCE, spread

LABEL = "relay -> sink, plaintext + AUTH"
MAX_CAP = 30.0


def key(sessions: int, per_connection: int) -> str:
    """The row's key, as bench.harness.plan names the matrix's plaintext 2 KB rows."""
    return f"relay-2k-c{sessions}-pc{per_connection}-plain"


def _scenario(sessions: int, args: argparse.Namespace) -> Scenario:
    count = max(args.messages_2k, sessions * args.per_connection)
    label = LABEL + (f", from {len(spread(sessions))} addresses" if sessions > PER_SOURCE
                     else "")
    return Scenario(key(sessions, args.per_connection), label, "relay", 2 * KB, sessions,
                    args.per_connection, False, True, count)


def measure_sessions(bench: Bench, args: argparse.Namespace,
                     results: list[dict[str, Any]]) -> dict[str, Any]:
    """Run the session counts the matrix lacks (their rows are appended to ``results``,
    summarised), then describe every count of ``args.sessions`` from its row."""
    have = {item["key"] for item in results}
    own = [_scenario(n, args) for n in args.sessions if key(n, args.per_connection) not in have]
    runs: dict[str, list[dict[str, Any]]] = {sc.key: [] for sc in own}
    for rep in range(args.reps):
        for sc in own:
            cap = min(MAX_CAP, args.time_cap * max(1.0, sc.messages / args.messages_2k))
            bench.say(f"sessions: rep {rep + 1}/{args.reps}, {sc.concurrency} sessions, "
                      f"{sc.messages} messages (cap {cap:.0f} s)")
            load = bench.load_for(sc, time_cap=cap,
                                  sources=spread(sc.concurrency) if sc.concurrency > PER_SOURCE
                                  else ())
            run, _ = bench.measure(sc, load)
            runs[sc.key].append(run)
    for sc in own:
        item = {**asdict(sc), "runs": runs[sc.key]}
        item["summary"] = report.summarise(item["runs"])
        results.append(item)
    by_key = {item["key"]: item for item in results}
    items = [_describe(n, by_key[key(n, args.per_connection)])
             for n in args.sessions if key(n, args.per_connection) in by_key]
    return {"items": items, "header": HEADER, "rows": [_row(i) for i in items],
            "text": ("2 KB, plaintext + AUTH as the app, "
                     f"{args.per_connection} messages per connection, {args.reps} runs per "
                     "count (median); RSS: the relay's peak (all workers, VmHWM reset before "
                     "each run), per session = (peak - RSS before the run) / sessions; "
                     "generator core % = the generator's CPU / the run's time (100 = one "
                     "core: the generator would be the limit)."),
            "targets": [_target(items)] if items else []}


def _describe(sessions: int, item: dict[str, Any]) -> dict[str, Any]:
    runs, m = item["runs"], item["summary"]
    per_session = [(r["relay_peak_rss"] - r["relay_rss_before"]) / sessions for r in runs
                   if r.get("relay_peak_rss") and r.get("relay_rss_before") is not None]
    e2e = sum(r["e2e_s"] for r in runs)
    errors: Counter[str] = Counter()
    for r in runs:
        errors.update(r["errors"])
    return {"sessions": sessions, "key": item["key"], "rate": m["rate_median"],
            "rate_min": m["rate_min"], "rate_max": m["rate_max"],
            "txn_ms": m["txn_ms"], "setup_ms": m["setup_ms"],
            "relay_peak_rss_mb": m["relay_peak_rss_mb"],
            "rss_before_mb": statistics.median([r["relay_rss_before"] / MB for r in runs
                                                if r.get("relay_rss_before")] or [0]),
            "rss_per_session_kb": statistics.median(per_session) / 1024 if per_session
            else None,
            "relay_cpu_s_per_1000": m["relay_cpu_s_per_1000"],
            "generator_cpu_s_per_1000": m["generator_cpu_s_per_1000"],
            "generator_core_pct": 100 * sum(r["generator_cpu_s"] for r in runs) / e2e
            if e2e else 0.0,
            "busy_pct": m["machine_busy_pct"], "delivered": m["delivered"],
            # Fewer than per_connection when the time cap ended the runs early: more of the
            # relay's CPU then went to connections and AUTH.
            "messages_per_connection": m["delivered"] / max(1, sum(r["connections"]
                                                                 for r in runs)),
            "failed": m["failed"], "errors": dict(errors.most_common(5))}


HEADER = ("sessions", "msg/s median (min-max)", "txn p50/p99 ms", "setup p99 ms", "msg/conn",
          "relay CPU s/1k", "relay RSS before MB", "relay peak RSS MB", "per session KB",
          "gen core %", "busy %", "failed")


def _row(i: dict[str, Any]) -> tuple[str, ...]:
    def num(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    failed = str(i["failed"]) + (f" ({', '.join(f'{k}: {v}' for k, v in i['errors'].items())})"
                                 if i["errors"] else "")
    return (f"{i['sessions']:,}",
            f"{i['rate']:,.0f} ({i['rate_min']:,.0f}-{i['rate_max']:,.0f})",
            f"{i['txn_ms']['p50']:.1f}/{i['txn_ms']['p99']:.1f}",
            f"{i['setup_ms']['p99']:.1f}", f"{i['messages_per_connection']:.1f}",
            num(i["relay_cpu_s_per_1000"], 2),
            num(i["rss_before_mb"]), num(i["relay_peak_rss_mb"]),
            num(i["rss_per_session_kb"], 1), f"{i['generator_core_pct']:.0f}",
            f"{i['busy_pct']:.0f}", failed)


def _target(items: list[dict[str, Any]]) -> str:
    counts = "/".join(f"{i['sessions']:,}" for i in items)
    rates = " / ".join(f"{i['rate']:,.0f}" for i in items)
    p99 = " / ".join(f"{i['txn_ms']['p99']:.0f}" for i in items)
    rss = " / ".join(f"{i['relay_peak_rss_mb'] or 0:,.0f}" for i in items)
    per = " / ".join("-" if i["rss_per_session_kb"] is None else f"{i['rss_per_session_kb']:.0f}"
                     for i in items)
    failed = sum(i["failed"] for i in items)
    return (f"sessions {counts}: msg/s {rates}, txn p99 {p99} ms, relay peak RSS {rss} MB "
            f"({per} KB per session)" + (f"; {failed} transactions failed" if failed else ""))
