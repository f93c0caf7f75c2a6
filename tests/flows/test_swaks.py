"""The relay driven by swaks, the command-line SMTP client operators use."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from tests.conftest import PASSWORD, add_user, swaks_path

pytestmark = pytest.mark.swaks


def _swaks() -> str:
    path = swaks_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("swaks is not installed; .ci/run installs it (apt-get install swaks)")
        pytest.skip("swaks is not installed (apt-get install swaks)")
    return path


async def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [_swaks(), *args], capture_output=True,
                                   text=True, timeout=30)


async def test_swaks_sends_with_starttls_and_auth(make_relay, upstream, accounts):
    """swaks --tls --auth PLAIN delivers; the upstream sees the message and it is counted."""
    user = await add_user(accounts)
    app = await make_relay(upstream=upstream, allow_plaintext_auth=False)
    result = await _run("--server", "127.0.0.1", "--port", str(app.port), "--tls",
                        "--auth", "PLAIN", "--auth-user", "agent@kw.test",
                        "--auth-password", PASSWORD, "--from", "agent@kw.test",
                        "--to", "client@example.test", "--helo", "swaks.test",
                        "--header", "Subject: swaks test")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Message accepted" in result.stdout
    assert upstream.messages[0].rcpt_tos == ["client@example.test"]
    assert b"Subject: swaks test" in upstream.messages[0].content
    assert (await app.quota.usage(user.id, "2026-11")).used == 1


async def test_swaks_over_limit_gets_550(make_relay, upstream, accounts):
    """Over the limit, swaks sees the 550 5.7.1 reply naming the limit, and exits non-zero."""
    await add_user(accounts, limit=1)
    app = await make_relay(upstream=upstream)
    common = ["--server", "127.0.0.1", "--port", str(app.port), "--auth", "LOGIN",
              "--auth-user", "agent@kw.test", "--auth-password", PASSWORD,
              "--from", "agent@kw.test", "--helo", "swaks.test"]
    first = await _run(*common, "--to", "one@example.test")
    assert first.returncode == 0, first.stdout
    second = await _run(*common, "--to", "two@example.test")
    assert second.returncode != 0
    assert "550 5.7.1 Monthly Command Email limit reached (1 of 1 sends used)" in second.stdout


async def test_swaks_without_auth_is_refused(relay, upstream, accounts):
    """An unauthenticated swaks session is refused with 530 5.7.0: never an open relay."""
    await add_user(accounts)
    result = await _run("--server", "127.0.0.1", "--port", str(relay.port),
                        "--from", "agent@kw.test", "--to", "client@example.test",
                        "--helo", "swaks.test")
    assert result.returncode != 0
    assert "530 5.7.0 Authentication required" in result.stdout
    assert upstream.messages == []
