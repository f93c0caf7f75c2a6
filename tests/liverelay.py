"""``command-relay serve`` as a real process with its own Redis and a capturing SMTP upstream
(running in a thread), for the synchronous suites that talk to it over raw sockets: the
session fuzzer and the security matrix. Module-scoped users of it get a Redis of their own,
so no other test's flush can take their users away."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis

from relay.identity.accounts import AccountStore
from relay.store import keys
from relay.store.client import connect_redis
from tests.conftest import CapturingUpstream, RedisServer, UpstreamBehaviour
from tests.serving import ServeProcess, relay_env


def cheap_hash(password: str) -> str:
    """An scrypt hash at the lowest cost: checking a wrong password costs microseconds, so a
    suite can try thousands (the format carries its parameters; relay.passwords)."""
    salt = b"cheap-salt-012345"
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2, r=1, p=1, dklen=32)
    b64 = base64.b64encode
    return f"scrypt$2$1$1${b64(salt).decode()}${b64(digest).decode()}"


class UpstreamThread:
    """The capturing SMTP upstream on its own event loop in a thread."""

    def __init__(self, rcpt_replies: dict[str, str] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.upstream = CapturingUpstream(UpstreamBehaviour(rcpt_replies=rcpt_replies or {}))

    def __enter__(self) -> CapturingUpstream:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.upstream.start(), self.loop).result(10)
        return self.upstream

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _stop(self) -> None:
        """Stop listening and end the sessions still open (the relay's pooled connections),
        so no transport outlives the loop."""
        await self.upstream.stop()
        sessions = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)
        await asyncio.sleep(0)  # the transports' close callbacks


@dataclass(frozen=True)
class UserSpec:
    key: str  # how the suite names the user
    email: str
    password: str | None
    senders: tuple[str, ...] = ()


async def _add_accounts(url: str, users: list[UserSpec],
                        apps: dict[str, str]) -> dict[str, str]:
    client = connect_redis(url, timeout=5)
    try:
        await client.flushdb()
        accounts = AccountStore(client)
        ids = {}
        for spec in users:
            user = await accounts.add_user(
                spec.email, plan="free", tz="UTC", custom_limit=10**9, senders=spec.senders,
                password_hash=cheap_hash(spec.password) if spec.password else None)
            ids[spec.key] = user.id
        for name, password in apps.items():
            await accounts.add_app(name, password_hash=cheap_hash(password))
        return ids
    finally:
        await client.aclose()


@dataclass
class LiveRelay:
    port: int
    process: ServeProcess
    upstream: CapturingUpstream
    redis: redis.Redis
    users: dict[str, str]  # key -> user id

    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def usage(self, key: str) -> dict[str, int]:
        """used and delivered of a user over every month (a run may cross one)."""
        total: Counter[str] = Counter()
        for name in self.redis.scan_iter(keys.usage(self.users[key], "*")):
            record = self.redis.hgetall(name)
            total["used"] += int(record.get("used", 0))
            total["delivered"] += int(record.get("delivered", 0))
        return dict(total)


@contextmanager
def live_relay(redis_server: RedisServer, workdir: Path, *, loop: str, users: list[UserSpec],
               apps: dict[str, str], rcpt_replies: dict[str, str] | None = None,
               **settings: str) -> Iterator[LiveRelay]:
    """A serve process on ``loop`` (uvloop or asyncio) with ``users`` and ``apps`` (cheap
    hashes, limits out of reach) and the RELAY_* ``settings``; killed on exit."""
    ids = asyncio.run(_add_accounts(redis_server.url, users, apps))
    with UpstreamThread(rcpt_replies) as upstream:
        process = ServeProcess(relay_env(
            redis_server.url, workdir / "state", RELAY_EVENT_LOOP=loop,
            RELAY_UPSTREAM_URL=f"smtp://127.0.0.1:{upstream.port}", **settings),
            workdir, name=f"live-{loop}")
        client = redis.Redis(port=redis_server.port, decode_responses=True)
        try:
            port = asyncio.run(process.port())
            yield LiveRelay(port, process, upstream, client, ids)
        finally:
            process.kill()  # before the upstream goes: its pooled connections end first
            client.close()
