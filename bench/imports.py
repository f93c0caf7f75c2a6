"""``python -m bench --import-users N``: the rate of bulk onboarding (``command-relay users
import``) for N users against a fresh redis-server of its own, on loopback.

Writes a CSV of N agents (email, id, plan, custom limit for some, time zone, two more sender
addresses, status), then times the real CLI as an operator runs it, each a subprocess:

1. ``create``: every user new (the first import of the brokerage);
2. ``unchanged``: the same file again (every line compared, nothing written);
3. ``update``: every user's time zone changed and one sender swapped for another;
4. ``plan change``: every user's plan changed (through ``plan set``'s rules and audit);
5. ``dry run``: a dry run of the first file against an empty Redis.

users/s is the import's own figure (lines / time from the first line read to the summary);
the wall time adds the interpreter's start; the CLI's CPU seconds (its user + system time)
say what the rate would be with a core to itself, as the load average says how busy the
machine was. Peak RSS is the CLI process's: a file ten times
smaller is imported first (into another database) to show it does not grow with the file.
Prints a table and writes ``bench/results/import-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.procs import REPO, BenchError, clean_env, relay_command, start_redis

MB = 1024 * 1024
PLANS = ("free", "plus", "pro", "team")
ZONES = ("America/Chicago", "America/New_York", "America/Los_Angeles", "America/Denver")


def write_agents(path: Path, count: int, *, variant: int = 0) -> None:
    """``count`` agents; ``variant`` 1 moves each to another time zone and swaps one sender,
    2 also changes each one's plan (the others stay as in variant 1)."""
    with path.open("w") as out:
        out.write("email,id,plan,limit,tz,senders,status\n")
        for n in range(count):
            plan = PLANS[(n + (variant == 2)) % len(PLANS)]
            limit = str(1000 + n) if n % 10 == 0 else ""
            tz = ZONES[(n + (variant >= 1)) % len(ZONES)]
            second = f"homes{n:06d}" if variant >= 1 else f"listings{n:06d}"
            status = "disabled" if n % 50 == 0 else "active"
            out.write(f"agent{n:06d}@brokerage.example,a{n:06d},{plan},{limit},{tz},"
                      f"team{n:06d}@brokerage.example;{second}@brokerage.example,{status}\n")


def run_import(env: dict[str, str], path: Path, *extra: str) -> dict[str, Any]:
    """Run ``command-relay users import PATH --json`` to completion; its summary, wall time
    and peak RSS."""
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([*relay_command(), "users", "import", str(path), "--json", *extra],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    meter = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, meter.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    try:
        summary: dict[str, Any] = json.loads(out)
    except ValueError:
        raise BenchError(f"users import failed ({proc.returncode}): "
                         f"{err.decode(errors='replace')[-2000:]}") from None
    if summary["refused"]:
        raise BenchError(f"users import refused lines: {summary['refusals'][:3]}")
    return {**summary, "wall_s": wall, "cli_cpu_s": cpu, "peak_rss_mb": peak / MB}


def import_benchmark(args: argparse.Namespace) -> int:
    count: int = args.import_users
    load = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-import-"))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    redis = None
    try:
        redis, port = start_redis(workdir)
        redis_proc = psutil.Process(redis.pid)
        env = clean_env(RELAY_REDIS_URL=f"redis://127.0.0.1:{port}/0",
                        RELAY_POLICIES_DIR=str(REPO / "policies"),
                        RELAY_STATE_DIR=str(workdir / "state"))
        files = {}
        for name, size, variant in (("small", max(1, count // 10), 0), ("create", count, 0),
                                    ("update", count, 1), ("plan", count, 2)):
            files[name] = workdir / f"{name}.csv"
            write_agents(files[name], size, variant=variant)
        # In a database of its own, so that the create run below starts from nothing.
        small = run_import({**env, "RELAY_REDIS_URL": f"redis://127.0.0.1:{port}/1"},
                        files["small"])
        runs: list[tuple[str, dict[str, Any]]] = []
        for label, name, extra in (("create", "create", ()), ("unchanged", "create", ()),
                                   ("update", "update", ()), ("plan change", "plan", ())):
            cpu = sum(redis_proc.cpu_times()[:2])
            result = run_import(env, files[name], *extra)
            result["redis_cpu_s"] = sum(redis_proc.cpu_times()[:2]) - cpu
            runs.append((label, result))
            print(f"[bench] {label}: {result['users_per_second']:,} users/s", file=sys.stderr)
        redis.stop()
        redis, port = start_redis(workdir)
        env["RELAY_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        runs.append(("dry run", run_import(env, files["create"], "--dry-run")))
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    header = (f"{stamp}, {psutil.cpu_count()} cores, {platform.python_implementation()} "
              f"{platform.python_version()}: `command-relay users import` of {count:,} users "
              f"(CSV, 3 addresses each) against a local redis-server")
    lines = [header, "", "| run | created | updated | unchanged | users/s | wall s | "
             "CLI CPU s | users per CLI CPU s | peak RSS MB | redis CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in runs:
        lines.append(f"| {label} | {r['created']:,} | {r['updated']:,} | {r['unchanged']:,} "
                     f"| {r['users_per_second']:,} | {r['wall_s']:.1f} | "
                     f"{r['cli_cpu_s']:.1f} | {count / r['cli_cpu_s']:,.0f} | "
                     f"{r['peak_rss_mb']:.0f} | "
                     + (f"{r['redis_cpu_s']:.1f} |" if "redis_cpu_s" in r else "- |"))
    lines.append("")
    lines.append(f"load average {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after (a "
                 f"figure is only as good as the machine is idle: {psutil.cpu_count()} cores)")
    lines.append(f"peak RSS of the CLI importing {max(1, count // 10):,} new users: "
                 f"{small['peak_rss_mb']:.0f} MB; {count:,}: {runs[0][1]['peak_rss_mb']:.0f} MB "
                 "(a real run holds one batch; a dry run keeps what it would write)")
    text = "\n".join(lines)
    print(text)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"import-{stamp}.json"
    path.write_text(json.dumps({"stamp": stamp, "users": count, "text": text,
                                "small_dry_run": small,
                                "runs": [{"label": label, **r} for label, r in runs]},
                               indent=2) + "\n")
    print(f"written: {path}")
    return 0
