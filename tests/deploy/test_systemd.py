"""deploy/systemd/*.service: verified by systemd's own `systemd-analyze verify` and scored by
`systemd-analyze security --offline`, parsed for the hardening options and the drain, and
MemoryDenyWriteExecute proven on the relay itself with the kernel's per-process equivalent.

systemd-analyze works without systemd running (.ci/run installs Debian's systemd package if
it is missing). `verify` needs ExecStart's program to exist, so it checks a copy of each unit
whose ExecStart is this virtualenv's command-relay.
"""

from __future__ import annotations

import asyncio
import configparser
import ctypes
import os
import re
import shlex
import shutil
import smtplib
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSWORD, CapturingUpstream, add_user, free_port, wait_for
from tests.deploy.deploykit import (
    COMMAND_RELAY,
    DEPLOY,
    SECRET_STAND_INS,
    RelayProcess,
    assert_cli_command,
    setting_value,
    settings_for,
    unknown_names,
)

UNITS = DEPLOY / "systemd"
RELAY_UNIT = UNITS / "command-relay.service"
NOTIFIER_UNIT = UNITS / "command-relay-notifier.service"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing: .ci/run installs Debian's systemd")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return found


class Unit:
    """A unit file as systemd reads it: repeated keys kept in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sections: dict[str, list[tuple[str, str]]] = {}
        section = ""
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                self.sections.setdefault(section, [])
                continue
            key, _, value = line.partition("=")
            self.sections[section].append((key.strip(), value.strip()))

    def all(self, section: str, key: str) -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def get(self, section: str, key: str) -> str:
        values = self.all(section, key)
        assert values, f"{self.path.name}: no {key}= in [{section}]"
        return values[-1]

    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for value in self.all("Service", "Environment"):
            for assignment in shlex.split(value):
                key, _, val = assignment.partition("=")
                env[key] = val
        return env

    def exec_start(self) -> list[str]:
        return shlex.split(self.get("Service", "ExecStart"))


def _seconds(value: str) -> float:
    """A systemd time span as used here: 45, 45s, 1min 30s."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def _verifiable_copy(unit: Path, directory: Path) -> Path:
    """The unit with ExecStart running this virtualenv's command-relay (systemd-analyze
    verify refuses a program that does not exist)."""
    text = unit.read_text(encoding="utf-8")
    program = Unit(unit).exec_start()[0]
    copy = directory / unit.name
    copy.write_text(text.replace(program, str(COMMAND_RELAY)), encoding="utf-8")
    return copy


# -- systemd's own checks --------------------------------------------------------------------
@pytest.mark.parametrize("unit", [RELAY_UNIT, NOTIFIER_UNIT], ids=lambda p: p.name)
def test_systemd_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path):
    """`systemd-analyze verify` accepts the unit without a single complaint."""
    result = subprocess.run([systemd_analyze(), "verify", "--man=no",
                             str(_verifiable_copy(unit, tmp_path))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_verify_can_fail(tmp_path: Path):
    """The same check reports a misspelt option (verify warns, exit 0) and a missing
    program (exit 1)."""
    unit = tmp_path / "command-relay.service"
    text = _verifiable_copy(RELAY_UNIT, tmp_path).read_text(encoding="utf-8")
    unit.write_text(text.replace("ProtectSystem=strict", "ProtectSytem=strict"),
                    encoding="utf-8")
    result = subprocess.run([systemd_analyze(), "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert "Unknown key 'ProtectSytem'" in result.stderr, result.stderr
    unit.write_text(text.replace(str(COMMAND_RELAY), "/nonexistent/command-relay"),
                    encoding="utf-8")
    result = subprocess.run([systemd_analyze(), "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


@pytest.mark.parametrize("unit", [RELAY_UNIT, NOTIFIER_UNIT], ids=lambda p: p.name)
def test_systemd_unit_exposure_is_low(unit: Path, tmp_path: Path):
    """`systemd-analyze security --offline` rates the unit's exposure at most 2.0 ("OK"; an
    unhardened service is about 9.6, "UNSAFE")."""
    result = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager",
                             str(_verifiable_copy(unit, tmp_path))],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout
    assert match.group(2) == "OK"


# -- hardening, lifecycle, settings ----------------------------------------------------------
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "DynamicUser": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
}


@pytest.mark.parametrize("unit", [RELAY_UNIT, NOTIFIER_UNIT], ids=lambda p: p.name)
def test_systemd_unit_is_hardened(unit: Path):
    """The hardening options are set, and the only capability is binding low ports (the
    relay) or none at all (the notifier)."""
    parsed = Unit(unit)
    for key, value in HARDENING.items():
        assert parsed.get("Service", key) == value, key
    capabilities = parsed.get("Service", "CapabilityBoundingSet")
    if unit == RELAY_UNIT:
        assert capabilities == parsed.get("Service", "AmbientCapabilities") == \
            "CAP_NET_BIND_SERVICE"
    else:
        assert capabilities == ""
        assert parsed.all("Service", "AmbientCapabilities") == []
    assert parsed.all("Service", "User") == []  # DynamicUser makes one up
    assert parsed.get("Service", "StateDirectory")
    assert parsed.get("Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("unit", [RELAY_UNIT, NOTIFIER_UNIT], ids=lambda p: p.name)
def test_systemd_unit_stops_with_sigterm_after_the_drain(unit: Path):
    """SIGTERM to the main process, and systemd waits longer than the drain before SIGKILL."""
    parsed = Unit(unit)
    assert parsed.get("Service", "KillSignal") == "SIGTERM"
    assert parsed.get("Service", "KillMode") == "mixed"
    drain = float(setting_value(parsed.environment(), "RELAY_DRAIN_TIMEOUT"))
    assert _seconds(parsed.get("Service", "TimeoutStopSec")) > drain
    assert parsed.get("Service", "Restart") == "on-failure"


def test_systemd_reload_sends_sighup():
    """`systemctl reload` sends SIGHUP, which reloads policies/."""
    reload = shlex.split(Unit(RELAY_UNIT).get("Service", "ExecReload"))
    assert reload == ["/bin/kill", "-HUP", "$MAINPID"]


@pytest.mark.parametrize(("unit", "command"), [(RELAY_UNIT, "serve"),
                                               (NOTIFIER_UNIT, "notifier")],
                         ids=lambda p: getattr(p, "name", p))
def test_systemd_exec_start_is_a_real_cli_command(unit: Path, command: str):
    """ExecStart is `command-relay --config … serve` (or notifier), a command of the CLI."""
    argv = Unit(unit).exec_start()
    assert Path(argv[0]).name == "command-relay"
    assert argv[-1] == command
    assert_cli_command(argv[1:])


@pytest.mark.parametrize("unit", [RELAY_UNIT, NOTIFIER_UNIT], ids=lambda p: p.name)
def test_systemd_environment_with_the_example_settings_loads(unit: Path):
    """The unit's Environment= (specifiers expanded as systemd would) on top of
    deploy/relay.example.toml, the file its --config names, loads as settings."""
    parsed = Unit(unit)
    env = {k: v.replace("%S", "/var/lib").replace("%d", "/run/credentials/x")
           for k, v in parsed.environment().items()}
    assert unknown_names(env) == set()
    settings = settings_for(env, config_file=DEPLOY / "relay.example.toml")
    argv = parsed.exec_start()
    assert argv[argv.index("--config") + 1] == "/etc/command-relay/relay.toml"
    assert str(settings.state_dir) == "/var/lib/" + parsed.get("Service", "StateDirectory")
    assert str(settings.policies_dir) == "/etc/command-relay/policies"
    assert settings.log_format == "json"
    if unit == RELAY_UNIT:
        # The TLS files are the credentials systemd hands the service.
        names = {c.split(":")[0] for c in parsed.all("Service", "LoadCredential")}
        assert {settings.tls_cert.name, settings.tls_key.name} == names  # type: ignore[union-attr]


def _environment_file(path: Path) -> dict[str, str]:
    """KEY=value lines as systemd's EnvironmentFile= reads them (quotes removed)."""
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = shlex.split(value)[0] if value else ""
    return env


def test_systemd_environment_file_example_has_the_secrets():
    """relay.env.example, named by EnvironmentFile=, sets the same secrets as the Kubernetes
    Secret, each a REPLACE-ME placeholder, and names only settings."""

    unit = Unit(RELAY_UNIT)
    assert Path(unit.get("Service", "EnvironmentFile")).name == "relay.env"
    env = _environment_file(UNITS / "relay.env.example")
    assert unknown_names(env) == set()
    secrets = {k: v for k, v in env.items() if "REPLACE-ME" in v}
    assert set(secrets) == set(SECRET_STAND_INS)
    # With real values in place of the placeholders, the settings load.
    settings_for({**env, **SECRET_STAND_INS}, config_file=DEPLOY / "relay.example.toml")


# -- MemoryDenyWriteExecute on the real relay ------------------------------------------------
PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
# Turns on the kernel's memory-deny-write-execute for itself (inherited across fork and
# exec, never lifted), says so on stderr, then runs the given command.
MDWE_WRAPPER = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE failed: errno %d" % ctypes.get_errno())
print("mdwe=%d" % libc.prctl({PR_GET_MDWE}, 0, 0, 0, 0), file=sys.stderr, flush=True)
os.execv(sys.argv[1], sys.argv[1:])
"""


def mdwe_prefix() -> list[str]:
    """The wrapper command, if this kernel has PR_SET_MDWE (Linux 6.3+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) < 0:
        if os.environ.get("CI"):
            pytest.fail("this kernel has no PR_SET_MDWE (Linux 6.3+)")
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    return [sys.executable, "-c", MDWE_WRAPPER]


def test_mdwe_wrapper_refuses_writable_code():
    """The wrapper really enforces W^X: a mapping both writable and executable is refused."""
    probe = ("import mmap\ntry:\n    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE"
             " | mmap.PROT_EXEC)\nexcept PermissionError:\n    print('refused')\n")
    result = subprocess.run([*mdwe_prefix(), sys.executable, "-c", probe], capture_output=True,
                            text=True, timeout=30)
    assert result.stdout.strip() == "refused", result.stdout + result.stderr
    assert "mdwe=1" in result.stderr
    # Without it the same mapping is allowed, so the refusal is the wrapper's doing.
    plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           timeout=30)
    assert plain.stdout.strip() == "", plain.stdout


def _send_with_starttls(port: int) -> dict[str, Any]:
    """STARTTLS (the development certificate, not verified), AUTH PLAIN, one message."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as client:
        client.starttls(context=context)
        client.login("agent@kw.test", PASSWORD)
        return client.sendmail("agent@kw.test", ["client@example.test"],
                               b"Subject: mdwe\r\n\r\nunder MemoryDenyWriteExecute\r\n")


async def test_relay_runs_under_memory_deny_write_execute(
        redis_server: Any, accounts: Any, upstream: CapturingUpstream, tmp_path: Path):
    """`command-relay serve` with W^X enforced by the kernel (what MemoryDenyWriteExecute=yes
    does) starts, makes its development certificate, serves STARTTLS, AUTH and a message to a
    real upstream, answers the admin API, and drains on SIGTERM with exit 0."""
    await add_user(accounts)
    admin = free_port()
    relay = RelayProcess(tmp_path, redis_server.url, {
        "RELAY_UPSTREAM_URL": f"smtp://127.0.0.1:{upstream.port}",
        "RELAY_ADMIN_TOKEN": "an-admin-token-of-some-length",
        "RELAY_ADMIN_LISTEN": f"127.0.0.1:{admin}",
    }, prefix=mdwe_prefix())
    try:
        await asyncio.to_thread(relay.wait_listening)
        refused = await asyncio.to_thread(_send_with_starttls, relay.port)
        assert refused == {}
        await wait_for(lambda: len(upstream.messages) == 1, 10)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        response = await asyncio.to_thread(
            opener.open, f"http://127.0.0.1:{admin}/v1/openapi.json", None, 10)
        assert response.status == 200
        response.close()
    finally:
        code = await asyncio.to_thread(relay.stop)
    output = relay.output()
    assert "mdwe=1" in output
    assert code == 0, output
    assert "Traceback" not in output and "MemoryError" not in output
    assert b"under MemoryDenyWriteExecute" in upstream.messages[0].content


async def test_notifier_runs_under_memory_deny_write_execute(
        redis_server: Any, tmp_path: Path):
    """`command-relay notifier` under the same W^X starts (policies, Redis, aiohttp) and
    stops on SIGTERM with exit 0."""
    notifier = RelayProcess(tmp_path, redis_server.url, argv=["notifier"],
                            prefix=mdwe_prefix())
    try:
        await wait_for(lambda: "notifier.started" in notifier.output()
                       or notifier.process.poll() is not None, 30)
        assert notifier.process.poll() is None, notifier.output()
    finally:
        code = await asyncio.to_thread(notifier.stop)
    output = notifier.output()
    assert code == 0, output
    assert "mdwe=1" in output and "notifier.stopped" in output
    assert "Traceback" not in output


def test_unit_file_parser_reads_repeated_keys():
    """The Unit parser keeps every Environment= line and the last value of a key."""
    parsed = Unit(RELAY_UNIT)
    env = parsed.environment()
    assert {"RELAY_STATE_DIR", "RELAY_TLS_CERT", "RELAY_TLS_KEY"} <= set(env)
    assert len(parsed.all("Service", "SystemCallFilter")) == 2
    # configparser (strict) would refuse the repeated keys systemd relies on.
    with pytest.raises(configparser.Error):
        configparser.ConfigParser(strict=True, interpolation=None).read_string(
            RELAY_UNIT.read_text(encoding="utf-8"))
