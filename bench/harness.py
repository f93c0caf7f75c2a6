"""The scenarios a run measures and the harness that starts the services and drives one
scenario: shared by ``bench.run`` (every scenario) and ``bench.profile`` (one, profiled).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import redis as redis_client

from bench import loadgen
from bench.loadgen import Load, Outcome
from bench.postfix import Submission, ThrowawayPostfix, ensure_installed
from bench.procs import (
    HOST,
    REPO,
    BenchError,
    Meter,
    Sink,
    clean_env,
    relay_command,
    run_cli,
    start_redis,
    start_relay,
)
from bench.tls import write_certificate

KB = 1024
MB = 1024 * 1024
APP = "command"  # the CRM's app credential: decided at RCPT, counted against MAIL FROM's user
APP_PASSWORD = "bench-app-password-0123456789"
USERS = 10
LIMIT = 1_000_000_000
DEFAULT_MAX_MESSAGE_SIZE = 26_214_400  # the relay's own default (docs/configuration.md)


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    label: str
    # "sink", "relay", "postfix" (no AUTH) or "submission" (Postfix with STARTTLS and AUTH)
    target: str
    size: int
    concurrency: int
    per_connection: int
    tls: bool
    auth: bool
    messages: int
    resume: bool = False  # with tls: every session resumes its previous TLS session


def plan(args: argparse.Namespace) -> list[Scenario]:
    """The scenario matrix. The baseline and the plain Postfix rows send no AUTH (neither asks
    for it); the submission rows are Postfix in the relay's own shapes."""
    counts = {2 * KB: args.messages_2k, 100 * KB: args.messages_100k}
    out: list[Scenario] = []
    for size, count in counts.items():
        kb = f"{size // KB}k"
        for pc in (1, args.per_connection):
            out.append(Scenario(f"baseline-{kb}-c20-pc{pc}",
                                "baseline: generator -> sink (no AUTH)",
                                "sink", size, 20, pc, False, False, count))
    for size, count in counts.items():
        kb = f"{size // KB}k"
        for conc in args.concurrency:
            # One session is slow: a fifth of the messages keeps its runs short.
            n = max(20, count // 5) if conc == 1 else count
            for pc, tls in ((1, False), (1, True), (args.per_connection, False),
                            (args.per_connection, True)):
                mode = "STARTTLS" if tls else "plaintext"
                out.append(Scenario(f"relay-{kb}-c{conc}-pc{pc}-{'tls' if tls else 'plain'}",
                                    f"relay -> sink, {mode} + AUTH",
                                    "relay", size, conc, pc, tls, True, n))
        # Returning clients: a new connection per message, each resuming its TLS session.
        out.append(Scenario(f"relay-{kb}-c20-pc1-tls-resume",
                            "relay -> sink, STARTTLS resumed + AUTH",
                            "relay", size, 20, 1, True, True, count, resume=True))
    if not args.no_postfix:
        for size, count in counts.items():
            kb = f"{size // KB}k"
            out.append(Scenario(f"postfix-{kb}-c20-pc{args.per_connection}",
                                "Postfix -> sink, end to end (no AUTH)",
                                "postfix", size, 20, args.per_connection, False, False, count))
            # The fair anchors: Postfix as a submission relay, in every shape of the relay's
            # rows (AUTH through Cyrus SASL, STARTTLS with the relay's key type).
            for pc in (1, args.per_connection):
                for tls in (False, True):
                    mode = "STARTTLS" if tls else "plaintext"
                    out.append(Scenario(
                        f"postfix-{kb}-c20-pc{pc}-{'tls' if tls else 'plain'}-auth",
                        f"Postfix submission -> sink, {mode} + AUTH (Cyrus SASL)",
                        "submission", size, 20, pc, tls, True, count))
            out.append(Scenario(f"postfix-{kb}-c20-pc1-tls-auth-resume",
                                "Postfix submission -> sink, STARTTLS resumed + AUTH",
                                "submission", size, 20, 1, True, True, count, resume=True))
    return out


class Bench:
    """The running parts; leaving the ``with`` block stops all of them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.notes: list[str] = []
        self.stack = contextlib.ExitStack()
        self.workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
        self.postfix: ThrowawayPostfix | None = None
        self.relay_delivered = 0  # messages the relay delivered, warm-up included
        self.self_meter = Meter(os.getpid(), children=False)  # the generator
        # Relays with a shadow trial on: scenario target -> (port, meter).
        self.trials: dict[str, tuple[int, Meter]] = {}

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stack.close()
        finally:
            if self.args.keep:
                print(f"work folder kept: {self.workdir}", file=sys.stderr)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def say(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    # -- start-up -------------------------------------------------------------------------

    def start(self, *, with_postfix: bool, relay_prefix: tuple[str, ...] = (),
              shadow: Mapping[str, Path | None] | None = None,
              extra: Mapping[str, Mapping[str, str]] | None = None) -> None:
        """``shadow``: scenario target -> candidate folder (None: no trial); one more relay
        each, identical but for ``RELAY_SHADOW_POLICIES_DIR`` (bench/shadow.py). ``extra``:
        scenario target -> settings; one more relay each, identical but for those
        (bench/features.py)."""
        args = self.args
        if not args.python_sink:
            try:
                note = ensure_installed(self.workdir / "apt.log")
                if note:
                    self.notes.append(note)
            except BenchError as exc:
                self.notes.append(f"smtp-sink unavailable ({exc}); the Python asyncio sink "
                                  "bench.sink stands in, a slower upstream")
        self.sink = Sink(self.workdir, python_fallback=args.python_sink)
        self.stack.callback(self.sink.stop)
        if self.sink.kind != "smtp-sink" and args.python_sink:
            self.notes.append("--python-sink: the Python asyncio sink bench.sink is the "
                              "upstream, not smtp-sink")
        self.say(f"sink: {self.sink.kind} on {HOST}:{self.sink.port}")

        redis, redis_port = start_redis(self.workdir)
        self.stack.callback(redis.stop)
        self.redis_meter = Meter(redis.pid)
        self.redis = redis_client.Redis(host=HOST, port=redis_port, socket_timeout=10)
        self.stack.callback(self.redis.close)
        self.say(f"redis-server on {HOST}:{redis_port} (persistence off)")

        cert, key = write_certificate(self.workdir, args.tls_key)
        needed = args.memory_size * MB + MB
        relay_env = {
            "RELAY_LISTEN": f"{HOST}:0",
            "RELAY_REDIS_URL": f"redis://{HOST}:{redis_port}/0",
            "RELAY_UPSTREAM_URL": f"smtp://{HOST}:{self.sink.port}",
            "RELAY_ALLOW_PLAINTEXT_AUTH": "1",
            "RELAY_TLS_CERT": str(cert),
            "RELAY_TLS_KEY": str(key),
            "RELAY_STATE_DIR": str(self.workdir / "relay-state"),
            "RELAY_POLICIES_DIR": str(REPO / "policies"),
            "RELAY_HOSTNAME": "relay.bench.invalid",
            "RELAY_LOG_FORMAT": "json",
            "RELAY_LOG_LEVEL": "info",
            # --workers (default: serve's own default, one per core); --profile runs one
            # process, so that it profiles the relay, not the worker supervisor.
            "RELAY_WORKERS": str(1 if args.profile else args.workers or psutil.cpu_count()),
            # Metrics on, as in production, on a port of its own (9465 may be taken).
            "RELAY_METRICS_LISTEN": f"{HOST}:0",
            # The public listener (one-click unsubscribe, webhooks) too: its default,
            # 127.0.0.1:8026, would collide between the bench's own relays (shadow trial,
            # users scale) and with any other relay on the machine.
            "RELAY_PUBLIC_LISTEN": f"{HOST}:0",
        }
        if needed > DEFAULT_MAX_MESSAGE_SIZE:
            relay_env["RELAY_MAX_MESSAGE_SIZE"] = str(needed)
        if args.pool_size:
            relay_env["RELAY_UPSTREAM_POOL_SIZE"] = str(args.pool_size)
        self.relay_env = relay_env
        env = clean_env(**relay_env)
        self._add_accounts(env)

        self.relay_log = self.workdir / "relay.log"
        self.relay, self.relay_port = start_relay(env, self.relay_log,
                                                  self.workdir / "relay.err", relay_prefix)
        self.stack.callback(self._stop_relay)
        self.relay_meter = Meter(self.relay.pid)
        self.rss_at_start = self.relay_meter.usage().rss
        self.say(f"relay (command-relay serve, pid {self.relay.pid}) on "
                 f"{HOST}:{self.relay_port}, JSON log {self.relay_log}")
        twins: dict[str, Mapping[str, str]] = {
            target: {"RELAY_SHADOW_POLICIES_DIR": str(folder)} if folder else {}
            for target, folder in (shadow or {}).items()}
        twins.update(extra or {})
        for target, changes in twins.items():
            trial_env = clean_env(**{**relay_env, **changes,
                                     "RELAY_STATE_DIR": str(self.workdir / f"{target}-state")})
            service, port = start_relay(trial_env, self.workdir / f"relay-{target}.log",
                                        self.workdir / f"relay-{target}.err")
            self.stack.callback(service.stop, signal.SIGTERM, 30)
            self.trials[target] = (port, Meter(service.pid))
            differs = ", ".join(f"{k}={v}" for k, v in changes.items()) or "as the main relay"
            self.say(f"relay for {target} ({differs}; pid {service.pid}) on {HOST}:{port}")

        if with_postfix:
            try:
                postfix = ThrowawayPostfix(self.workdir / "postfix", self.sink.port,
                                           Submission(cert, key, APP, APP_PASSWORD))
                self.stack.callback(postfix.stop)
                postfix.start()
                self.postfix = postfix
                pid = postfix.master_pid()
                self.postfix_meter = Meter(pid) if pid else None
                self.say(f"postfix (throwaway instance) on {HOST}:{postfix.port}, submission "
                         f"(STARTTLS + AUTH) on {HOST}:{postfix.submission_port}")
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                self.notes.append(f"Postfix did not run: {exc}")
                self.say(f"Postfix skipped: {exc}")

    def _add_accounts(self, env: dict[str, str]) -> None:
        """Users with huge limits and the app credential, through the CLI as an operator
        would, a few at a time."""
        self.senders = tuple(f"agent{i:02d}@bench.example" for i in range(USERS))
        jobs = [(["users", "add", email, "--password-stdin", "--limit", str(LIMIT)],
                 f"user-password-{i}\n") for i, email in enumerate(self.senders)]
        jobs.append((["apps", "add", APP, "--password-stdin"], APP_PASSWORD + "\n"))
        running: list[tuple[list[str], subprocess.Popen[bytes]]] = []
        try:
            for argv, stdin in jobs:
                proc = subprocess.Popen([*relay_command(), *argv], env=env, cwd=REPO,
                                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
                assert proc.stdin is not None
                proc.stdin.write(stdin.encode())
                proc.stdin.close()
                running.append((argv, proc))
                if len(running) >= 4:
                    self._finish_cli(*running.pop(0))
            while running:
                self._finish_cli(*running.pop(0))
        finally:
            for _, proc in running:
                proc.kill()
                proc.wait()
        # A check that the accounts are there, through the CLI too.
        if APP not in run_cli(["apps", "list"], env):
            raise BenchError("the app credential was not created")
        self.say(f"{USERS} users (limit {LIMIT:,}) and app {APP!r} created with the CLI")

    @staticmethod
    def _finish_cli(argv: list[str], proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        err = proc.stderr.read()
        proc.stderr.close()
        if proc.wait(120) != 0:
            raise BenchError(f"command-relay {' '.join(argv)} failed: "
                             f"{err.decode(errors='replace').strip()}")

    def scheduled(self) -> dict[str, Callable[[], list[int]]]:
        """The processes whose scheduling the latency profile reads, by name: the relay's
        workers (its supervisor too, nearly idle), the generator (this process), Redis, the
        sink."""
        def relay() -> list[int]:
            return [p.pid for p in self.relay_meter.processes()]
        return {"relay (every worker)": relay, "generator": lambda: [os.getpid()],
                "redis-server": lambda: [self.redis_meter.pid],
                "sink": lambda: [self.sink.service.proc.pid]}

    def own_pids(self) -> frozenset[int]:
        """The benchmark's children and their descendants (Postfix daemonises itself)."""
        pids = {c.pid for c in psutil.Process().children(recursive=True)}
        if self.postfix and (master := self.postfix.master_pid()):
            with contextlib.suppress(psutil.Error):
                pids |= {master, *(c.pid for c in psutil.Process(master).children())}
        return frozenset(pids)

    def restart_relay(self, prefix: tuple[str, ...]) -> None:
        """Stop the relay and start it again behind ``prefix`` (e.g. cProfile)."""
        self._stop_relay()
        self.relay_log = self.workdir / f"relay-{time.monotonic_ns()}.log"
        self.relay, self.relay_port = start_relay(clean_env(**self.relay_env), self.relay_log,
                                                  self.workdir / "relay.err", prefix)
        self.relay_meter = Meter(self.relay.pid)

    def _stop_relay(self) -> None:
        status = self.relay.stop(signal.SIGTERM, grace=30)
        if status not in (0, None):
            self.notes.append(f"the relay exited with status {status} when stopped")

    # -- one run --------------------------------------------------------------------------

    def load_for(self, sc: Scenario, **changes: Any) -> Load:
        port = {"sink": self.sink.port, "relay": self.relay_port,
                "postfix": self.postfix.port if self.postfix else 0,
                "submission": (self.postfix.submission_port or 0) if self.postfix else 0,
                **{t: port for t, (port, _) in self.trials.items()}}[sc.target]
        load = Load(HOST, port, sc.messages, sc.concurrency, sc.per_connection, sc.size,
                    auth=(APP, APP_PASSWORD) if sc.auth else None, starttls=sc.tls,
                    resume=sc.resume,
                    time_cap=self.args.time_cap, senders=self.senders)
        return replace(load, **changes)

    def measure(self, sc: Scenario, load: Load | None = None) -> tuple[dict[str, Any], Outcome]:
        """Run one load and collect what it cost. The end-to-end time runs from the first
        connection until the sink has counted every accepted message."""
        load = load or self.load_for(sc)
        postfix_meter = getattr(self, "postfix_meter", None)
        meter = {"relay": self.relay_meter, "postfix": postfix_meter,
                 "submission": postfix_meter, "sink": None,
                 **{t: m for t, (_, m) in self.trials.items()}}[sc.target]
        before_target = meter.usage() if meter else None
        before_redis = self.redis_meter.usage()
        before_self = self.self_meter.usage()
        before_machine = psutil.cpu_times()
        before_commands = self.redis_commands()
        if meter:
            meter.reset_peak()
        sink_before = self.sink.count
        out = loadgen.run(load)
        wait = 180.0 if sc.target in ("postfix", "submission") else 30.0
        arrived_at = self.sink.wait_for(sink_before + out.accepted, wait)
        after_machine = psutil.cpu_times()
        commands = self.redis_commands()
        commands.subtract(before_commands)
        delivered = self.sink.count - sink_before
        e2e = (arrived_at - out.started) if arrived_at is not None else None
        if arrived_at is None:
            self.notes.append(f"{sc.key}: the sink got {delivered} of {out.accepted} accepted "
                              f"messages within {wait:.0f}s")
        busy_before = sum(before_machine) - before_machine.idle - before_machine.iowait
        busy_after = sum(after_machine) - after_machine.idle - after_machine.iowait
        total = sum(after_machine) - sum(before_machine)
        if sc.target == "relay":
            self.relay_delivered += delivered
        run: dict[str, Any] = {
            "accepted": out.accepted,
            "failed": out.failed,
            "errors": dict(out.errors),
            "connections": out.connections,
            "tls_offered": out.offered,
            "tls_resumed": out.resumed,
            "delivered": delivered,
            "submit_s": out.elapsed,
            "e2e_s": e2e if e2e is not None else out.elapsed,
            "complete": arrived_at is not None,
            "rate": (delivered / e2e) if e2e else 0.0,
            "submit_rate": out.rate,
            "redis_cpu_s": self.redis_meter.usage().cpu - before_redis.cpu,
            "redis_commands": commands.total(),
            "redis_commands_by_name": {k: v for k, v in commands.most_common() if v},
            "generator_cpu_s": self.self_meter.usage().cpu - before_self.cpu,
            "machine_busy_pct": 100 * (busy_after - busy_before) / total if total else 0.0,
            "relay_cpu_s": None,
            "relay_peak_rss": None,
            "_latencies": out.txn_latencies,
            "_setups": out.setup_latencies,
        }
        if meter and before_target:
            after = meter.usage()
            run["relay_cpu_s"] = after.cpu - before_target.cpu
            run["relay_peak_rss"] = meter.peak_rss() or after.rss
            run["relay_rss_before"] = before_target.rss
        return run, out

    def redis_commands(self) -> Counter[str]:
        """Commands Redis has executed so far by name (INFO commandstats), INFO left out."""
        stats = self.redis.info("commandstats")
        return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()
                        if k != "cmdstat_info"})

    def warm_up(self) -> None:
        """A few hundred messages through each target first: the relay's first AUTH pays
        the slow hash, its upstream pool connects, Postfix starts its daemons."""
        self.say("warming up")
        relay = Scenario("warm", "warm", "relay", 2 * KB, 20, 20, False, True, 400)
        self.measure(relay)
        self.measure(replace(relay, tls=True, per_connection=1, messages=100))
        self.measure(replace(relay, size=100 * KB, messages=100))
        self.measure(replace(relay, target="sink", auth=False))
        for target in self.trials:
            self.measure(replace(relay, target=target))
        if self.postfix:
            self.measure(replace(relay, target="postfix", auth=False, messages=200))
            self.measure(replace(relay, target="submission", tls=True, messages=200))
        self.rss_after_warm_up = self.relay_meter.usage().rss

