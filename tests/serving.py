"""The relay's commands as real processes: ``command-relay serve`` with its JSON log, the
``notifier``, the environment they run in and the counts they leave in Redis; and a
line-level SMTP client that can stop anywhere in a transaction (between RCPT and DATA, in the
middle of the message) while a signal arrives."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import redis.asyncio as aioredis

from relay.config.zones import zone
from relay.decisions.months import SystemClock, period_at
from relay.decisions.quota import QuotaStore
from relay.identity.accounts import User
from tests.conftest import PASSWORD, POLICIES, free_port, wait_for
from tests.scraping import get
from tests.webhooks import WEBHOOK_SECRET


def clean_env(*, metrics_ports: bool = True, public_port: bool = True,
              **relay: str) -> dict[str, str]:
    """os.environ without any RELAY_* variable, plus the given RELAY_* settings.

    ``metrics_ports``: both metrics listeners on ephemeral ports (tests run in parallel, the
    default 9465/9466 would collide); off for a test of those settings' own defaults.
    ``public_port``: the public HTTP listener on an ephemeral port too (its default 8026)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    if metrics_ports:
        env.update(RELAY_METRICS_LISTEN="127.0.0.1:0",
                   RELAY_NOTIFIER_METRICS_LISTEN="127.0.0.1:0")
    if public_port:
        env.update(RELAY_PUBLIC_LISTEN="127.0.0.1:0")
    env.update(relay)
    return env


def relay_env(redis_url: str | None, state: Path, **more: str) -> dict[str, str]:
    """A loopback relay on an ephemeral port, JSON logs, plaintext AUTH, capture folder."""
    settings = {"RELAY_STATE_DIR": str(state), "RELAY_POLICIES_DIR": str(POLICIES),
                "RELAY_LISTEN": "127.0.0.1:0", "RELAY_ALLOW_PLAINTEXT_AUTH": "1",
                "RELAY_LOG_FORMAT": "json", "RELAY_HOSTNAME": "relay.test",
                "RELAY_WORKERS": "1", **more}
    if redis_url is not None:
        settings["RELAY_REDIS_URL"] = redis_url
    return clean_env(**settings)


class ServeProcess:
    """``python -m relay serve ARGS`` with its stdout (JSON lines) and stderr in files."""

    def __init__(self, env: dict[str, str], workdir: Path, *args: str,
                 name: str = "serve") -> None:
        self.workdir = workdir
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", *args], env=env, cwd=workdir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8")

    def records(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (a line still being written is skipped)."""
        found = []
        for line in self.stdout.splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return found

    def events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == name
                and all(r.get(k) == v for k, v in fields.items())]

    def describe(self) -> str:
        return f"exit={self.process.poll()}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"

    async def wait_event(self, name: str, count: int = 1, seconds: float = 30,
                         **fields: Any) -> list[dict[str, Any]]:
        """The log lines named ``name`` (with ``fields``), once there are ``count``."""
        deadline = time.monotonic() + seconds
        while True:
            found = self.events(name, **fields)
            if len(found) >= count:
                return found
            if self.process.poll() is not None:
                found = self.events(name, **fields)
                if len(found) >= count:
                    return found
                raise AssertionError(f"serve exited before logging {name}: {self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} x {name} {fields}: {self.describe()}")
            await asyncio.sleep(0.05)

    async def port(self) -> int:
        """The SMTP port, from the start-up log (the relay listens on port 0)."""
        started = await self.wait_event("relay.started")
        return int(started[0]["listen"][0].rpartition(":")[2])

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    async def wait_exit(self, seconds: float = 40) -> int:
        deadline = time.monotonic() + seconds
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"serve still running after {seconds} s: "
                                     f"{self.describe()}")
            await asyncio.sleep(0.05)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the process and whatever it started (workers, an embedded Redis)."""
        if self.process.poll() is None:
            try:
                children = psutil.Process(self.pid).children(recursive=True)
            except psutil.Error:
                children = []
            self.process.kill()
            self.process.wait()
            for child in children:
                with contextlib.suppress(psutil.Error):
                    child.kill()
                    child.wait(10)


def no_traceback(relay: ServeProcess) -> None:
    assert "Traceback" not in relay.stderr + relay.stdout, relay.describe()


def _periods() -> set[str]:
    """This month's label in UTC, now and a few minutes on (a run across midnight of the
    1st still finds the label the relay used)."""
    now = SystemClock().now()
    return {period_at(now + timedelta(minutes=m), zone("UTC")).label for m in (0, 5)}


async def counts(redis: aioredis.Redis, user: User) -> tuple[int, int]:
    """(used, delivered) this month, as a relay process on the system clock counts them."""
    quota = QuotaStore(redis)
    used = delivered = 0
    for label in _periods():
        usage = await quota.usage(user.id, label)
        used, delivered = used + usage.used, delivered + usage.delivered
    return used, delivered


@contextmanager
def notifier_process(redis_url: str, webhook_url: str, workdir: Path) -> Iterator[int]:
    """``command-relay notifier`` with its metrics listener on a free port (yielded); stopped
    with SIGTERM at the end, which must exit 0."""
    port = free_port()
    env = clean_env(metrics_ports=False, RELAY_REDIS_URL=redis_url,
                    RELAY_POLICIES_DIR=str(POLICIES), RELAY_STATE_DIR=str(workdir / "state"),
                    RELAY_LOG_FORMAT="json", RELAY_NOTIFY_WEBHOOK_URL=webhook_url,
                    RELAY_NOTIFY_WEBHOOK_SECRET=WEBHOOK_SECRET,
                    RELAY_NOTIFIER_METRICS_LISTEN=f"127.0.0.1:{port}")
    out = (workdir / "notifier.out").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "relay", "notifier"], env=env,
                               stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield port
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (workdir / "notifier.out").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        out.close()


@asynccontextmanager
async def running_notifier(redis_url: str, webhook_url: str,
                           workdir: Path) -> AsyncIterator[int]:
    """``notifier_process``, once its health listener answers."""
    with notifier_process(redis_url, webhook_url, workdir) as port:
        async def listening() -> bool:
            try:
                return (await get(port, "/healthz"))[0] == 200
            except aiohttp.ClientError:
                return False
        await wait_for(listening, 30)
        yield port


async def refused(port: int) -> bool:
    """Whether a new connection to ``port`` is refused (nothing listens any more)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


class LineClient:
    """A plaintext SMTP client that sends exactly what a test says, when it says it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> LineClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        code, _ = await client.reply()
        assert code == 220
        return client

    async def reply(self, seconds: float = 20) -> tuple[int, str]:
        """One (possibly multi-line) reply; (0, "") when the server closed the connection."""
        lines = []
        while True:
            try:
                line = await asyncio.wait_for(self.reader.readline(), seconds)
            except ConnectionResetError:
                line = b""
            if not line:
                return 0, "\n".join(lines)
            text = line.decode().rstrip("\r\n")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), "\n".join(lines)

    async def command(self, line: str) -> tuple[int, str]:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def login(self, user: str = "agent@kw.test", password: str = PASSWORD) -> None:
        assert (await self.command("EHLO client.test"))[0] == 250
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        assert (await self.command(f"AUTH PLAIN {token}"))[0] == 235

    async def open_transaction(self, sender: str = "agent@kw.test",
                               recipients: tuple[str, ...] = ("client@example.test",)) -> None:
        """MAIL FROM and RCPT TO, each accepted; DATA not yet sent."""
        assert (await self.command(f"MAIL FROM:<{sender}>"))[0] == 250
        for rcpt in recipients:
            code, text = await self.command(f"RCPT TO:<{rcpt}>")
            assert code == 250, (code, text)

    async def until_closed(self, seconds: float = 20) -> bytes:
        """Whatever the server still sends until it closes the connection (then closed
        here too)."""
        try:
            return await asyncio.wait_for(self.reader.read(), seconds)
        except ConnectionResetError:
            return b""
        finally:
            self.close()

    def close(self) -> None:
        self.writer.close()

    async def aclose(self) -> None:
        """Close and wait until the transport is gone: a test ending right after a bare
        close() may tear its loop down before the socket is, a ResourceWarning."""
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def send_to(port: int, *recipients: str) -> list[int]:
    """One transaction; the reply code to each RCPT (DATA follows if any was accepted)."""
    client = await LineClient.connect(port)
    try:
        await client.login()
        assert (await client.command("MAIL FROM:<agent@kw.test>"))[0] == 250
        codes = [(await client.command(f"RCPT TO:<{r}>"))[0] for r in recipients]
        if 250 in codes:
            assert (await client.command("DATA"))[0] == 354
            await client.send(body() + b".\r\n")
            assert (await client.reply())[0] == 250
        await client.command("QUIT")
        return codes
    finally:
        client.close()


def body(subject: str = "Lifecycle", lines: int = 3) -> bytes:
    """A small message, CRLF line ends, without the terminating dot."""
    text = (f"From: agent@kw.test\r\nTo: client@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.monotonic_ns()}@kw.test>\r\n\r\n")
    return text.encode() + b"".join(b"line %d of the body\r\n" % i for i in range(lines))


def captured(state: Path) -> list[bytes]:
    """The messages the relay wrote to its capture folder (the development upstream)."""
    folder = state / "capture"
    return [p.read_bytes() for p in sorted(folder.glob("*.eml"))] if folder.exists() else []


def occupied_port() -> socket.socket:
    """A listening socket on an ephemeral port, to make a relay's bind fail."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


Start = Callable[..., ServeProcess]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Start]:
    """``serve(env, *args)`` starts ``command-relay serve``; all (and their workers) are
    killed at the end. Test modules import this fixture."""
    started: list[ServeProcess] = []

    def start(env: dict[str, str], *args: str, name: str = "serve") -> ServeProcess:
        process = ServeProcess(env, tmp_path, *args, name=name)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
