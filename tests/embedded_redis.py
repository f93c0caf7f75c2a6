"""The embedded development Redis of a state folder, seen from outside: the redis-server
processes serving it, whether its socket answers, and ``python -m relay`` run on it (the
README's first run: no RELAY_REDIS_URL, no RELAY_UPSTREAM_URL)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import POLICIES
from tests.serving import clean_env


def embedded_servers(state: Path) -> list[psutil.Process]:
    """redis-server processes serving ``state``'s embedded socket (title or working dir)."""
    socket_path = str(state / "redis" / "redis.sock")
    found = []
    for process in psutil.process_iter(["name", "cmdline", "cwd"]):
        info: dict[str, Any] = process.info
        cmdline = " ".join(info.get("cmdline") or [])
        if "redis-server" not in (info.get("name") or "") + cmdline:
            continue
        if socket_path in cmdline or info.get("cwd") == str(state / "redis"):
            found.append(process)
    return found


def socket_answers(state: Path) -> bool:
    # No retries: redis-py would otherwise spend seconds reconnecting to a stopped server.
    client = redis.Redis(unix_socket_path=str(state / "redis" / "redis.sock"),
                         socket_timeout=1, socket_connect_timeout=1,
                         retry=Retry(NoBackoff(), 0))
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def env_for(state: Path, **more: str) -> dict[str, str]:
    """The environment of a relay command on the embedded defaults, state in ``state``."""
    return clean_env(RELAY_STATE_DIR=str(state), RELAY_POLICIES_DIR=str(POLICIES),
                     RELAY_LOG_FORMAT="json", **more)


def run_cli(args: list[str], env: dict[str, str], cwd: Path, *,
            stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=40, cwd=cwd)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The command's stdout, once it exited 0 without a traceback."""
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout
