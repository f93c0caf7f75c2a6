"""Where the latency tail comes from: a per-step profile of the paced latency runs.

The latency scenario (bench/probes.py ``latency``) drives the relay at half of its peak with
Poisson arrivals. Around each paced relay run this module takes three views and sets them
side by side, so that a p99 can be split into its parts:

* **the client's view** (bench/loadgen.py ``Outcome.step_latencies``): each command's time,
  MAIL, RCPT, DATA (to the 354) and the body (to the final reply), relay minus bare sink at
  each percentile, like the scenario's headline figure;
* **the relay's own view of a transaction**: ``duration_ms`` of every ``delivery.finished``
  line the run logged (MAIL FROM to the outcome, measured inside the relay), exact, not
  bucketed; what the client sees beyond it was spent before the relay read a command or
  after it wrote a reply (its event loop, the kernel, the generator's own loop);
* **the relay's metrics** (the supervisor's ``/metrics``, every worker), the difference
  between a scrape before and one after the run: each Redis step
  (``relay_redis_duration_seconds``) and upstream step (``relay_upstream_duration_seconds``),
  the event loop's lag (``relay_event_loop_lag_seconds``: how long anything ready waited for
  the loop) and the GC's pauses (``relay_gc_pause_seconds``), per worker, and how the
  workers shared the connections and the messages. Percentiles of a histogram are
  interpolated inside its buckets (a bucket's width is its error); ``>5 ms`` is the exact
  share of observations above the 5 ms bucket boundary;
* **the kernel's view** (``/proc/PID/task/*/schedstat``, every thread): for the relay's
  workers, the generator, Redis and the sink, the CPU each used and the time each spent
  runnable but waiting for a core (the run queue), per message. On a machine where the
  generator, Redis and the sink share the relay's cores, a reply ready in a worker waits
  there for the scheduler, and no change inside the relay shortens that.
"""

from __future__ import annotations

import json
import math
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench import report
from bench.procs import HOST

STEPS = ("mail", "rcpt", "data", "dot")
_LABELS = {"mail": "MAIL FROM", "rcpt": "RCPT TO", "data": "DATA (to the 354)",
           "dot": "the body (to the final reply)"}
_HISTOGRAMS = ("relay_redis_duration_seconds", "relay_upstream_duration_seconds",
               "relay_event_loop_lag_seconds", "relay_gc_pause_seconds",
               "relay_transaction_duration_seconds")
_COUNTERS = ("relay_connections_total", "relay_messages_total")
_SLOW = 0.005  # the target: a step's share above 5 ms


def metrics_port(log: Path) -> int | None:
    """The port of the supervisor's aggregate ``/metrics`` (or of the one process's, with
    one worker), from the relay's ``metrics.listening`` log lines."""
    found = None
    with log.open("rb") as lines:
        for line in lines:
            if b'"metrics.listening"' not in line:
                continue
            entry = json.loads(line)
            port = int(str(entry["listen"]).rpartition(":")[2])
            if entry.get("aggregates") == "workers":
                return port
            found = found or port
    return found


@dataclass(slots=True)
class _Series:
    count: float = 0.0
    total: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count


# (family, labels without le) -> series; counters as (family, labels) -> value.
Snapshot = tuple[dict[tuple[str, tuple[tuple[str, str], ...]], _Series],
                 dict[tuple[str, tuple[tuple[str, str], ...]], float]]


def snapshot(port: int) -> Snapshot:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    series: dict[tuple[str, tuple[tuple[str, str], ...]], _Series] = defaultdict(_Series)
    counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in _HISTOGRAMS:
            for s in family.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                one = series[(family.name, labels)]
                if s.name.endswith("_bucket"):
                    one.buckets[float(s.labels["le"])] = s.value
                elif s.name.endswith("_count"):
                    one.count = s.value
                elif s.name.endswith("_sum"):
                    one.total = s.value
        elif family.name + "_total" in _COUNTERS or family.name in _COUNTERS:
            for s in family.samples:
                if s.name.endswith("_total"):
                    counters[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return dict(series), counters


def _minus(after: _Series, before: _Series | None) -> _Series:
    if before is None:
        return after
    return _Series(after.count - before.count, after.total - before.total,
                   {le: n - before.buckets.get(le, 0.0) for le, n in after.buckets.items()})


def _merge(parts: list[_Series]) -> _Series:
    out = _Series()
    for part in parts:
        out.count += part.count
        out.total += part.total
        for le, n in part.buckets.items():
            out.buckets[le] = out.buckets.get(le, 0.0) + n
    return out


def quantile(series: _Series, q: float) -> float:
    """The q-quantile interpolated linearly inside its bucket (as Prometheus'
    ``histogram_quantile``); the last finite boundary when it falls in +Inf."""
    if series.count <= 0:
        return math.nan
    rank = q * series.count
    low, below = 0.0, 0.0
    for le in sorted(series.buckets):
        n = series.buckets[le]
        if n >= rank:
            if math.isinf(le):
                return low
            width = n - below
            return low + (le - low) * ((rank - below) / width if width else 1.0)
        low, below = le, n
    return low


def _above(series: _Series, bound: float) -> float:
    """The share of observations above ``bound`` (a bucket boundary)."""
    if series.count <= 0:
        return 0.0
    return 1.0 - series.buckets.get(bound, series.count) / series.count


def schedstat(pids: Iterable[int]) -> tuple[int, int, int]:
    """Nanoseconds on a CPU, nanoseconds runnable but waiting for one, and time slices, summed
    over every thread of ``pids`` (processes gone are left out)."""
    cpu = wait = slices = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            try:
                fields = task.read_text().split()
            except OSError:
                continue
            cpu, wait, slices = cpu + int(fields[0]), wait + int(fields[1]), \
                slices + int(fields[2])
    return cpu, wait, slices


@dataclass(slots=True)
class RunProfile:
    """What one paced relay run left in the metrics, the log and the kernel's counters."""

    messages: int
    series: dict[tuple[str, tuple[tuple[str, str], ...]], _Series]
    counters: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    server_txn_ms: list[float]
    # process group -> (CPU ns, run-queue wait ns, slices) over the run
    scheduled: dict[str, tuple[int, int, int]] = field(default_factory=dict)


class Watch:
    """Around one run: ``begin()`` before it, ``end(delivered)`` after. ``processes``: a
    name for each group of processes whose scheduling is read (the relay's workers, the
    generator, Redis, the sink), and a callable giving its pids now."""

    def __init__(self, port: int, log: Path,
                 processes: Mapping[str, Callable[[], list[int]]] | None = None) -> None:
        self.port = port
        self.log = log
        self.processes = dict(processes or {})
        self._before: Snapshot | None = None
        self._sched: dict[str, tuple[int, int, int]] = {}
        self._offset = 0

    def begin(self) -> None:
        self._offset = self.log.stat().st_size
        self._before = snapshot(self.port)
        self._sched = {name: schedstat(pids()) for name, pids in self.processes.items()}

    def end(self, delivered: int) -> RunProfile:
        assert self._before is not None
        series, counters = snapshot(self.port)
        before_series, before_counters = self._before
        diff = {k: _minus(v, before_series.get(k)) for k, v in series.items()}
        counted = {k: v - before_counters.get(k, 0.0) for k, v in counters.items()}
        durations = []
        with self.log.open("rb") as lines:
            lines.seek(self._offset)
            for line in lines:
                if b'"delivery.finished"' in line and b'"delivered"' in line:
                    entry = json.loads(line)
                    durations.append(float(entry["duration_ms"]))
        scheduled = {}
        for name, pids in self.processes.items():
            after = schedstat(pids())
            before = self._sched.get(name, (0, 0, 0))
            scheduled[name] = (after[0] - before[0], after[1] - before[1],
                               after[2] - before[2])
        return RunProfile(delivered, diff, counted, durations, scheduled)


def _family(runs: list[RunProfile], name: str, **want: str) -> dict[str, _Series]:
    """The runs' series of ``name`` merged over the runs and the workers, keyed by the value
    of the one label that ``want`` leaves free ("" when none)."""
    grouped: dict[str, list[_Series]] = defaultdict(list)
    for run in runs:
        for (family, labels), one in run.series.items():
            if family != name:
                continue
            found = dict(labels)
            if any(found.get(k) != v for k, v in want.items()):
                continue
            free = [v for k, v in labels if k not in want and k != "worker"]
            grouped[free[0] if free else ""].append(one)
    return {key: _merge(parts) for key, parts in grouped.items()}


def _row(label: str, series: _Series, messages: int) -> dict[str, Any]:
    return {"step": label, "per_msg": series.count / max(1, messages),
            "mean_ms": 1000 * series.total / series.count if series.count else math.nan,
            "p50_ms": 1000 * quantile(series, 0.50), "p99_ms": 1000 * quantile(series, 0.99),
            "slow_pct": 100 * _above(series, _SLOW)}


def summarise(runs: list[RunProfile], relay_steps: list[dict[str, list[float]]],
              base_steps: list[dict[str, list[float]]]) -> dict[str, Any]:
    """The breakdown over a shape's paced relay runs (and its bare-sink runs, for the client
    side)."""
    messages = sum(r.messages for r in runs)
    client = []
    for step in STEPS:
        relay = [x for s in relay_steps for x in s.get(step, [])]
        base = [x for s in base_steps for x in s.get(step, [])]
        if not relay:
            continue
        r = {q: 1000 * report.percentile(relay, q) for q in (0.5, 0.99)}
        b = {q: 1000 * report.percentile(base, q) for q in (0.5, 0.99)} if base else \
            {0.5: 0.0, 0.99: 0.0}
        client.append({"step": _LABELS[step], "relay_p50_ms": r[0.5], "relay_p99_ms": r[0.99],
                       "added_p50_ms": r[0.5] - b[0.5], "added_p99_ms": r[0.99] - b[0.99]})
    server_txn = [x for r in runs for x in r.server_txn_ms]
    steps = []
    for step, one in sorted(_family(runs, "relay_redis_duration_seconds").items()):
        if one.count:
            steps.append(_row(f"Redis: {step}", one, messages))
    for step, one in sorted(_family(runs, "relay_upstream_duration_seconds",
                                    pool="default").items()):
        if one.count:
            steps.append(_row(f"upstream: {step}", one, messages))
    lag = _merge(list(_family(runs, "relay_event_loop_lag_seconds").values()))
    steps.append(_row("event loop lag (a 50 ms timer)", lag, messages))
    for generation, one in sorted(_family(runs, "relay_gc_pause_seconds").items()):
        if one.count:
            steps.append(_row(f"GC pause, generation {generation}", one, messages))
    workers: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for run in runs:
        for (name, labels), value in run.counters.items():
            found = dict(labels)
            worker = found.get("worker", "1")
            if name == "relay_connections_total":
                workers[worker]["connections"] += value
            elif name == "relay_messages_total" and found.get("outcome") == "delivered":
                workers[worker]["messages"] += value
        for (family, labels) in run.series:
            if family == "relay_event_loop_lag_seconds":
                _ = workers[dict(labels).get("worker", "1")]  # a worker with no message too
    lag_by_worker = {}
    for worker in workers:
        merged = _merge([one for run in runs for (family, labels), one in run.series.items()
                         if family == "relay_event_loop_lag_seconds"
                         and dict(labels).get("worker", "1") == worker])
        lag_by_worker[worker] = 1000 * quantile(merged, 0.99)
    sched: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for run in runs:
        for name, figures in run.scheduled.items():
            for i, value in enumerate(figures):
                sched[name][i] += value
    scheduling = {name: {"cpu_ms_per_msg": cpu / 1e6 / max(1, messages),
                         "wait_ms_per_msg": wait / 1e6 / max(1, messages),
                         "wait_us_per_slice": wait / 1e3 / slices if slices else 0.0,
                         "slices_per_msg": slices / max(1, messages)}
                  for name, (cpu, wait, slices) in sched.items()}
    total_msgs = sum(w["messages"] for w in workers.values()) or 1
    share = {w: {"messages_pct": 100 * v["messages"] / total_msgs,
                 "connections": v["connections"], "lag_p99_ms": lag_by_worker.get(w, math.nan)}
             for w, v in sorted(workers.items())}
    return {
        "messages": messages,
        "client": client,
        "server_txn_ms": {f"p{int(q * 100)}": report.percentile(server_txn, q)
                          for q in (0.5, 0.99)} if server_txn else {},
        "steps": steps,
        "workers": share,
        "scheduling": scheduling,
    }


def render(profile: dict[str, Any], markdown: bool) -> str:
    """The three tables of one shape's profile, for the report (bench/report.py)."""
    table = report.md_table if markdown else report.text_table
    parts = []
    srv = profile.get("server_txn_ms") or {}
    if srv:
        parts.append(f"The relay's own transaction time (delivery.finished duration_ms, "
                     f"{profile['messages']:,} messages): p50 {srv['p50']:.2f} ms, "
                     f"p99 {srv['p99']:.2f} ms")
    parts.append(table(("client step", "relay p50 / p99 ms", "added p50 / p99 ms"),
                       [(c["step"], f"{c['relay_p50_ms']:.2f} / {c['relay_p99_ms']:.2f}",
                         f"{c['added_p50_ms']:.2f} / {c['added_p99_ms']:.2f}")
                        for c in profile["client"]]))
    parts.append(table(("relay step", "per msg", "mean ms", "p50 / p99 ms", ">5 ms"),
                       [(s["step"], f"{s['per_msg']:.2f}", f"{s['mean_ms']:.3f}",
                         f"{s['p50_ms']:.2f} / {s['p99_ms']:.2f}", f"{s['slow_pct']:.2f}%")
                        for s in profile["steps"]]))
    parts.append(table(("worker", "messages", "connections", "loop lag p99 ms"),
                       [(w, f"{v['messages_pct']:.0f}%", f"{v['connections']:.0f}",
                         f"{v['lag_p99_ms']:.2f}") for w, v in profile["workers"].items()]))
    if profile.get("scheduling"):
        parts.append(table(
            ("process (schedstat)", "CPU ms/msg", "run-queue wait ms/msg", "wait per slice us",
             "slices/msg"),
            [(name, f"{v['cpu_ms_per_msg']:.3f}", f"{v['wait_ms_per_msg']:.3f}",
              f"{v['wait_us_per_slice']:.0f}", f"{v['slices_per_msg']:.2f}")
             for name, v in profile["scheduling"].items()]))
    return "\n\n".join(parts)
