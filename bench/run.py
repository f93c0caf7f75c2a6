"""``python -m bench``: start everything, run every scenario, print and save the figures.

Scenarios run in the same invocation, repetitions interleaved (repetition 1 of every
scenario, then repetition 2, ...), so the ratios hold on a noisy machine. Every run is
bounded by a message count and a time cap. Every process started here is stopped on the way
out, also after Ctrl-C, SIGTERM or a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from bench import features, loadgen, probes, report, scale, sessions, shadow
from bench.harness import MB, Bench, plan
from bench.procs import (
    REPO,
    BenchError,
    clean_env,
)
from bench.tls import KEY_KINDS

# -- the whole run -------------------------------------------------------------------------------

def _interrupt(signum: int, frame: FrameType | None) -> None:
    if not loadgen.interrupt():  # a load in progress stops itself, then raises
        raise KeyboardInterrupt(f"signal {signum}")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    for name in ("command-email-relay", "aiosmtpd", "aiosmtplib", "redis", "hiredis",
                 "structlog", "uvloop"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10, check=False)
        found["git"] = commit.stdout.strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        postconf = shutil.which("postconf")
        if postconf:
            found["postfix"] = subprocess.run(
                [postconf, "-d", "-h", "mail_version"], capture_output=True, text=True,
                timeout=10, check=False).stdout.strip()
    return found


def _by_key(scenarios: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["key"]: s for s in scenarios}


def _targets(result: dict[str, Any], per_connection: int) -> list[str]:
    s = _by_key(result["scenarios"])
    lines: list[str] = []

    def rate(key: str) -> float | None:
        return s[key]["summary"]["rate_median"] if key in s else None

    pc = per_connection
    for kb, need in (("2k", 2.0), ("100k", 1.0)):
        postfix = rate(f"postfix-{kb}-c20-pc{pc}")
        for mode in ("plain", "tls"):
            relay = rate(f"relay-{kb}-c20-pc{pc}-{mode}")
            if relay is None:
                continue
            label = f"{kb.upper()}B, 20 sessions, {pc} msg/conn, " \
                    f"{'STARTTLS' if mode == 'tls' else 'plaintext'}"
            if postfix:
                ratio = relay / postfix
                verdict = "meets" if ratio >= need else "misses"
                lines.append(f"{label}: relay {relay:,.0f} msg/s vs Postfix (no AUTH) "
                             f"{postfix:,.0f} msg/s end to end = {ratio:.2f}x "
                             f"(target >= {need:g}x: {verdict})")
            else:
                lines.append(f"{label}: relay {relay:,.0f} msg/s (Postfix not measured)")
        # Like for like: Postfix as a submission relay in the relay's own shapes (issue 15:
        # >= 2x in every shape at 2 KB, and at 100 KB in the persistent shape).
        for shape_pc in (1, pc):
            for mode in ("plain", "tls"):
                relay = rate(f"relay-{kb}-c20-pc{shape_pc}-{mode}")
                twin = rate(f"postfix-{kb}-c20-pc{shape_pc}-{mode}-auth")
                if relay is None or twin is None:
                    continue
                want = 2.0 if kb == "2k" or shape_pc == pc else None
                label = (f"{kb.upper()}B, 20 sessions, {shape_pc} msg/conn, "
                         f"{'STARTTLS' if mode == 'tls' else 'plaintext'} + AUTH")
                ratio = relay / twin
                verdict = ("" if want is None else
                           f" (target >= {want:g}x: {'meets' if ratio >= want else 'misses'})")
                lines.append(f"{label}: relay {relay:,.0f} msg/s vs Postfix submission "
                             f"{twin:,.0f} msg/s = {ratio:.2f}x{verdict}")
        base = rate(f"baseline-{kb}-c20-pc{pc}")
        relay = rate(f"relay-{kb}-c20-pc{pc}-plain")
        if base and relay:
            lines.append(f"{kb.upper()}B generator headroom: bare sink {base:,.0f} msg/s = "
                         f"{base / relay:.1f}x the relay's plaintext rate")
        base1, relay1 = rate(f"baseline-{kb}-c20-pc1"), rate(f"relay-{kb}-c20-pc1-plain")
        if base1 and relay1:
            lines.append(f"{kb.upper()}B, a new connection per message: relay {relay1:,.0f} "
                         f"connections/s with AUTH vs bare sink {base1:,.0f}/s")
    lines += report.resumption_lines(s)
    for item in result.get("latency", []):
        p99 = item["added_ms"]["p99"]
        lines.append(f"{item['label']}: p99 added latency {p99:.2f} ms at {item['rate']:,.0f} "
                     f"msg/s (target <= 5 ms: {'meets' if p99 <= 5 else 'misses'})")
    for section in ("sessions", "scale"):
        lines += (result.get(section) or {}).get("targets", [])
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(
        "Benchmark the relay against a bare sink and Postfix on this machine (loopback only)."))
    parser.add_argument("--quick", action="store_true",
                        help="a ~1 minute smoke run: 1 repetition, 20 sessions, small counts")
    parser.add_argument("--reps", type=int, help="repetitions of each scenario (default 3)")
    parser.add_argument("--messages-2k", type=int,
                        help="messages per 2 KB run (default 4000; a fifth with 1 session)")
    parser.add_argument("--messages-100k", type=int,
                        help="messages per 100 KB run (default 1500; a fifth with 1 session)")
    parser.add_argument("--concurrency", type=int, nargs="+",
                        help="concurrent sessions for the relay (default 1 20 100)")
    parser.add_argument("--per-connection", type=int, default=20,
                        help="messages per connection in the persistent modes (default 20)")
    parser.add_argument("--time-cap", type=float,
                        help="seconds after which a run stops sending (default 8)")
    parser.add_argument("--latency-seconds", type=float,
                        help="length of each paced latency run (default 5)")
    parser.add_argument("--memory-sessions", type=int,
                        help="sessions in the memory scenario (default 100)")
    parser.add_argument("--memory-size", type=int, default=10,
                        help="MB per message in the memory scenario (default 10)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the memory scenarios (large messages, idle connections)")
    parser.add_argument("--idle-connections", type=int,
                        help="idle sessions in the memory-per-connection scenario "
                             "(default 1000)")
    parser.add_argument("--no-postfix", action="store_true", help="skip Postfix")
    parser.add_argument("--sessions", type=int, nargs="+", help="concurrent sessions of the "
                        "sessions scenario (default 20 100 1000; quick 20 100; bench/sessions.py)")
    parser.add_argument("--no-sessions", action="store_true", help="skip the sessions scenario")
    parser.add_argument("--scale-users", type=int, nargs="+", help="population steps of the "
                        "users scale scenario (default 1000 10000 100000 1000000; quick 1000 "
                        "10000; bench/scale.py)")
    parser.add_argument("--no-scale", action="store_true", help="skip the users scale scenario")
    parser.add_argument("--no-shadow", action="store_true",
                        help="skip the shadow trial's scenarios (two more relays, trial on)")
    parser.add_argument("--no-features", action="store_true",
                        help="skip the feature-cost rows (suppression lists, a relay with "
                             "deduplication off; bench/features.py)")
    parser.add_argument("--python-sink", action="store_true",
                        help="use the Python asyncio sink instead of smtp-sink")
    parser.add_argument("--workers", type=int,
                        help="RELAY_WORKERS (default: one per core, as serve; 1 with --profile)")
    parser.add_argument("--pool-size", type=int,
                        help="RELAY_UPSTREAM_POOL_SIZE (default: the relay's own, 20)")
    parser.add_argument("--tls-key", choices=KEY_KINDS, default="p256",
                        help="the relay certificate's key (default p256)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results",
                        help="where the .json and .md go")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (relay log, Postfix log) for inspection")
    parser.add_argument("--profile", choices=("py-spy", "cprofile"),
                        help="instead of the benchmark: profile the relay under the 2 KB, "
                             "20-session load (see bench/profile.py)")
    parser.add_argument("--profile-seconds", type=float, default=15.0,
                        help="seconds of load per profiled shape (default 15)")
    parser.add_argument("--import-users", type=int, metavar="N",
                        help="instead of the benchmark: the rate of `command-relay users "
                             "import` for N users (see bench/imports.py)")
    args = parser.parse_args(argv)
    quick = args.quick
    # Counts large enough that a run lasts seconds, not a fraction of one, at today's rates.
    defaults = {"reps": 1 if quick else 3, "messages_2k": 600 if quick else 4000,
                "messages_100k": 200 if quick else 1500,
                "concurrency": [20] if quick else [1, 20, 100],
                "time_cap": 3.0 if quick else 8.0, "latency_seconds": 2.0 if quick else 5.0,
                "memory_sessions": 5 if quick else 100,
                "idle_connections": 100 if quick else 1000,
                "sessions": [20, 100] if quick else [20, 100, 1000],
                "scale_users": [1000, 10000] if quick else [1000, 10000, 100000, 1000000]}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _check_quiet(bench: Bench, when: str, exclude: frozenset[int] = frozenset()) -> None:
    """Note other processes' CPU use: the figures assume a machine otherwise idle."""
    others = [p for p in psutil.process_iter(["pid"]) if p.pid not in exclude
              and p.pid != os.getpid()]
    before = {}
    for p in others:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            before[p.pid] = (p, t.user + t.system)
    time.sleep(1.0)
    used = 0.0
    for p, cpu in before.values():
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            used += t.user + t.system - cpu
    busy = 100 * used / (psutil.cpu_count() or 1)
    bench.say(f"other processes used {busy:.0f}% of the machine {when}")
    if busy > 10:
        bench.notes.append(f"other processes used {busy:.0f}% of the machine's CPU {when}: "
                           "the figures are unreliable, run again on an idle machine")


@contextlib.contextmanager
def _signals() -> Iterator[None]:
    # SIGINT too: a shell without job control starts background commands with it ignored.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.import_users:
        from bench.imports import import_benchmark

        return import_benchmark(args)
    if args.profile:
        from bench.profile import profile

        with _signals(), Bench(args) as bench:
            return profile(bench, args)
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    clock = time.perf_counter()
    scenarios = plan(args) + ([] if args.no_shadow else shadow.scenarios(args)) \
        + ([] if args.no_features else features.scenarios(args))
    try:
        with _signals(), Bench(args) as bench:
            _check_quiet(bench, "before the run")
            bench.start(with_postfix=not args.no_postfix,
                        shadow=None if args.no_shadow else
                        shadow.write_candidates(bench.workdir / "shadow"),
                        extra=None if args.no_features else features.RELAYS)
            seeded = None if args.no_features else features.seed_suppressions(
                bench.workdir, clean_env(**bench.relay_env), bench.senders)
            if bench.postfix is None:
                scenarios = [s for s in scenarios if s.target not in ("postfix", "submission")]
            bench.warm_up()
            runs: dict[str, list[dict[str, Any]]] = {s.key: [] for s in scenarios}
            for rep in range(args.reps):
                for number, sc in enumerate(scenarios, 1):
                    bench.say(f"rep {rep + 1}/{args.reps}, {number}/{len(scenarios)}: {sc.key}")
                    run, _ = bench.measure(sc)
                    runs[sc.key].append(run)
            results = [{**asdict(sc), "runs": runs[sc.key]} for sc in scenarios]
            for item in results:
                item["summary"] = report.summarise(item["runs"])
            latency = probes.latency(bench, results, args)
            round_trips = probes.round_trips(bench, args)
            memory = None if args.no_memory else probes.memory(bench, args)
            idle = None if args.no_memory else probes.idle_connections(bench, args)
            many = None if args.no_sessions else sessions.measure_sessions(bench, args, results)
            users = None if args.no_scale else scale.measure_scale(bench, args)
            _check_quiet(bench, "after the run", exclude=bench.own_pids())
            relay_log_mb = bench.relay_log.stat().st_size / MB
            with bench.relay_log.open("rb") as log:
                log_lines = sum(1 for _ in log)
            lines_per_msg = log_lines / max(1, bench.relay_delivered)
            rss = {"start_mb": bench.rss_at_start / MB,
                   "after_warm_up_mb": bench.rss_after_warm_up / MB}
            sink_kind = bench.sink.kind
            notes = bench.notes
            postfix_ran = bench.postfix is not None
            relay_env = bench.relay_env
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    duration = time.perf_counter() - clock
    versions = _versions()
    header = [
        f"{stamp}, {psutil.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}, generator on {loadgen.loop_name()}, "
        f"relay {versions.get('git', '?')}",
        f"upstream sink: {sink_kind}; Postfix: "
        + (f"ran ({versions.get('postfix', '?')}, throwaway instance)" if postfix_ran
           else "not run"),
        f"{args.reps} runs per scenario (median, min-max); {args.messages_2k} x 2 KB / "
        f"{args.messages_100k} x 100 KB messages per run, each run capped at "
        f"{args.time_cap:g} s; relay: JSON logs at info to a file, quota on, "
        f"upstream pool {args.pool_size or 'default (20)'} per worker, "
        f"{relay_env['RELAY_WORKERS']} worker(s)",
        f"relay RSS {rss['start_mb']:.0f} MB after start, {rss['after_warm_up_mb']:.0f} MB "
        f"after the warm-up; its JSON log grew to {relay_log_mb:.0f} MB, "
        f"{lines_per_msg:.1f} lines per message delivered",
        "msg/s = messages the sink received / time from the first connection until the "
        "sink had them all; CPU s/1k = CPU seconds per 1,000 delivered messages "
        "(for Postfix rows: its whole process tree); busy % = both cores' use",
    ]
    result: dict[str, Any] = {
        "stamp": stamp, "started_at": started.isoformat(), "duration_s": duration,
        "quick": args.quick,
        "machine": {"cores": psutil.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "generator_loop": loadgen.loop_name()},
        "versions": versions, "sink": sink_kind, "postfix_ran": postfix_ran,
        "relay_env": {k: v for k, v in relay_env.items() if "KEY" not in k},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "relay_log_mb": relay_log_mb, "relay_log_lines_per_msg": lines_per_msg,
        "relay_rss": rss,
        "header_lines": header, "scenarios": results, "latency": latency,
        "memory": memory, "idle_connections": idle, "notes": notes,
        "sessions": many, "scale": users,
    }
    result["targets"] = _targets(result, args.per_connection)
    result["shadow"] = None if args.no_shadow else \
        shadow.cost(result, args.per_connection, shadow.hooks())
    result["features"] = None if args.no_features else features.cost(
        result, args.per_connection, seeded, features.rcpt_cost())
    rt = round_trips
    result["redis_round_trips"] = rt
    result["redis_breakdown"] = (
        f"{rt['round_trips_per_msg']:.1f} round trips per message (MONITOR over "
        f"{rt['messages']} messages, 2 KB, 20 sessions; pipelined commands counted once), "
        f"{rt['commands_sent_per_msg']:.1f} commands sent: "
        + ", ".join(f"{k} {v:.2f}" for k, v in rt["sent_per_msg"].items())
        + f"; plus {rt['scripted_total_per_msg']:.1f} run inside Lua scripts ("
        + ", ".join(f"{k} {v:.2f}" for k, v in rt["scripted_per_msg"].items()) + ")")
    print()
    print(report.render(result, markdown=False))
    json_path, md_path = report.write(result, args.results, stamp)
    print(f"written: {json_path.relative_to(REPO) if json_path.is_relative_to(REPO) else json_path}"
          f", {md_path.name}; whole run {duration:.0f} s")
    return 0

