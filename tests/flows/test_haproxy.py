"""The relay behind a real HAProxy (Debian package ``haproxy``) in TCP mode, with
``send-proxy`` and ``send-proxy-v2``: mail flows, the relay logs the real client, HAProxy's
SMTP health checks keep the server UP without noise in the relay's logs, and a direct
connection that bypasses the balancer is refused.

The client connects from 127.0.0.2 (a loopback address distinct from the balancer's
127.0.0.1), so "the real client" and "the balancer" are told apart on one machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from relay.process.wiring import RelayApp
from tests.conftest import PASSWORD, RelayFactory, add_user, free_port, message, wait_for

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy"
                                      if Path("/usr/sbin/haproxy").exists() else None)

CLIENT = "127.0.0.2"
BALANCER = "127.0.0.1"

CONFIG = """\
global
    stats socket {socket} mode 600 level admin
    # No syslog, no daemon: the test reads stderr and owns the process.

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout check 5s

frontend smtp
    bind 127.0.0.1:{front_port}
    default_backend relays

backend relays
    option smtpchk EHLO lb.test
    server relay1 127.0.0.1:{relay_port} {send_proxy} check inter 100ms fall 2 rise 1
"""


class HAProxy:
    """One haproxy process in the foreground (-db) on ephemeral ports, and its stats socket."""

    def __init__(self, workdir: Path, relay_port: int, send_proxy: str) -> None:
        # A Unix socket path must stay under ~100 bytes; pytest's tmp_path may not.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="relay-haproxy-"))
        self.socket = self._socket_dir / "stats.sock"
        self.front_port = free_port()
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(CONFIG.format(socket=self.socket, front_port=self.front_port,
                                             relay_port=relay_port, send_proxy=send_proxy))
        self.stderr = workdir / "haproxy.stderr"
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        if HAPROXY is None:
            if os.environ.get("CI"):
                pytest.fail("haproxy is not installed; .ci/run installs it")
            pytest.skip("haproxy is not installed (apt-get install haproxy)")
        check = await asyncio.to_thread(
            subprocess.run, [HAPROXY, "-c", "-f", str(self.config)], capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr
        with self.stderr.open("wb") as err:
            self.process = await asyncio.to_thread(
                subprocess.Popen, [HAPROXY, "-db", "-f", str(self.config)], stdout=err,
                stderr=subprocess.STDOUT)
        await wait_for(self._ready, 15)

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited: {self.stderr.read_text()}")
        return self.socket.exists()

    async def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                await asyncio.to_thread(self.process.wait, 10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
            self.process = None
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    async def command(self, line: str) -> str:
        """One command on the stats socket (the socket closes after the answer)."""
        def ask() -> str:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(self.socket))
                sock.sendall(line.encode() + b"\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            return b"".join(chunks).decode()
        return await asyncio.to_thread(ask)

    async def server_state(self) -> dict[str, str]:
        """``show servers state relays``: the row of relay1, by column name."""
        lines = [line for line in (await self.command("show servers state relays")).splitlines()
                 if line.strip()]
        header = lines[1].lstrip("# ").split()
        rows = [dict(zip(header, line.split(), strict=False)) for line in lines[2:]]
        (row,) = [row for row in rows if row["srv_name"] == "relay1"]
        return row

    async def stat(self) -> dict[str, str]:
        """``show stat``: relay1's CSV row (check_status, chkfail, status…)."""
        lines = (await self.command("show stat")).splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "relays" and row.get("svname") == "relay1":
                # "* L7OK": HAProxy marks the last result with "* " while the next check is
                # running; the result is the same.
                row["check_status"] = row.get("check_status", "").removeprefix("* ")
                return row
        raise AssertionError("relay1 not in show stat")

    async def wait_checked(self, status: str, passed: Callable[[], bool]) -> dict[str, str]:
        """Wait until relay1's last check ended in ``status`` and ``passed()`` holds (the
        caller's proof that several checks reached the relay)."""
        found: dict[str, str] = {}

        async def settled() -> bool:
            nonlocal found
            found = await self.stat()
            return found.get("check_status") == status and passed()

        await wait_for(settled, 20)
        return found


@asynccontextmanager
async def balancer(tmp_path: Path, relay: RelayApp, send_proxy: str) -> AsyncIterator[HAProxy]:
    proxy = HAProxy(tmp_path, relay.port, send_proxy)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def proxied_relay(make_relay: RelayFactory, upstream: Any, **overrides: Any) -> RelayApp:
    app: RelayApp = await make_relay(
        upstream=upstream, proxy_protocol=True,
        trusted_proxies=(ipaddress.ip_network(f"{BALANCER}/32"),), **overrides)
    return app


def send_mail(port: int, source: str = CLIENT) -> None:
    """smtplib, as an application would: EHLO, AUTH, one message, QUIT (run in a thread)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test",
                      source_address=(source, 0), timeout=10) as client:
        client.login("agent@kw.test", PASSWORD)
        refused = client.sendmail("agent@kw.test", ["client@example.test"], message())
        assert refused == {}


def local_sessions(logs: list[dict[str, Any]]) -> set[str]:
    """Session ids of the balancer's own connections (its health checks)."""
    return {entry["session_id"] for entry in logs if entry.get("proxy") == "local"}


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
async def test_haproxy_mail_flows_with_the_real_client(make_relay, upstream, accounts,
                                                       tmp_path: Path, send_proxy: str):
    """Through HAProxy, mail reaches the upstream, and the relay's session, AUTH and delivery
    lines and the Received: header carry the client's address (127.0.0.2), with the
    balancer's (127.0.0.1) as ``proxy``; health checks keep relay1 UP and log only at debug."""
    await add_user(accounts)
    relay = await proxied_relay(make_relay, upstream)
    with capture_logs() as logs:
        async with balancer(tmp_path, relay, send_proxy) as haproxy:
            stat = await haproxy.wait_checked("L7OK", lambda: len(local_sessions(logs)) >= 3)
            assert stat["status"] == "UP", stat
            await asyncio.to_thread(send_mail, haproxy.front_port)
            await wait_for(lambda: [entry for entry in logs
                                    if entry["event"] == "session.closed"
                                    and entry.get("peer") == CLIENT])
            state = await haproxy.server_state()
            assert state["srv_op_state"] == "2", state  # SRV_ST_RUNNING
            stat = await haproxy.stat()
            assert stat["check_status"] == "L7OK" and stat["status"] == "UP", stat
    assert len(upstream.messages) == 1
    assert upstream.messages[0].content.startswith(
        f"Received: from client.test ([{CLIENT}])".encode())
    client_lines = [entry for entry in logs if entry.get("peer") == CLIENT]
    events = [entry["event"] for entry in client_lines]
    for name in ("session.opened", "auth.succeeded", "mail.accepted", "delivery.finished",
                 "session.closed"):
        assert name in events, name
    assert {entry.get("proxy") for entry in client_lines} == {BALANCER}
    # The health checks were sessions of their own, quiet, and never refused.
    checks = local_sessions(logs)
    assert len(checks) >= 3
    check_lines = [entry for entry in logs if entry.get("session_id") in checks]
    assert {entry["log_level"] for entry in check_lines} == {"debug"}
    assert not [entry for entry in logs if entry["log_level"] in ("warning", "error")], \
        [entry for entry in logs if entry["log_level"] in ("warning", "error")]


async def test_haproxy_direct_connection_is_refused(make_relay, upstream, accounts,
                                                    tmp_path: Path):
    """With PROXY on, a client that bypasses the balancer gets 421 4.7.0 and a proxy.untrusted
    warning, while the same client through HAProxy is served."""
    await add_user(accounts)
    relay = await proxied_relay(make_relay, upstream)
    with capture_logs() as logs:
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            await asyncio.to_thread(send_mail, relay.port)
        assert refused.value.smtp_code == 421
        async with balancer(tmp_path, relay, "send-proxy-v2") as haproxy:
            await haproxy.wait_checked("L7OK", lambda: True)  # up and serving
            await asyncio.to_thread(send_mail, haproxy.front_port)
    (untrusted,) = [entry for entry in logs if entry["event"] == "proxy.untrusted"]
    assert untrusted["peer"] == CLIENT and untrusted["smtp_code"] == 421
    assert len(upstream.messages) == 1


async def test_haproxy_checks_fail_when_the_relay_does_not_trust_the_balancer(
        make_relay, upstream, tmp_path: Path):
    """The health check is a real test: when the relay does not trust the balancer, every
    check is refused with 421 (and logged as proxy.untrusted), so relay1 goes DOWN."""
    relay: RelayApp = await make_relay(
        upstream=upstream, proxy_protocol=True,
        trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
    with capture_logs() as logs:
        async with balancer(tmp_path, relay, "send-proxy-v2") as haproxy:
            async def down() -> bool:
                return (await haproxy.stat()).get("status") == "DOWN"
            await wait_for(down, 20)
            state = await haproxy.server_state()
            assert state["srv_op_state"] == "0", state  # SRV_ST_STOPPED
            stat = await haproxy.stat()
            assert stat["check_status"] == "L7STS" and stat["check_code"] == "421", stat
    untrusted = [entry for entry in logs if entry["event"] == "proxy.untrusted"]
    assert untrusted and {entry["peer"] for entry in untrusted} == {BALANCER}
