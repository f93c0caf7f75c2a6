"""``command-relay serve --workers N``: one supervisor process and N worker processes.

Pre-fork on shared sockets: the supervisor binds the listening sockets (SMTP, SMTPS, admin
API, public HTTP) once and starts each worker as ``python -m relay serve --worker SPEC`` with those
sockets inherited; every worker runs the whole relay (``app.serve``) on its own event loop
and accepts from the same sockets. Chosen over SO_REUSEPORT because:

* bind errors (port taken, bad address) surface once, in the supervisor, before any worker
  starts, and port 0 (the tests) gives every worker the same port;
* one shared accept queue: a worker that dies or drains leaves its waiting connections to the
  others, where SO_REUSEPORT's per-socket queues reset the connections hashed to the dead
  worker's socket;
* nothing else on the host can join the port group.

The price is that the kernel does not spread new connections evenly (the first worker to
wake takes one); SMTP sessions are long next to an accept, so the load still evens out.

The supervisor also owns what must exist once per host: the embedded development Redis, the
self-signed development certificate, the development credentials key and the TLS session-
ticket key (relay/smtp/tickets.py), handed to the workers in their environment. It forwards
SIGTERM/SIGINT (drain) and SIGHUP (reload) to the workers, restarts a worker that dies
unexpectedly (with exponential backoff, logged), and exits 0 once every worker has drained.
A socket pair links each worker to it: the worker says when it is serving, and sees the
supervisor vanish (EOF) if it is killed, then drains.

The metrics listener (``RELAY_METRICS_LISTEN``) is the supervisor's own: it answers for every
worker (relay/observe/supervisor_metrics.py). Each worker serves its own registry on a
private loopback socket the supervisor bound for its slot, handed to it as its
``metrics_listen`` socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import structlog

from relay.config.endpoints import Endpoint
from relay.config.policies import load_policies
from relay.config.settings import Settings
from relay.delivery.credentials import load_key
from relay.errors import StartupError
from relay.identity.signed_links import load_link_secret
from relay.observe.metrics import SupervisorMetrics
from relay.observe.supervisor_metrics import SlotState, SupervisorMetricsServer, WorkerSlot
from relay.process.link import READY, WorkerLink
from relay.process.redis import redis_url_for
from relay.smtp import tickets
from relay.smtp.tls import ensure_dev_certificate

log = structlog.get_logger()
# Restart backoff: 0.5 s doubling to 30 s; a worker that served this long resets it.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_SECONDS = 60.0
# After the drain timeout, how long the supervisor still waits before killing a worker.
KILL_GRACE_SECONDS = 15.0


# -- the supervisor --------------------------------------------------------------------------
def _bind(endpoint: Endpoint) -> socket.socket:
    """Bound, not listening: the first worker's ``create_server(sock=…)`` calls listen(), so
    the port answers only once a worker serves it (connections are refused until then, not
    left waiting in a backlog nobody accepts from)."""
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) on an accepted socket only
    # when its proto says TCP, and accepted sockets inherit it (0 would leave Nagle on).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((endpoint.host, endpoint.port))
    except OSError:
        sock.close()
        raise
    return sock


def bind_listeners(settings: Settings) -> dict[str, socket.socket]:
    """The listening sockets the workers share, by setting name. Raises StartupError."""
    wanted: dict[str, Endpoint] = {"listen": settings.listen}
    if settings.smtps_listen is not None:
        wanted["smtps_listen"] = settings.smtps_listen
    if settings.admin_token:
        wanted["admin_listen"] = settings.admin_listen
    if settings.public_listen is not None:
        wanted["public_listen"] = settings.public_listen
    if settings.metrics_listen is not None:
        wanted["metrics_listen"] = settings.metrics_listen
    bound: dict[str, socket.socket] = {}
    for name, endpoint in wanted.items():
        try:
            bound[name] = _bind(endpoint)
        except OSError as exc:
            for sock in bound.values():
                sock.close()
            raise StartupError(f"cannot listen on {endpoint} ({name}): "
                               f"{exc.strerror or exc}") from None
    return bound


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return str(Endpoint(host, port))


class Supervisor:
    def __init__(self, settings: Settings, workers: int, config: Path | None = None) -> None:
        self._settings = settings
        self._count = workers
        self._config = config
        self._sockets: dict[str, socket.socket] = {}
        # The metrics listener, and each slot's private one: open until the end, drain included.
        self._metrics_sockets: dict[int, socket.socket] = {}
        self._metrics_server: SupervisorMetricsServer | None = None
        self.metrics = SupervisorMetrics(workers)
        self._env: dict[str, str] = {}
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._ready: set[int] = set()
        self._reload_pending: set[int] = set()
        self._stopping = asyncio.Event()
        self._exit_code = 0

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT and every worker drained. Returns the exit status.
        Raises StartupError, PolicyError, EmbeddedRedisError before any worker starts."""
        s = self._settings
        # Fail here, once, on what every worker would fail on.
        await asyncio.to_thread(load_policies, s.policies_dir)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        async with redis_url_for(s) as redis_url:
            self._env = await self._worker_env(redis_url)
            self._sockets = bind_listeners(s)
            listen = {name: _address(sock) for name, sock in self._sockets.items()}
            try:
                await self._start_metrics()
                log.info("supervisor.started", pid=os.getpid(), workers=self._count,
                         listen=listen)
                slots = [asyncio.create_task(self._run_slot(i))
                         for i in range(1, self._count + 1)]
                await asyncio.gather(*slots)
            finally:
                self._close_sockets()
                if self._metrics_server is not None:
                    await self._metrics_server.stop()
                for sock in self._metrics_sockets.values():
                    sock.close()
        log.info("supervisor.stopped", exit_code=self._exit_code)
        return self._exit_code

    async def _worker_env(self, redis_url: str) -> dict[str, str]:
        """The workers' environment: this one, plus what must be made once per host."""
        s = self._settings
        env = dict(os.environ)
        env["RELAY_REDIS_URL"] = redis_url
        if not (s.tls_cert and s.tls_key):
            cert, key = await asyncio.to_thread(ensure_dev_certificate, s.state_dir, s.hostname)
            log.warning("dev.self_signed_certificate", cert=str(cert),
                        note="development default: set RELAY_TLS_CERT and RELAY_TLS_KEY")
            env["RELAY_TLS_CERT"], env["RELAY_TLS_KEY"] = str(cert), str(key)
        if not s.credentials_key:
            # Made here so that workers cannot race to create two different keys.
            key_bytes = await asyncio.to_thread(load_key, None, s.state_dir)
            env["RELAY_CREDENTIALS_KEY"] = key_bytes.decode()
        if not s.link_secret:
            secret = await asyncio.to_thread(load_link_secret, None, s.state_dir)
            env["RELAY_LINK_SECRET"] = secret.decode()
        # One TLS ticket key for all workers (memory only, new at every start): a returning
        # client resumes its session whichever worker takes its next connection.
        tickets.export_key(tickets.new_key(), env)
        return env

    async def _start_metrics(self) -> None:
        """Serve the metrics listener bound with the others, and bind each slot's private one
        (loopback, port 0; a restarted worker gets its slot's socket again)."""
        public = self._sockets.pop("metrics_listen", None)
        if public is None:
            return
        self._metrics_sockets[0] = public
        try:
            for index in range(1, self._count + 1):
                self._metrics_sockets[index] = _bind(Endpoint("127.0.0.1", 0))
        except OSError as exc:
            raise StartupError(f"cannot bind the workers' metrics sockets on 127.0.0.1: "
                               f"{exc.strerror or exc}") from None
        self._metrics_server = SupervisorMetricsServer(public, self, self.metrics)
        await self._metrics_server.start()

    @property
    def draining(self) -> bool:
        return self._stopping.is_set()

    def slots(self) -> list[WorkerSlot]:
        """Every slot's state now, for the metrics listener."""
        found = []
        for index in range(1, self._count + 1):
            state: SlotState = ("serving" if index in self._ready
                                else "starting" if index in self._procs else "down")
            sock = self._metrics_sockets.get(index)
            found.append(WorkerSlot(index, state, sock.getsockname()[1] if sock else 0))
        return found

    def _close_sockets(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    # -- signals -------------------------------------------------------------------------------
    def _stop(self, name: str) -> None:
        if self._stopping.is_set():
            log.info("supervisor.signal_ignored", signal=name, note="already draining")
            return
        log.info("supervisor.stopping", signal=name, drain_timeout=self._settings.drain_timeout)
        self._begin_stop()

    def _begin_stop(self) -> None:
        self._stopping.set()
        # Once the workers close theirs too, the kernel refuses new connections.
        self._close_sockets()
        for index, proc in self._procs.items():
            self._signal(index, proc, signal.SIGTERM)
        asyncio.get_running_loop().call_later(
            self._settings.drain_timeout + KILL_GRACE_SECONDS, self._kill_remaining)

    def _kill_remaining(self) -> None:
        for index, proc in self._procs.items():
            log.error("worker.killed", worker=index, pid=proc.pid,
                      note="still running long after the drain timeout")
            self._signal(index, proc, signal.SIGKILL)

    def _reload(self) -> None:
        log.info("supervisor.reload", workers=sorted(self._procs))
        for index, proc in self._procs.items():
            if index in self._ready:
                self._signal(index, proc, signal.SIGHUP)
            else:
                # Not serving yet (its SIGHUP handler may not exist): reload once it is,
                # in case it read the policies before they changed.
                self._reload_pending.add(index)

    @staticmethod
    def _signal(index: int, proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)

    # -- one worker slot -------------------------------------------------------------------------
    async def _spawn(self, index: int) -> tuple[asyncio.subprocess.Process, socket.socket]:
        ours, theirs = socket.socketpair()
        fds = {name: sock.fileno() for name, sock in self._sockets.items()}
        if index in self._metrics_sockets:
            fds["metrics_listen"] = self._metrics_sockets[index].fileno()
        argv = [sys.executable, "-m", "relay",
                *(["--config", str(self._config)] if self._config else []),
                "serve", "--worker", WorkerLink.spec(index, theirs.fileno(), fds)]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=self._env, stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(), *fds.values()))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        log.info("worker.started", worker=index, pid=proc.pid)
        return proc, ours

    async def _wait_ready(self, proc: asyncio.subprocess.Process, link: socket.socket) -> bool:
        loop = asyncio.get_running_loop()
        said = asyncio.ensure_future(loop.sock_recv(link, 1))
        exited = asyncio.ensure_future(proc.wait())
        await asyncio.wait({said, exited}, return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if not said.done():
            said.cancel()
            return False
        return not said.cancelled() and said.exception() is None and said.result() == READY

    async def _run_slot(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        served = False
        while not self._stopping.is_set():
            began = loop.time()
            proc, link = await self._spawn(index)
            self._procs[index] = proc
            try:
                if await self._wait_ready(proc, link):
                    served = True
                    self._ready.add(index)
                    log.info("worker.ready", worker=index, pid=proc.pid)
                    if self._stopping.is_set():
                        self._signal(index, proc, signal.SIGTERM)
                    elif index in self._reload_pending:
                        self._signal(index, proc, signal.SIGHUP)
                self._reload_pending.discard(index)
                code = await proc.wait()
            finally:
                link.close()
                self._ready.discard(index)
                del self._procs[index]
            if self._stopping.is_set():
                log.info("worker.exited", worker=index, pid=proc.pid, returncode=code)
                return
            if not served:
                # The first start failed (its error is on stderr): a configuration problem
                # that restarting will not fix. Stop the others and exit 1.
                log.error("worker.failed_to_start", worker=index, pid=proc.pid, returncode=code)
                self._exit_code = 1
                self._begin_stop()
                return
            if loop.time() - began >= STABLE_SECONDS:
                failures = 0
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** failures)
            failures += 1
            self.metrics.restarts(str(index)).inc()
            log.error("worker.died", worker=index, pid=proc.pid, returncode=code,
                      restart_in=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
