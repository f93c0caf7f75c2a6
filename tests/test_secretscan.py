"""The log secret scan (tests/secretscan.py) finds what it must, and the relay gives it
nothing to find: a client reset in the middle of AUTH leaves no AUTH token in the log
on both event loops."""

from __future__ import annotations

import ast
import asyncio
import base64
import socket
import struct
import textwrap
import urllib.parse
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import PASSWORD, RedisServer, add_user
from tests.secretscan import SCANNER, STATIC_SECRETS, needles
from tests.serving import Start, relay_env

TESTS = Path(__file__).resolve().parent


def plain_token(login: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{login}\0{password}".encode()).decode()


# -- the scanner -------------------------------------------------------------------------------
@pytest.mark.parametrize("login", ["agent@kw.test", "smartplans", "a", "ab", "x" * 40])
def test_secretscan_finds_auth_plain_tokens_whatever_the_login(login):
    """The base64 of authzid NUL login NUL password holds one of the password's needles at
    any alignment the login gives it."""
    lines = [
        f'{{"event":"session.exception","arg":"AUTH PLAIN {plain_token(login, PASSWORD)}"}}',
        f"blob={plain_token(login, PASSWORD, authzid=login)!r}",
        "line=" + base64.urlsafe_b64encode(f"\0{login}\0{PASSWORD}".encode()).decode(),
    ]
    for line in lines:
        found = SCANNER.scan_text(line, "sample")
        assert [f.secret for f in found] == ["conftest.PASSWORD"], line


def test_secretscan_finds_the_plain_escaped_and_login_forms():
    samples = [
        PASSWORD,
        f"password={urllib.parse.quote(PASSWORD)}",
        f"password={urllib.parse.quote_plus(PASSWORD)}",
        "AUTH LOGIN answer " + base64.b64encode(PASSWORD.encode()).decode(),
        "locals: {'password': b'" + PASSWORD + "'}",
        "md-Zx81-secret-api-key in a Mailchimp error",
        "Bearer " + "t" * 32,
    ]
    for sample in samples:
        assert SCANNER.scan_text(f"x {sample} y", "sample"), sample


def test_secretscan_leaves_clean_lines_alone():
    """The login's own base64, a wrong password's token, ordinary log lines: no finding."""
    clean = [
        plain_token("agent@kw.test", "wrong password"),
        base64.b64encode(b"agent@kw.test").decode(),
        '{"event":"auth.failed","mechanism":"PLAIN","login":"agent@kw.test","smtp_code":535}',
        '{"event":"delivery.finished","outcome":"delivered","size":1234}',
    ]
    assert SCANNER.scan_text("\n".join(clean), "sample") == []


def test_secretscan_masks_the_secret_in_its_report():
    found = SCANNER.scan_text(f"first\nsecond {plain_token('agent@kw.test', PASSWORD)}", "f")
    assert [(f.line_no, f.source) for f in found] == [(2, "f")]
    assert PASSWORD not in str(found[0]) and "«…»" in str(found[0])


def test_secretscan_reads_each_file_line_once(tmp_path):
    """A watched file is scanned from where the last scan stopped, whole lines only."""
    log = tmp_path / "serve.out"
    log.write_text("clean\n")
    assert SCANNER.scan_file(log) == []
    with log.open("a") as out:
        out.write(f"leak {PASSWORD}\npartial {PASSWORD}")
    assert [f.line_no for f in SCANNER.scan_file(log)] == [2]
    with log.open("a") as out:
        out.write(" end\n")
    assert [f.line_no for f in SCANNER.scan_file(log)] == [3]
    assert SCANNER.scan_file(log) == []


def test_secretscan_registers_a_relay_subprocess_env_and_stdin():
    secret_env = {"RELAY_ADMIN_TOKEN": "admin-token-from-an-env-0001",
                  "RELAY_UPSTREAM_URL": "smtp+starttls://u:p%40ss-from-url-0002@127.0.0.1:1",
                  "RELAY_ROUTE_MAILCHIMP_URL": "smtps://mc:route-pass-0003@127.0.0.1:1",
                  "RELAY_LISTEN": "127.0.0.1:2525-not-a-secret"}
    SCANNER.register_env(secret_env)
    assert SCANNER.scan_text("token admin-token-from-an-env-0001", "s")
    assert SCANNER.scan_text("password p@ss-from-url-0002", "s")
    assert SCANNER.scan_text("password route-pass-0003", "s")
    assert not SCANNER.scan_text("listening on 127.0.0.1:2525-not-a-secret", "s")
    assert not needles("short")  # below the minimum: too many false positives


def _secret_constants() -> dict[str, str]:
    """String constants in tests/ named like secrets (PASSWORD, SECRET, TOKEN, API key) or
    given to a secret setting (RELAY_*_TOKEN, *_SECRET, *_KEY, admin_token=...)."""
    found: dict[str, str] = {}

    def literal(node: ast.AST) -> str | None:
        try:
            value = eval(compile(ast.Expression(node), "<const>", "eval"), {"__builtins__": {}})
        except Exception:
            return None
        return value if isinstance(value, str) else None

    secretish = ("PASSWORD", "SECRET", "TOKEN", "API_KEY", "CREDENTIALS_KEY")
    for path in sorted(TESTS.rglob("*.py")):
        if path.name in ("secretscan.py", "test_secretscan.py"):  # samples, registered here
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            pairs: list[tuple[str, ast.AST]] = []
            if isinstance(node, ast.Assign):
                pairs += [(t.id, node.value) for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.keyword) and node.arg:
                pairs.append((node.arg, node.value))
            elif isinstance(node, ast.Dict):
                pairs += [(k.value, v) for k, v in zip(node.keys, node.values, strict=True)
                          if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            for name, value in pairs:
                text = literal(value)
                if (text and len(text) >= 6 and any(s in name.upper() for s in secretish)
                        and not text.startswith(("RELAY_", "/", "http", "redis://"))):
                    found[f"{path.relative_to(TESTS)}:{name}"] = text
    return found


def test_secretscan_table_lists_every_secret_constant_of_the_suite():
    """A secret added to a test without being added to STATIC_SECRETS is caught here."""
    known = set(STATIC_SECRETS.values())
    missing = {where: value for where, value in _secret_constants().items()
               if value not in known and value != PASSWORD}
    assert missing == {}


# -- the plugin fails a run (in a pytest of its own) -------------------------------------------
INNER_SECRET = "inner-run-only-secret-7Yh2"  # unknown to this run, so its own scan is quiet


def test_secretscan_fails_the_test_that_logged_a_secret_naming_it_and_the_line(pytester):
    """A nested pytest with the plugin: a structlog line with an AUTH PLAIN token, a
    capture_logs event with the plain secret and a watched log file with its AUTH LOGIN
    form each fail their test, naming it and the line; a clean test passes."""
    pytester.makeconftest(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS.parent)!r})
        pytest_plugins = ["tests.secretscan"]

        def pytest_configure():
            from tests.secretscan import register
            register({INNER_SECRET!r}, "inner secret")
    """))
    token = plain_token("agent@kw.test", INNER_SECRET)
    login_answer = base64.b64encode(INNER_SECRET.encode()).decode()
    pytester.makepyfile(test_inner=textwrap.dedent(f"""
        import structlog
        from structlog.testing import capture_logs
        from tests.secretscan import SCANNER

        def test_logs_a_token():
            structlog.configure(processors=[structlog.processors.JSONRenderer()])
            structlog.get_logger().error("session.exception", arg="AUTH PLAIN {token}")

        def test_capture_logs_event():
            with capture_logs():
                structlog.get_logger().info("auth.failed", password={INNER_SECRET!r})

        def test_a_subprocess_log(tmp_path):
            log = tmp_path / "serve.out"
            SCANNER.watch(log)
            log.write_text('{{"event":"x"}}\\n{{"arg":"{login_answer}"}}\\n')

        def test_clean():
            structlog.get_logger().info("auth.failed", login="agent@kw.test")
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=1, failed=3)
    text = result.stdout.str()
    for name in ("test_logs_a_token", "test_capture_logs_event", "test_a_subprocess_log"):
        assert f"secret scan: 1 log line(s) of test_inner.py::{name}" in text
    assert "serve.out:2: secret 'inner secret'" in text
    assert "capture_logs event:1: secret 'inner secret'" in text


# -- a reset during AUTH leaves no token in the log ----------------------------
def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a client that vanishes does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _reply(stream) -> bytes:  # type: ignore[no-untyped-def]
    line = stream.readline()
    while line[3:4] == b"-":
        line = stream.readline()
    return line


def auth_then_reset(port: int, steps: list[bytes]) -> None:
    """EHLO, then each of ``steps`` (reading the reply to all but the last), then an RST
    right after the last: the relay is still reading or checking the credentials."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    stream = sock.makefile("rb")
    assert _reply(stream).startswith(b"220")
    sock.sendall(b"EHLO reset.test\r\n")
    assert _reply(stream).startswith(b"250")
    for step in steps[:-1]:
        sock.sendall(step)
        assert _reply(stream).startswith(b"334"), step
    sock.sendall(steps[-1])
    reset(sock)


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


AUTH_RESETS = {
    "plain_initial": [b"AUTH PLAIN " + b64(f"\0agent@kw.test\0{PASSWORD}") + b"\r\n"],
    "plain_continuation": [b"AUTH PLAIN\r\n", b64(f"\0agent@kw.test\0{PASSWORD}") + b"\r\n"],
    "plain_continuation_no_eol": [b"AUTH PLAIN\r\n", b64(f"\0agent@kw.test\0{PASSWORD}")],
    "login_continuation": [b"AUTH LOGIN\r\n", b64("agent@kw.test") + b"\r\n",
                           b64(PASSWORD) + b"\r\n"],
    "login_initial": [b"AUTH LOGIN " + b64("agent@kw.test") + b"\r\n", b64(PASSWORD) + b"\r\n"],
    "login_password_no_eol": [b"AUTH LOGIN\r\n", b64("agent@kw.test") + b"\r\n", b64(PASSWORD)],
    "wrong_password": [b"AUTH PLAIN " + b64(f"\0agent@kw.test\0{PASSWORD}x") + b"\r\n"],
}


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_auth_reset_leaves_no_token_in_the_log(loop, serve: Start, tmp_path: Path,
                                                      redis_server: RedisServer,
                                                      redis_client: aioredis.Redis, accounts):
    """Resets in every AUTH PLAIN and AUTH LOGIN step, at debug level, on both loops: no log
    line (stdout or stderr) carries the password, the token or the LOGIN answer."""
    await add_user(accounts)
    relay = serve(relay_env(redis_server.url, tmp_path / "state", RELAY_EVENT_LOOP=loop,
                            RELAY_LOG_LEVEL="debug"))
    port = await relay.port()
    for _ in range(3):  # resets race the relay's reads and checks: a few of each
        for steps in AUTH_RESETS.values():
            await asyncio.to_thread(auth_then_reset, port, steps)
    count = 3 * len(AUTH_RESETS)
    await relay.wait_event("session.closed", count=count)
    assert relay.process.poll() is None
    findings = SCANNER.scan_text(relay.stdout, "serve stdout") + SCANNER.scan_text(
        relay.stderr, "serve stderr")
    assert [str(f) for f in findings] == []
