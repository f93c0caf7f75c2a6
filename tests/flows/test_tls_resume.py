"""TLS session resumption across ``serve --workers 2``: the workers share the supervisor's
ticket key, so a returning client resumes whichever worker takes its connection; and that
key never reaches a log line.

With per-worker keys (OpenSSL's default) a ticket resumes only on the worker that issued it:
every connection taken by the other worker than the previous one would not resume, and the
test requires some of those."""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import ssl
from pathlib import Path

import pytest

from relay.smtp.tickets import KEY_BYTES, TICKET_KEY_VAR
from tests.conftest import RedisServer
from tests.secretscan import SCANNER, register
from tests.serving import ServeProcess, Start, no_traceback, relay_env

LOOPS = ["uvloop", "asyncio"]
MIN_CONNECTIONS = 40
MAX_CONNECTIONS = 200  # until at least one returning connection changed worker
_LAST_LINE = re.compile(rb"(?:^|\r\n)\d{3} [^\r\n]*\r\n$")


def _reply(sock: socket.socket | ssl.SSLSocket) -> bytes:
    data = b""
    while not _LAST_LINE.search(data):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the dev certificate; the session is what matters
    return context


def starttls_session(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None
                     ) -> tuple[bool, ssl.SSLSession | None, str]:
    """One connection: EHLO, STARTTLS offering ``session``, EHLO again, QUIT. Whether it
    resumed, the session to offer next time, the TLS version."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        assert _reply(raw).startswith(b"220")
        raw.sendall(b"EHLO client.test\r\n")
        assert b"STARTTLS" in _reply(raw)
        raw.sendall(b"STARTTLS\r\n")
        assert _reply(raw).startswith(b"220")
        with context.wrap_socket(raw, session=session) as tls:
            tls.sendall(b"EHLO client.test\r\n")
            _reply(tls)  # TLS 1.3: the ticket came before this reply
            tls.sendall(b"QUIT\r\n")
            _reply(tls)
            return bool(tls.session_reused), tls.session, str(tls.version())


def _worker_key(pid: int) -> str:
    """The ticket key a worker was started with, from its initial environment."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    [value] = [v.split(b"=", 1)[1] for v in environ if v.startswith(TICKET_KEY_VAR.encode())]
    return value.decode()


async def _resume_many(relay: ServeProcess, port: int) -> list[tuple[int, bool]]:
    """(worker, resumed) of each connection after the first, in order."""
    context = client_context()
    reused, session, version = await asyncio.to_thread(starttls_session, port, context, None)
    assert not reused and version == "TLSv1.3"
    await relay.wait_event("session.starttls", count=1)
    seen: list[tuple[int, bool]] = []
    for number in range(2, MAX_CONNECTIONS + 1):
        reused, session, _ = await asyncio.to_thread(starttls_session, port, context, session)
        # Connections are one after another: the number-th STARTTLS line is this one's.
        lines = await relay.wait_event("session.starttls", count=number)
        seen.append((lines[number - 1]["worker"], reused))
        workers = [w for w, _ in seen]
        changed = any(a != b for a, b in itertools.pairwise(workers))
        if number >= MIN_CONNECTIONS and changed:
            break
    return seen


@pytest.mark.parametrize("loop", LOOPS)
async def test_returning_clients_resume_on_either_worker(
        loop: str, serve: Start, redis_server: RedisServer, tmp_path: Path) -> None:
    relay = serve(relay_env(redis_server.url, tmp_path / "state", RELAY_EVENT_LOOP=loop,
                            RELAY_ALLOW_PLAINTEXT_AUTH="0"), "--workers", "2")
    ready = await relay.wait_event("worker.ready", count=2)
    [started] = relay.events("supervisor.started")
    port = int(started["listen"]["listen"].rpartition(":")[2])
    keys = {_worker_key(r["pid"]) for r in ready}
    assert len(keys) == 1 and len(bytes.fromhex(next(iter(keys)))) == KEY_BYTES
    register(next(iter(keys)), "the workers' TLS ticket key")
    assert len(relay.events("tls.tickets_shared")) == 2
    assert relay.events("tls.tickets_unshared") == []

    seen = await _resume_many(relay, port)
    workers = [w for w, _ in seen]
    assert set(workers) == {1, 2}
    crossed = sum(a != b for a, b in itertools.pairwise(workers))
    assert crossed >= 1, "every connection went to one worker: nothing was tested"
    assert [r for _, r in seen] == [True] * len(seen)
    no_traceback(relay)
    # The key, in any encoding the scanner knows, in none of the relay's output.
    findings = SCANNER.scan_text(relay.stdout, "serve stdout") + SCANNER.scan_text(
        relay.stderr, "serve stderr")
    assert [str(f) for f in findings] == []
    assert next(iter(keys)) not in relay.stdout + relay.stderr
