"""``python -m bench --profile py-spy|cprofile``: where the relay's CPU goes per message.

Starts the same parts as the benchmark (no Postfix), warms up, then drives the relay from
20 sessions while a profiler watches it:

- ``py-spy``: ``py-spy record --pid <relay> --format raw`` for each load shape (2 KB with
  20 messages per connection in plaintext, a new connection per message, 20 per connection
  with STARTTLS; 100 KB with 20 per connection), summarised by SMTP step, by area and by
  function (self and inclusive);
- ``cprofile``, or when py-spy cannot attach: the relay restarted as
  ``python -m cProfile -o FILE -m relay serve`` under the first shape only, summarised with
  pstats.

Profiling slows the relay; the figures to quote come from ``python -m bench``, the profile
says only where the time goes. Writes ``bench/results/profile-<timestamp>.txt`` (and the
raw py-spy stacks or the .prof file beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import pstats
import shutil
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from bench.procs import BenchError, Service

if TYPE_CHECKING:
    from bench.harness import Bench

KB = 1024
RATE = 200  # samples per second; py-spy pauses the relay briefly for each (full stacks)


def _py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


_AREAS = (
    (("structlog/",), "logging (structlog)"),
    (("aiosmtplib/",), "upstream client (aiosmtplib)"),
    (("aiosmtpd/",), "SMTP server (aiosmtpd)"),
    (("redis/",), "Redis client (redis-py)"),
    (("relay/",), "relay code"),
    (("json/",), "json"),
    (("ssl.py",), "ssl"),
    (("email/",), "email package (address parsing)"),
    (("inspect.py", "typing.py", "<frozen abc>"), "class creation / introspection"),
    (("asyncio/", "selectors.py"), "event loop (asyncio)"),
)


def _area(frame: str) -> str:
    where = frame.partition(" (")[2]
    if where.startswith("relay/cli/"):
        return "other"  # main(): on every stack
    if "site-packages/" in where:
        where = where.rpartition("site-packages/")[2]
    for prefixes, name in _AREAS:
        if where.startswith(prefixes) or any(f"/{p}" in where for p in prefixes):
            return name
    return "other"


def _short(frame: str) -> str:
    """``func (path/to/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    parts = where.split("/")
    for anchor in ("site-packages", "lib"):
        if anchor in parts:
            parts = parts[parts.index(anchor) + 1:]
            break
    else:
        parts = parts[-2:]
    if parts and parts[0].startswith("python3"):
        parts = parts[1:]
    return f"{name} ({'/'.join(parts)})"


def _step(frames: list[str]) -> str:
    """Which part of an SMTP session a stack belongs to (its innermost aiosmtpd verb)."""
    for frame in reversed(frames):
        name = frame.partition(" (")[0]
        if name.startswith("SMTP.smtp_"):
            return name.removeprefix("SMTP.smtp_")
        if "_accept_connection" in name or name in ("RelaySMTP.__init__", "SMTP.__init__"):
            return "accept + new SMTP protocol object"
        if name.startswith(("SMTP.connection_lost", "RelaySMTP.connection_lost")):
            return "connection closed"
    if any("SMTP._handle_client" in f for f in frames):
        return "session loop (reading, parsing commands)"
    if any("SmtpUpstream" in f or "SmtpSession" in f or "aiosmtplib/" in f for f in frames):
        return "upstream pool, outside a verb"
    return "event loop, I/O callbacks, other"


_IDLE = "_worker (concurrent/futures/thread.py"


def summarise_raw(raw: Path, messages: int, cpu_s: float, top: int = 25) -> str:
    """A text summary of py-spy's raw (collapsed) stacks."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaf_area: Counter[str] = Counter()
    any_area: Counter[str] = Counter()
    steps: Counter[str] = Counter()
    total = idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if " (" in f and not f.startswith(
            ("process ", "thread "))]
        if not frames:
            continue
        if frames[-1].startswith(_IDLE):
            # An executor thread waiting for work (the AUTH hash threads): not CPU.
            idle += count
            continue
        total += count
        self_time[_short(frames[-1])] += count
        leaf_area[_area(frames[-1])] += count
        steps[_step(frames)] += count
        for name in {_short(f) for f in frames}:
            inclusive[name] += count
        for area in {_area(f) for f in frames}:
            any_area[area] += count
    if total == 0:
        return "no samples\n"
    per_msg = 1000 * cpu_s / messages if messages else 0.0
    ms = per_msg / total  # relay CPU ms per message carried by one sample

    def table(counter: Counter[str], n: int) -> list[str]:
        return [f"  {100 * c / total:5.1f}%  {c * ms * 1000:7.1f} us/msg  {name}"
                for name, c in counter.most_common(n)]

    out = [f"{total} samples ({idle} more of idle executor threads left out); {messages} "
           f"messages; relay CPU {cpu_s:.2f} s = {per_msg:.3f} ms per message (psutil); "
           "us/msg = that CPU shared out by samples", "",
           "By SMTP step (innermost aiosmtpd verb on the stack):", *table(steps, 12), "",
           "By area, self time (where the CPU instruction was):", *table(leaf_area, 12), "",
           "By area, inclusive (any frame on the stack; overlaps):",
           *table(Counter({k: v for k, v in any_area.items() if k != "other"}), 12), "",
           f"Top {top} functions, self time:", *table(self_time, top), "",
           f"Top {top} functions, inclusive:",
           *table(Counter({k: v for k, v in inclusive.items() if v < total}), top)]
    return "\n".join(out) + "\n"


def _shapes(args: argparse.Namespace) -> list[tuple[str, int, bool, int]]:
    """(label, messages per connection, STARTTLS, message size)."""
    pc = args.per_connection
    return [(f"2 KB, 20 sessions, {pc} msg/conn, plaintext + AUTH", pc, False, 2 * KB),
            ("2 KB, 20 sessions, a new connection per message, plaintext + AUTH", 1, False,
             2 * KB),
            (f"2 KB, 20 sessions, {pc} msg/conn, STARTTLS + AUTH", pc, True, 2 * KB),
            (f"100 KB, 20 sessions, {pc} msg/conn, plaintext + AUTH", pc, False, 100 * KB)]


def profile(bench: Bench, args: argparse.Namespace) -> int:
    from bench.harness import Scenario

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    results = args.results
    results.mkdir(parents=True, exist_ok=True)
    seconds = args.profile_seconds
    base = Scenario("profile", "profile", "relay", 2 * KB, 20, args.per_connection, False,
                    True, 10**7)
    prof_path = results / f"profile-{stamp}.prof"
    use_cprofile = args.profile == "cprofile" or _py_spy() is None
    try:
        bench.start(with_postfix=False, relay_prefix=(
            (sys.executable, "-m", "cProfile", "-o", str(prof_path)) if use_cprofile else ()))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    bench.warm_up()
    sections: list[str] = [f"Profile of the relay, {stamp} (bench/profile.py)"]
    if not use_cprofile:
        py_spy = _py_spy()
        assert py_spy is not None
        for number, (label, pc, tls, size) in enumerate(_shapes(args), 1):
            raw = results / f"profile-{stamp}-{number}.txt.raw"
            spy = Service("py-spy", [py_spy, "record", "--pid", str(bench.relay.pid),
                                     "--rate", str(RATE), "--duration", str(int(seconds)),
                                     "--format", "raw", "--function",
                                     "--output", str(raw)],
                          stderr=bench.workdir / f"py-spy-{number}.err")
            try:
                time.sleep(1.0)  # let it attach
                if not spy.alive():
                    err = (bench.workdir / f"py-spy-{number}.err").read_text(errors="replace")
                    bench.notes.append(f"py-spy could not attach: {err.strip()[-300:]}")
                    use_cprofile = True
                    break
                bench.say(f"profiling with py-spy: {label}")
                sc = replace(base, per_connection=pc, tls=tls, size=size)
                run, _ = bench.measure(sc, bench.load_for(sc, time_cap=seconds - 2))
                spy.proc.wait(seconds + 30)
            finally:
                spy.stop()
            if not raw.exists():
                bench.notes.append("py-spy wrote no output")
                use_cprofile = True
                break
            sections.append(f"== {label}: {run['delivered']} messages at "
                            f"{run['rate']:,.0f} msg/s while sampled ==\n"
                            + summarise_raw(raw, run["delivered"], run["relay_cpu_s"] or 0.0))
    if use_cprofile:
        if args.profile != "cprofile" and _py_spy() is not None:
            bench.say("py-spy unavailable: restarting the relay under cProfile")
            bench.restart_relay((sys.executable, "-m", "cProfile", "-o", str(prof_path)))
            bench.warm_up()
        label = _shapes(args)[0][0]
        bench.say(f"profiling with cProfile: {label}")
        run, _ = bench.measure(base, bench.load_for(base, time_cap=seconds))
        bench.relay.stop()  # cProfile writes its file when the relay exits
        text = io.StringIO()
        with contextlib.suppress(OSError):
            stats = pstats.Stats(str(prof_path), stream=text)
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumulative").print_stats(30)
        sections.append(f"== cProfile, {label}: {run['delivered']} messages (warm-up "
                        f"included in the profile) ==\n{text.getvalue()}")
    if bench.notes:
        sections.append("Notes:\n" + "\n".join(f"  {n}" for n in bench.notes))
    summary = "\n\n".join(sections)
    path = results / f"profile-{stamp}.txt"
    path.write_text(summary)
    print(summary)
    print(f"written: {path}")
    return 0
