"""``command-relay serve --workers N``: a supervisor and N worker processes on shared sockets,
as real processes: mail flows, signals are forwarded, a killed worker is replaced, a killed
supervisor does not leave workers behind, and start-up failures exit 1 without a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis.asyncio as aioredis

from relay.identity.accounts import AccountStore
from tests.conftest import PASSWORD, RedisServer, add_user, wait_for
from tests.embedded_redis import embedded_servers, env_for, ok, run_cli
from tests.policy_files import policies_with_limit, set_free_limit
from tests.serving import (
    LineClient,
    ServeProcess,
    Start,
    body,
    captured,
    counts,
    no_traceback,
    occupied_port,
    refused,
    relay_env,
    send_to,
)


@pytest.fixture
def short_state() -> Iterator[Path]:
    """A state folder under /tmp (the embedded Redis's Unix socket path must stay short);
    a redis-server left behind in it is killed at the end."""
    directory = Path(tempfile.mkdtemp(prefix="cw-", dir="/tmp")).resolve()
    try:
        yield directory
    finally:
        for process in embedded_servers(directory):
            with contextlib.suppress(psutil.Error):
                process.kill()
                process.wait(5)
        shutil.rmtree(directory, ignore_errors=True)


async def supervisor_port(relay: ServeProcess) -> int:
    [started] = await relay.wait_event("supervisor.started")
    return int(started["listen"]["listen"].rpartition(":")[2])


async def ready_workers(relay: ServeProcess, count: int = 2) -> dict[int, int]:
    """worker index -> pid, once ``count`` workers said they serve."""
    ready = await relay.wait_event("worker.ready", count=count)
    return {r["worker"]: r["pid"] for r in ready}


async def gone(pid: int, seconds: float = 30) -> None:
    def exited() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    await wait_for(exited, seconds)


async def test_workers_serve_mail_and_all_stop_on_sigterm(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        accounts: AccountStore, tmp_path: Path) -> None:
    """--workers 2 on port 0: both workers serve the port the supervisor bound, mail goes
    through, every worker line carries its `worker`, and SIGTERM stops all with status 0."""
    user = await add_user(accounts)
    state = tmp_path / "state"
    relay = serve(relay_env(redis_server.url, state), "--workers", "2")
    port = await supervisor_port(relay)
    pids = await ready_workers(relay)
    assert sorted(pids) == [1, 2]
    started = relay.events("relay.started")
    assert sorted(r["worker"] for r in started) == [1, 2]
    assert all(r["listen"] == [f"127.0.0.1:{port}"] for r in started)

    results = await asyncio.gather(*(send_to(port, f"r{i}@example.test") for i in range(8)))
    assert results == [[250]] * 8
    assert len(captured(state)) == 8
    assert await counts(redis_client, user) == (8, 8)
    sessions = relay.events("session.opened")
    assert len(sessions) == 8 and {r["worker"] for r in sessions} <= {1, 2}

    relay.signal(signal.SIGTERM)
    assert await relay.wait_exit() == 0
    no_traceback(relay)
    for pid in pids.values():
        assert not psutil.pid_exists(pid) or \
            psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert sorted((r["worker"], r["returncode"]) for r in relay.events("worker.exited")) == \
        [(1, 0), (2, 0)]
    assert sorted(r["worker"] for r in relay.events("relay.stopped")) == [1, 2]
    assert relay.events("supervisor.stopped")[0]["exit_code"] == 0
    assert await refused(port)


async def test_workers_drain_an_open_transaction_on_sigterm(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        accounts: AccountStore, tmp_path: Path) -> None:
    """SIGTERM to the supervisor reaches the workers: new connections are refused at once,
    the open transaction still delivers, then everything exits 0."""
    user = await add_user(accounts)
    state = tmp_path / "state"
    relay = serve(relay_env(redis_server.url, state), "--workers", "2")
    port = await supervisor_port(relay)
    await ready_workers(relay)
    client = await LineClient.connect(port)
    await client.login()
    await client.open_transaction()

    relay.signal(signal.SIGTERM)
    await wait_for(lambda: refused(port), 20)
    assert relay.process.poll() is None
    assert (await client.command("DATA"))[0] == 354
    await client.send(body("Delivered by a draining worker") + b".\r\n")
    assert (await client.reply())[0] == 250
    assert await client.until_closed() == b"421 4.3.2 Service shutting down\r\n"

    assert await relay.wait_exit() == 0
    no_traceback(relay)
    assert len(captured(state)) == 1
    assert await counts(redis_client, user) == (1, 1)


async def test_workers_restart_a_killed_worker(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        accounts: AccountStore, tmp_path: Path) -> None:
    """A worker killed with SIGKILL is logged (worker.died) and replaced by a new process;
    the relay serves all along and still stops cleanly."""
    await add_user(accounts)
    relay = serve(relay_env(redis_server.url, tmp_path / "state"), "--workers", "2")
    port = await supervisor_port(relay)
    pids = await ready_workers(relay)

    os.kill(pids[1], signal.SIGKILL)
    [died] = await relay.wait_event("worker.died", worker=1)
    assert (died["pid"], died["returncode"], died["level"]) == (pids[1], -signal.SIGKILL,
                                                                "error")
    assert died["restart_in"] > 0
    again = await relay.wait_event("worker.ready", count=2, worker=1)
    replacement = again[-1]["pid"]
    assert replacement != pids[1] and psutil.pid_exists(replacement)
    assert relay.events("worker.died", worker=2) == []

    assert await asyncio.gather(*(send_to(port, f"r{i}@example.test") for i in range(4))) \
        == [[250]] * 4
    relay.signal(signal.SIGTERM)
    assert await relay.wait_exit() == 0
    assert sorted((r["worker"], r["pid"]) for r in relay.events("worker.exited")) == \
        sorted([(1, replacement), (2, pids[2])])


async def test_workers_reload_policies_on_sighup(
        serve: Start, redis_server: RedisServer, redis_client: aioredis.Redis,
        accounts: AccountStore, tmp_path: Path) -> None:
    """RELAY_WORKERS=2: SIGHUP to the supervisor reloads the policies in every worker."""
    await add_user(accounts)
    policies = policies_with_limit(tmp_path, 1)
    relay = serve(relay_env(redis_server.url, tmp_path / "state", RELAY_WORKERS="2",
                            RELAY_POLICIES_DIR=str(policies)))
    port = await supervisor_port(relay)
    await ready_workers(relay)
    assert await send_to(port, "a@example.test", "b@example.test") == [250, 550]

    set_free_limit(policies, 10)
    relay.signal(signal.SIGHUP)
    reloaded = await relay.wait_event("policies.reloaded", count=2)
    assert sorted(r["worker"] for r in reloaded) == [1, 2]
    assert all(r["plans"]["free"] == 10 for r in reloaded)
    # Whichever worker takes them, new transactions get the new limit.
    results = await asyncio.gather(*(send_to(port, f"r{i}@example.test") for i in range(6)))
    assert results == [[250]] * 6

    relay.signal(signal.SIGTERM)
    assert await relay.wait_exit() == 0
    no_traceback(relay)


async def test_workers_share_one_embedded_redis(
        serve: Start, short_state: Path, tmp_path: Path) -> None:
    """Without RELAY_REDIS_URL the supervisor starts the embedded Redis once; both workers
    count in it; it stops with the supervisor."""
    env = env_for(short_state, RELAY_LISTEN="127.0.0.1:0", RELAY_ALLOW_PLAINTEXT_AUTH="1")
    relay = serve(env, "--workers", "2")
    port = await supervisor_port(relay)
    await ready_workers(relay)
    assert len(embedded_servers(short_state)) == 1
    assert [r.get("worker") for r in relay.events("dev.embedded_redis")] == [None]
    ok(await asyncio.to_thread(run_cli, ["users", "add", "agent@kw.test", "--password-stdin"],
                               env_for(short_state), tmp_path, stdin=PASSWORD + "\n"))
    assert await asyncio.gather(*(send_to(port, f"r{i}@example.test") for i in range(4))) \
        == [[250]] * 4
    usage = json.loads(ok(await asyncio.to_thread(
        run_cli, ["usage", "agent@kw.test", "--json"], env_for(short_state), tmp_path)))
    assert (usage["used"], usage["delivered"]) == (4, 4)

    relay.signal(signal.SIGTERM)
    assert await relay.wait_exit() == 0
    no_traceback(relay)
    assert embedded_servers(short_state) == []


async def test_workers_drain_when_the_supervisor_is_killed(
        serve: Start, redis_server: RedisServer, tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL leaves no worker behind: each sees its link close,
    drains and exits."""
    relay = serve(relay_env(redis_server.url, tmp_path / "state"), "--workers", "2")
    await supervisor_port(relay)
    pids = await ready_workers(relay)
    relay.process.kill()
    relay.process.wait()
    for pid in pids.values():
        await gone(pid)
    assert sorted(r["worker"] for r in relay.events("worker.orphaned")) == [1, 2]
    assert sorted(r["worker"] for r in relay.events("relay.stopped")) == [1, 2]


async def test_workers_a_failed_first_start_exits_1(
        serve: Start, redis_server: RedisServer, tmp_path: Path) -> None:
    """Workers that cannot start (here: the TLS certificate is not one) make the supervisor
    stop and exit 1, with the reason on stderr and no traceback."""
    bogus = tmp_path / "not-a-cert.pem"
    bogus.write_text("not a certificate\n")
    relay = serve(relay_env(redis_server.url, tmp_path / "state", RELAY_TLS_CERT=str(bogus),
                            RELAY_TLS_KEY=str(bogus)), "--workers", "2")
    assert await relay.wait_exit() == 1
    no_traceback(relay)
    assert "cannot load TLS certificate" in relay.stderr
    assert relay.events("worker.failed_to_start")
    assert relay.events("worker.died") == []
    assert relay.events("supervisor.stopped")[0]["exit_code"] == 1


def test_workers_a_taken_port_exits_1_before_any_worker_starts(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """The supervisor binds first: a taken port is one error, before any worker exists."""
    with occupied_port() as taken:
        port = taken.getsockname()[1]
        env = relay_env(redis_server.url, tmp_path / "state", RELAY_LISTEN=f"127.0.0.1:{port}")
        relay = ServeProcess(env, tmp_path, "--workers", "2")
        try:
            deadline = time.monotonic() + 40
            while relay.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert relay.process.returncode == 1, relay.describe()
        finally:
            relay.kill()
    assert f"command-relay: error: cannot listen on 127.0.0.1:{port} (listen)" in relay.stderr
    assert "Traceback" not in relay.stderr
    assert relay.events("worker.started") == []


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--workers", "two"]])
def test_workers_flag_must_be_a_positive_integer(argv: list[str], tmp_path: Path) -> None:
    """--workers takes a positive integer: anything else is a usage error (status 2)."""
    result = subprocess.run([sys.executable, "-m", "relay", "serve", *argv],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 2
    assert "expected a positive integer" in result.stderr
