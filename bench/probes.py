"""The scenarios of a run that come after the timed matrix, each measured on the running
parts (bench/harness.py ``Bench``): Redis round trips per message (MONITOR), the paced
latency runs with their per-step profile (bench/latency_profile.py), the memory of large
messages in flight and of idle connections. ``bench.run`` calls them in this order.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections import Counter
from dataclasses import replace
from typing import Any

from bench import latency_profile, report
from bench.harness import APP, APP_PASSWORD, KB, MB, Bench, Scenario
from bench.idle import measure_idle


def _by_key(scenarios: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["key"]: s for s in scenarios}


def round_trips(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Redis MONITOR during a small sample (2 KB, 20 sessions, persistent connections):
    commands the relay sends (round trips) and commands run inside its Lua scripts, per
    message. Separate from the timed runs, as MONITOR slows Redis down."""
    sample = 100
    sc = Scenario("monitor", "monitor", "relay", 2 * KB, 20, args.per_connection, False,
                  True, sample)
    sent: Counter[str] = Counter()
    scripted: Counter[str] = Counter()
    stop = threading.Event()
    ready = threading.Event()

    last: list[Any] = [None, 0.0]  # client of the previous command sent, its time
    trips = [0]

    def watch() -> None:
        with bench.redis.monitor() as monitor:
            ready.set()
            while not stop.is_set():
                entry = monitor.next_command()
                name = entry["command"].split(" ", 1)[0].lower()
                if name in ("monitor", "ping", "info"):
                    continue
                if entry["client_type"] == "lua":
                    scripted[name] += 1
                    continue
                sent[name] += 1
                client = (entry["client_address"], entry["client_port"])
                # Pipelined commands arrive together and run back to back: the same
                # connection again within 50 us, nothing in between, is the same round trip.
                if client != last[0] or entry["time"] - last[1] > 50e-6:
                    trips[0] += 1
                last[0], last[1] = client, entry["time"]

    watcher = threading.Thread(target=watch, name="redis-monitor", daemon=True)
    watcher.start()
    ready.wait(10)
    time.sleep(0.2)
    run, _ = bench.measure(sc)
    stop.set()
    bench.redis.ping()  # wakes the watcher, which then sees ``stop``
    watcher.join(10)
    n = max(1, run["delivered"])
    return {"messages": run["delivered"],
            "sent_per_msg": {k: v / n for k, v in sent.most_common()},
            "scripted_per_msg": {k: v / n for k, v in scripted.most_common()},
            "commands_sent_per_msg": sum(sent.values()) / n,
            "round_trips_per_msg": trips[0] / n,
            "scripted_total_per_msg": sum(scripted.values()) / n}


def _pct(values: list[float]) -> dict[str, float]:
    return {f"p{q}": 1000 * report.percentile(values, q / 100) for q in (50, 95, 99)}


def _median_pct(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def latency(bench: Bench, scenarios: list[dict[str, Any]], args: argparse.Namespace
             ) -> list[dict[str, Any]]:
    """Relay and bare sink at the same paced rate, half the relay's peak for the shape,
    ``reps`` times each, alternating; each percentile is the median over the runs."""
    found = _by_key(scenarios)
    items = []
    port = latency_profile.metrics_port(bench.relay_log)
    watch = latency_profile.Watch(port, bench.relay_log, bench.scheduled()) if port else None
    for kb, size in (("2k", 2 * KB), ("100k", 100 * KB)):
        key = f"relay-{kb}-c20-pc{args.per_connection}-plain"
        if key not in found:
            continue
        peak = found[key]["summary"]["rate_median"]
        if found[key]["summary"]["failed"] or peak <= 0:
            bench.notes.append(f"latency at {kb}B not measured: {key} had failures")
            continue
        rate = max(1.0, peak / 2)
        count = max(50, int(rate * args.latency_seconds))
        relay_sc = Scenario("lat", "lat", "relay", size, 20, args.per_connection, False, True,
                            count)
        cap = args.latency_seconds * 3 + 10
        bench.say(f"latency {kb}B: {args.reps} x {count} messages at {rate:,.0f} msg/s "
                  f"(half of {peak:,.0f}), relay then bare sink")
        base_sc = replace(relay_sc, target="sink", auth=False)
        relay_runs, base_runs = [], []
        failed = {"relay": 0, "baseline": 0}
        profiles, relay_steps, base_steps = [], [], []  # bench/latency_profile.py
        for _ in range(args.reps):
            if watch:
                watch.begin()
            _, out = bench.measure(relay_sc, bench.load_for(relay_sc, rate=rate, time_cap=cap))
            if watch:
                profiles.append(watch.end(out.accepted))
            relay_runs.append(_pct(out.txn_latencies))
            relay_steps.append(out.step_latencies)
            failed["relay"] += out.failed
            _, out = bench.measure(base_sc, bench.load_for(base_sc, rate=rate, time_cap=cap))
            base_runs.append(_pct(out.txn_latencies))
            base_steps.append(out.step_latencies)
            failed["baseline"] += out.failed
        relay_ms, base_ms = _median_pct(relay_runs), _median_pct(base_runs)
        items.append({
            "label": f"{kb.upper()}B, 20 sessions, {args.per_connection} msg/conn, plaintext "
                     "+ AUTH",
            "rate": rate, "messages": count, "peak_rate": peak, "reps": args.reps,
            "relay_failed": failed["relay"], "baseline_failed": failed["baseline"],
            "relay_ms": relay_ms, "baseline_ms": base_ms,
            "added_ms": {k: relay_ms[k] - base_ms[k] for k in relay_ms},
            "relay_runs_ms": relay_runs, "baseline_runs_ms": base_runs,
            "profile": latency_profile.summarise(profiles, relay_steps, base_steps)
            if profiles else None,
        })
        if items[-1]["profile"]:
            items[-1]["profile_md"] = latency_profile.render(items[-1]["profile"], True)
            items[-1]["profile_text"] = latency_profile.render(items[-1]["profile"], False)
    return items


def memory(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    n, size = args.memory_sessions, args.memory_size * MB
    bench.say(f"memory: {n} sessions each sending one {args.memory_size} MB message")
    sc = Scenario("memory", "memory", "relay", size, n, 1, False, True, n)
    idle = bench.relay_meter.usage().rss
    run, out = bench.measure(sc, bench.load_for(sc, time_cap=max(120.0, args.time_cap)))
    peak = run["relay_peak_rss"] or 0
    growth = max(0, peak - idle)
    copies = growth / (n * size) if n * size else 0.0
    text = (f"{n} concurrent sessions, each sending one {args.memory_size} MB message "
            f"({out.accepted} accepted, {out.failed} failed, {run['e2e_s']:.1f} s end to end): "
            f"relay RSS {idle / MB:.0f} MB before, peak {peak / MB:.0f} MB, growth "
            f"{growth / MB:.0f} MB = {copies:.1f}x the {n * size / MB:.0f} MB in flight "
            f"(about {copies:.1f} copies of each body held at the peak).")
    return {"sessions": n, "size": size, "accepted": out.accepted, "failed": out.failed,
            "errors": dict(out.errors), "idle_rss": idle, "peak_rss": peak,
            "growth": growth, "copies_per_session": copies, "e2e_s": run["e2e_s"],
            "relay_cpu_s": run["relay_cpu_s"], "text": text}


def idle_connections(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    n = args.idle_connections
    bench.say(f"idle connections: {n} sessions connect, EHLO, AUTH and wait")
    found = measure_idle(bench.relay_port, (APP, APP_PASSWORD), n, bench.relay_meter)
    per = found.per_connection
    text = (f"{found.opened} of {n} idle sessions (EHLO + AUTH, then waiting): relay RSS "
            f"{found.rss_before / MB:.0f} MB before, {found.rss_idle / MB:.0f} MB with them = "
            f"{per / 1024:.1f} KB per idle connection (target <= 50 KB: "
            f"{'meets' if per <= 50 * 1024 else 'misses'})"
            + (f"; not opened: {found.failures}" if found.failures else ""))
    return {"connections": n, "opened": found.opened, "rss_before": found.rss_before,
            "failures": found.failures,
            "rss_idle": found.rss_idle, "per_connection": per, "text": text}
