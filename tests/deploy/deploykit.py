"""What the deploy/ checks ask of the relay itself: which RELAY_* names are real settings
(asked of ``load_settings``, so the answer is the relay's own), which commands the CLI really
has (asked of ``command-relay``), the settings a process with a given environment gets, and a
relay process to run checks against. Shared by every tests/deploy/test_*.py.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

from relay.config.parsers import SettingsError
from relay.config.settings import Settings, load_settings
from tests.conftest import POLICIES, REPO, free_port
from tests.serving import clean_env

DEPLOY = REPO / "deploy"
# deploy/grafana and deploy/prometheus are checked by their own tests.
_OTHERS = {"grafana", "prometheus", "__pycache__"}
OWN_FILES = sorted(p for p in DEPLOY.rglob("*")
                   if p.is_file() and not _OTHERS & set(p.relative_to(DEPLOY).parts))
COMMAND_RELAY = Path(sys.executable).with_name("command-relay")

# A RELAY_* variable name in any text; "RELAY_ROUTE_<NAME>_URL" (a pattern) and "RELAY_*" are
# not names.
_NAME = re.compile(r"\bRELAY_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_<])")


def relay_names(text: str) -> set[str]:
    return set(_NAME.findall(text))


def is_setting(name: str) -> bool:
    """Whether ``load_settings`` knows the variable (an empty value is skipped, not parsed)."""
    try:
        load_settings(environ={name: ""})
    except SettingsError as exc:
        if "unknown setting" in str(exc):
            return False
        raise
    return True


def unknown_names(names: Iterable[str]) -> set[str]:
    return {n for n in names if not is_setting(n)}


def settings_for(environ: Mapping[str, str], config_file: Path | None = None) -> Settings:
    """The settings a process with this environment gets."""
    return load_settings(environ=dict(environ), config_file=config_file)


def setting_value(environ: Mapping[str, str], name: str) -> str:
    """A setting's value as text: the environment's, else Settings' own default."""
    if name in environ:
        return environ[name]
    return str(getattr(Settings(), name.removeprefix("RELAY_").lower()))


# Valid stand-ins for the placeholders of the shipped secrets (the Kubernetes Secret, the
# systemd unit's environment file), to load the settings a process would get.
SECRET_STAND_INS = {
    "RELAY_REDIS_URL": "rediss://:a-password@redis.internal:6380/0",
    "RELAY_UPSTREAM_URL": "smtp+starttls://relay:a-password@smtp.provider.example:587",
    "RELAY_CREDENTIALS_KEY": "UBU5Ey1ZqhErT4YxI5fRttvpeJCMxb7C_i9MaC3W6UY=",
    "RELAY_LINK_SECRET": "a-link-signing-secret-of-some-length",
    "RELAY_ADMIN_TOKEN": "an-admin-token-of-some-length",
    "RELAY_NOTIFY_WEBHOOK_SECRET": "a-notify-signing-secret",
    "RELAY_TIMELINE_WEBHOOK_SECRET": "a-timeline-signing-secret",
}


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def assert_cli_command(argv: list[str]) -> None:
    """``command-relay ARGV`` is a command the CLI has: ``ARGV --help`` exits 0."""
    result = subprocess.run([str(COMMAND_RELAY), *argv, "--help"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, (argv, result.stderr)
    assert result.stdout.startswith("usage: command-relay"), result.stdout


def project_version() -> str:
    document = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return str(document["project"]["version"])


class RelayProcess:
    """``command-relay ARGV`` (default ``serve``) as a real process on loopback ports,
    against the test Redis, optionally started through ``prefix`` (a wrapper command)."""

    def __init__(self, tmp_path: Path, redis_url: str, extra: Mapping[str, str] | None = None,
                 *, argv: list[str] | None = None, prefix: list[str] | None = None) -> None:
        self.port = free_port()
        self.env = clean_env(metrics_ports=False)
        self.env.update(RELAY_REDIS_URL=redis_url, RELAY_LISTEN=f"127.0.0.1:{self.port}",
                        RELAY_STATE_DIR=str(tmp_path / "state"),
                        RELAY_POLICIES_DIR=str(POLICIES), RELAY_LOG_FORMAT="json",
                        RELAY_HOSTNAME="relay.test", RELAY_METRICS_LISTEN="127.0.0.1:0",
                        RELAY_NOTIFIER_METRICS_LISTEN="127.0.0.1:0")
        self.env.update(extra or {})
        self.log = tmp_path / "relay.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [*(prefix or []), str(COMMAND_RELAY), *(argv or ["serve"])], env=self.env,
                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_listening(self, seconds: float = 30) -> None:
        """Until the SMTP port accepts a connection; fails if the process exits first."""
        deadline = time.monotonic() + seconds
        while True:
            assert self.process.poll() is None, f"relay exited:\n{self.output()}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"relay never listened:\n{self.output()}"
            time.sleep(0.05)

    def stop(self, seconds: float = 40) -> int:
        """SIGTERM, then the exit status (SIGKILL and a failure if it does not stop)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"relay ignored SIGTERM:\n{self.output()}") from None
