"""relay.logs: the libraries' own loggers go through the relay's structlog pipeline (one JSON
object per line, whoever writes it), and admin commands print their warnings as one
readable line on a terminal."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pty
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import structlog

from relay.observe.logs import configure_logging
from tests.conftest import POLICIES, RedisServer, wait_for
from tests.serving import Start, clean_env, relay_env

SECRET = "hunter2-in-a-local"


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a JSON object: fails on any line that is not one."""
    records = []
    for line in text.splitlines():
        assert line.startswith("{"), f"not a JSON line: {line!r}"
        records.append(json.loads(line))
    return records


def test_logs_library_records_are_json_lines_with_level_and_time(tmp_path: Path) -> None:
    """aiohttp's, asyncio's and redis-py's records become JSON lines with level, timestamp
    and logger; a traceback is rendered as frames without locals; aiosmtpd's command log
    (recipients, AUTH lines) stays off, its errors do not."""
    path = tmp_path / "log.jsonl"
    with path.open("w", encoding="utf-8") as out:
        configure_logging("json", "info", cache=False, stream=out)
        structlog.get_logger().warning("relay.own_line", note="ours")
        try:
            password = SECRET  # a local: must never reach the log
            raise RuntimeError(f"boom {len(password)}")
        except RuntimeError:
            logging.getLogger("aiohttp.server").exception("Error handling request from %s",
                                                          "127.0.0.1")
        logging.getLogger("asyncio").error("Task exception was never retrieved")
        logging.getLogger("redis.asyncio.client").warning("connection reset")
        logging.getLogger("mail.log").info("AUTH PLAIN AGFnZW50AHNlY3JldA==")
        logging.getLogger("mail.log").error("mail.log error")
        logging.getLogger("aiohttp.access").info("per-request chatter below warning")
    configure_logging("json", "debug", cache=False)
    text = path.read_text(encoding="utf-8")
    records = json_lines(text)
    assert [(r.get("logger"), r["event"], r["level"]) for r in records] == [
        (None, "relay.own_line", "warning"),
        ("aiohttp.server", "Error handling request from 127.0.0.1", "error"),
        ("asyncio", "Task exception was never retrieved", "error"),
        ("redis.asyncio.client", "connection reset", "warning"),
        ("mail.log", "mail.log error", "error"),
    ]
    assert all(r["timestamp"].endswith("Z") for r in records)
    [exception] = records[1]["exception"]
    assert exception["exc_type"] == "RuntimeError"
    assert all("locals" not in frame for frame in exception["frames"])
    assert SECRET not in text and "AGFnZW50" not in text


def test_logs_console_and_line_formats_route_library_records_too(tmp_path: Path) -> None:
    """On a terminal (console) and for admin commands (line) the libraries' records are
    rendered by the same renderer as the relay's own, never as bare ``ERROR:name:`` text."""
    for fmt in ("console", "line"):
        path = tmp_path / f"{fmt}.log"
        with path.open("w", encoding="utf-8") as out:
            configure_logging(fmt, "warning", cache=False, stream=out)
            logging.getLogger("aiohttp.server").error("Error handling request")
        text = path.read_text(encoding="utf-8")
        assert "Error handling request" in text
        assert "ERROR:aiohttp" not in text
        if fmt == "line":
            assert text == "command-relay: error: Error handling request " \
                           "(logger=aiohttp.server)\n"
    configure_logging("json", "debug", cache=False)


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_logs_malformed_http_to_a_serve_process_is_one_json_warning(
        serve: Start, redis_server: RedisServer, tmp_path: Path, event_loop: str) -> None:
    """A malformed HTTP request to serve's metrics listener (aiohttp logs it on
    aiohttp.server) is one JSON line on stdout, a warning without a traceback (a client's
    mistake); nothing reaches stderr as plain text."""
    relay = serve(relay_env(redis_server.url, tmp_path / "state",
                            RELAY_EVENT_LOOP=event_loop))
    listening = await relay.wait_event("metrics.listening")
    host, _, port = listening[0]["listen"].rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nno colon in this header\r\n\r\n")
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status.split()[1] == b"400", status
    await wait_for(lambda: [r for r in relay.records() if r.get("logger") == "aiohttp.server"],
                   20)
    [record] = [r for r in relay.records() if r.get("logger") == "aiohttp.server"]
    assert record["event"] == "Error handling request from 127.0.0.1: 400 BadHttpMessage: " \
                              "Invalid header token:"
    assert record["level"] == "warning" and record["timestamp"]
    assert "exception" not in record
    json_lines(relay.stdout)
    assert "aiohttp" not in relay.stderr


def _in_a_terminal(args: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run ``python -m relay ARGS`` with stdin, stdout and stderr on a pseudo-terminal, as an
    operator would; everything it printed there."""
    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "relay", *args], env=env, cwd=cwd,
                               stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                raise AssertionError("no output on the terminal for 30 s")
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        assert process.wait(30) == 0, b"".join(chunks)
        os.close(master)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_cli_admin_warnings_are_one_readable_line_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal an admin command's warning (the embedded Redis it starts) is one line,
    ``command-relay: warning: dev.embedded_redis: …``, not JSON in the middle of its table;
    with --json it is a JSON line, for a script to parse."""
    state = Path(tempfile.mkdtemp(prefix="cr-", dir="/tmp"))
    try:
        env = clean_env(metrics_ports=False)
        env.update(RELAY_STATE_DIR=str(state), RELAY_POLICIES_DIR=str(POLICIES),
                   TERM="dumb")
        shown = _in_a_terminal(["users", "list"], env, tmp_path).splitlines()
        warnings = [line for line in shown if "dev.embedded_redis" in line]
        assert warnings == [
            "command-relay: warning: dev.embedded_redis: development default: set "
            f"RELAY_REDIS_URL in production (url=unix://{state}/redis/redis.sock, "
            f"directory={state}/redis)"], shown
        assert not any(line.startswith("{") for line in shown)
        assert any(line.startswith("ID ") for line in shown)

        shown = _in_a_terminal(["users", "list", "--json"], env, tmp_path).splitlines()
        machine = [json.loads(line) for line in shown if line.startswith("{")]
        assert [r["event"] for r in machine] == ["dev.embedded_redis"]
        assert "[]" in shown
    finally:
        shutil.rmtree(state, ignore_errors=True)
