"""The harness of the fault scenarios (tests/flows/test_faults.py): real processes for everything
(``command-relay serve``, redis-server, the capturing upstream of tests/upstream_proc.py),
users, and ``Scenario.finish``, which checks the relay still serves, waits for the relays to
settle, runs the ledger (tests/ledger.py), prints its line, writes it as JSON and checks the
relays' logs.

Sizes: each scenario has a small CI load; ``RELAY_TEST_SOAK=1`` runs the full sizes
(``soak(ci, full)`` picks). Reports go to ``RELAY_TEST_REPORT_DIR`` (default
``.test-output/faults`` in the repository), one JSON file per scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis.asyncio as aioredis

from relay.config.policies import load_policies
from relay.config.zones import zone
from relay.decisions.months import SystemClock, period_at
from relay.identity.accounts import AccountStore
from tests.conftest import POLICIES, REPO, RedisServer, add_user, free_port
from tests.ledger import ClientTxn, Ledger, LedgerReport, LedgerUser, load_captures, read_counts
from tests.loadclient import Account, Load, send_one
from tests.scraping import scrape
from tests.serving import ServeProcess, Start, relay_env

LOOPS = ["uvloop", "asyncio"]
SOAK = os.environ.get("RELAY_TEST_SOAK", "") not in {"", "0"}
REPORT_DIR = Path(os.environ.get("RELAY_TEST_REPORT_DIR") or REPO / ".test-output" / "faults")
_PLANS = load_policies(POLICIES).plans


def soak(ci: int, full: int) -> int:
    """The CI size, or the full size under RELAY_TEST_SOAK=1."""
    return full if SOAK else ci


def this_month() -> str:
    return period_at(SystemClock().now(), zone("UTC")).label


# -- processes ---------------------------------------------------------------------------
@dataclass
class Relay:
    """A ``command-relay serve`` process, its SMTP and metrics ports."""

    name: str
    process: ServeProcess
    port: int
    metrics_port: int
    killed: bool = False

    @property
    def fds(self) -> int:
        return int(psutil.Process(self.process.pid).num_fds())

    def smtp_sockets(self) -> int:
        """Accepted SMTP connections the process still holds (its listener excluded)."""
        return sum(1 for c in psutil.Process(self.process.pid).net_connections("tcp")
                   if c.laddr and c.laddr.port == self.port and c.status != psutil.CONN_LISTEN)

    @property
    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    async def open_connections(self) -> float:
        return (await scrape(self.metrics_port)).value("relay_connections_open",
                                                       listener="starttls")

    async def settled(self, open_: int = 0, seconds: float = 30) -> None:
        """Wait until the open-connections gauge reads ``open_``."""
        deadline = time.monotonic() + seconds
        while (now := await self.open_connections()) != open_:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: relay_connections_open stayed at {now}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        self.process.kill()
        self.killed = True

    def log_problems(self, *, errors_allowed: Iterable[str] = ()) -> list[str]:
        """session.exception lines, error-level lines (but ``errors_allowed`` events) and
        tracebacks in the log: none may come from a client's misbehaviour or a fault
        around the relay."""
        allowed = set(errors_allowed)
        found = [f"{self.name}: {r.get('event')}: {r}" for r in self.process.records()
                 if r.get("event") == "session.exception"
                 or (r.get("level") in {"error", "critical"} and r.get("event") not in allowed)]
        text = self.process.stdout + self.process.stderr
        if "Traceback" in text:
            at = text.index("Traceback")
            found.append(f"{self.name}: traceback: {text[at:at + 3000]}")
        return found


class UpstreamProcess:
    """``python -m tests.upstream_proc`` on a fixed port (so it can be restarted in place)."""

    def __init__(self, workdir: Path, *args: str, name: str = "upstream") -> None:
        self.workdir = workdir
        self.name = name
        self.args = list(args)
        self.port = free_port()
        self.capture_path = workdir / f"{name}.jsonl"
        self.stdout_path = workdir / f"{name}.out"
        self.hold_file = workdir / f"{name}.hold"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    async def start(self) -> UpstreamProcess:
        """Start (or restart, on the same port) and wait until it listens."""
        self._spawn()
        await self.wait_event("upstream.ready", self.starts)
        return self

    def _spawn(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.starts += 1
        with self.stdout_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.upstream_proc", "--port", str(self.port),
                 "--capture", str(self.capture_path), "--hold-file", str(self.hold_file),
                 *self.args],
                env=env, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        if self.stdout_path.exists():
            for line in self.stdout_path.read_text(encoding="utf-8").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(json.JSONDecodeError):
                        record = json.loads(line)
                        if record.get("event") == name:
                            found.append(record)
        return found

    async def wait_event(self, name: str, count: int = 1, seconds: float = 30,
                         ledger_prefix: str = "") -> None:
        """Until ``count`` lines named ``name`` (about messages whose ledger id starts with
        ``ledger_prefix``) were written."""
        deadline = time.monotonic() + seconds
        while len([e for e in self.events(name)
                   if str(e.get("ledger_id")).startswith(ledger_prefix)]) < count:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.stdout_path.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {count} x {name}")
            await asyncio.sleep(0.02)

    def hold(self, ledger_prefix: str = "") -> None:
        """Hold the DATA replies of messages whose ledger id starts with ``ledger_prefix``
        (all, by default) until ``release``."""
        self.hold_file.write_text(ledger_prefix)

    def release(self) -> None:
        self.hold_file.unlink(missing_ok=True)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()

    def captures(self) -> list[Any]:
        return load_captures(self.capture_path)


# -- the scenario --------------------------------------------------------------------------
@dataclass
class Scenario:
    """One fault scenario: its processes, users and client records, and the ledger at the
    end. ``crash``: a relay is killed (or the upstream stops answering after taking
    messages), so the count may be high by what was in flight."""

    name: str
    serve: Start
    redis_server: RedisServer
    redis: aioredis.Redis
    accounts: AccountStore
    workdir: Path
    relays: list[Relay] = field(default_factory=list)
    upstreams: list[UpstreamProcess] = field(default_factory=list)
    users: list[LedgerUser] = field(default_factory=list)
    records: list[ClientTxn] = field(default_factory=list)
    periods: set[str] = field(default_factory=lambda: {this_month()})
    extra: dict[str, Any] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    async def user(self, email: str, *, limit: int | None = None) -> Account:
        user = await add_user(self.accounts, email, limit=limit, senders=(email,))
        self.users.append(LedgerUser(user.id, limit or _PLANS[user.plan].monthly_limit,
                                     (email,)))
        return Account(email, email)

    async def upstream(self, *args: str, name: str = "upstream") -> UpstreamProcess:
        process = await UpstreamProcess(self.workdir, *args, name=name).start()
        self.upstreams.append(process)
        return process

    async def relay(self, upstream: UpstreamProcess | None = None, *, name: str = "relay",
                    loop: str = "uvloop", **env: str) -> Relay:
        settings = {"RELAY_EVENT_LOOP": loop, **env}
        if upstream is not None:
            settings["RELAY_UPSTREAM_URL"] = upstream.url
        process = self.serve(relay_env(self.redis_server.url, self.workdir / f"{name}-state",
                                       **settings), name=name)
        port = await process.port()
        [metrics] = await process.wait_event("metrics.listening")
        relay = Relay(name, process, port, int(str(metrics["listen"]).rpartition(":")[2]))
        self.relays.append(relay)
        return relay

    def run(self, load: Load) -> asyncio.Task[None]:
        """Start ``load`` in the background (cancelled by ``close`` if still running)."""
        task = asyncio.ensure_future(load.run())
        self.tasks.append(task)
        return task

    async def close(self) -> None:
        """Cancel loads left running (a failed test), kill the upstream processes (the serve
        fixture kills the relays)."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for upstream in self.upstreams:
            upstream.kill()

    def live_relays(self) -> list[Relay]:
        return [r for r in self.relays if not r.killed]

    async def fresh_send(self, account: Account) -> None:
        """A new client sends one message through every live relay: the relay serves."""
        for relay in self.live_relays():
            txn = await send_one(relay.port, account, ["fresh@example.test"], relay=relay.name,
                                 prefix="fresh")
            self.records.append(txn)
            assert txn.outcome == "acked", (relay.name, txn, relay.process.describe()[-3000:])

    async def counts(self) -> dict[str, Any]:
        return await read_counts(self.redis, self.users, self.periods)

    async def unsettled(self) -> int:
        return sum(max(0, c.used - c.delivered) for c in (await self.counts()).values())

    async def finish(self, account: Account, *, crash: bool = False,
                     settle_seconds: float = 3, errors_allowed: Iterable[str] = (),
                     check: bool = True) -> LedgerReport:
        """Fresh client through every live relay, settle, ledger, report, log checks."""
        await self.fresh_send(account)
        for relay in self.live_relays():
            await relay.settled(0)
        self.periods.add(this_month())
        # A commit or refund the relay retries in the background gets this long to land.
        deadline = time.monotonic() + settle_seconds
        while time.monotonic() < deadline:
            if not await self.unsettled():
                break
            await asyncio.sleep(0.1)
        captures = [c for u in self.upstreams for c in u.captures()]
        ledger = Ledger(self.users)
        report = ledger.compare(self.name, self.records, captures, await self.counts())
        report.extra.update(self.extra)
        report.extra["seconds"] = round(time.monotonic() - self.started, 1)
        write_report(report)
        if check:
            problems = report.problems(crash=crash)
            for relay in self.relays:
                problems += relay.log_problems(errors_allowed=errors_allowed)
            assert not problems, f"{report.summary()}\n" + "\n".join(problems)
        return report


def write_report(report: LedgerReport) -> None:
    """The ledger line on stdout (``-s`` shows it) and as JSON under REPORT_DIR."""
    print(f"\n{report.summary()}")
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / f"{report.name}.json").write_text(json.dumps(
        {"summary": report.summary(), **report.to_json(), "soak": SOAK}, indent=1))

