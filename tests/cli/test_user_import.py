"""``command-relay users import``, run as a real subprocess against the test redis-server:
a CSV file with bad lines among good ones, JSON lines on standard input, ``--json``,
``--dry-run``, the exit status an operator's script reads, and the progress bar, shown on a
terminal (a pseudo-terminal here) and only there."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from relay.identity.accounts import AccountStore
from relay.store import keys
from tests.cli.test_commands import cli, failed, ok, ok_json
from tests.conftest import POLICIES, RedisServer
from tests.serving import clean_env

HEADER = "email,id,plan,limit,tz,senders,status"


@pytest.fixture
def env(redis_server: RedisServer, tmp_path: Path) -> dict[str, str]:
    return clean_env(RELAY_REDIS_URL=redis_server.url, RELAY_POLICIES_DIR=str(POLICIES),
                     RELAY_STATE_DIR=str(tmp_path / "state"))


def agents(count: int, plan: str = "plus") -> list[str]:
    return [f"agent{n:05d}@kw.test,u-{n:05d},{plan},,America/Chicago,"
            f"team{n:05d}@kw.test;site{n:05d}@kw.test,active" for n in range(count)]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_users_import_csv_refuses_bad_lines_by_number_and_exits_1(
        env, tmp_path, redis_client: aioredis.Redis):
    """2,000 users and three bad lines: the bad ones are named (line number, reason) as the
    import goes, the others imported; the summary counts them; exit status 1 with the
    error line. The same file again: every good line unchanged."""
    lines = [HEADER, *agents(2000)]
    lines.insert(50, "no-at-sign,u-bad1,plus,,,,")
    lines.insert(700, "x@kw.test,u-bad2,platinum,,,,")
    lines.insert(1500, "agent00003@kw.test,u-bad3,plus,,,,")
    path = write(tmp_path / "agents.csv", lines)
    result = await cli(["users", "import", str(path)], env)
    stderr = failed(result)
    assert stderr.strip() == ("command-relay: error: 3 of 2,003 lines refused, the others "
                              "imported")
    out = result.stdout.splitlines()
    assert out[:3] == [
        "line 51: refused: not an email address: 'no-at-sign'",
        "line 701: refused: unknown plan 'platinum'; plans: free, plus, pro, team",
        "line 1501: refused: address agent00003@kw.test already belongs to user u-00003"]
    assert out[3].startswith("2,003 lines: 2,000 created, 0 updated, 0 unchanged, 3 refused (")
    assert await redis_client.scard(keys.users_index()) == 2000
    user = await AccountStore(redis_client).find_user("site01999@kw.test")
    assert user is not None and (user.id, user.plan, user.tz) == \
        ("u-01999", "plus", "America/Chicago")

    again = await cli(["users", "import", str(path)], env)
    failed(again)
    assert again.stdout.splitlines()[3].startswith(
        "2,003 lines: 0 created, 0 updated, 2,000 unchanged, 3 refused (")

    good = write(tmp_path / "good.csv", [HEADER, *agents(2000)])
    assert ok(await cli(["users", "import", str(good)], env)).startswith(
        "2,000 lines: 0 created, 0 updated, 2,000 unchanged, 0 refused (")


async def test_users_import_json_lines_from_stdin_with_a_json_summary(
        env, redis_client: aioredis.Redis):
    """``-`` reads standard input, JSON lines found by their first line; ``--json`` prints
    one document (refusals included), and exit status 1 still says a line was refused."""
    stdin = "\n".join([
        json.dumps({"email": "one@kw.test", "id": "u-1", "plan": "pro",
                    "senders": ["one.team@kw.test"]}),
        json.dumps({"email": "two@kw.test", "limit": 12345, "tz": "Europe/Paris"}),
        json.dumps({"email": "three@kw.test", "colour": "blue"}),
    ]) + "\n"
    result = await cli(["users", "import", "-", "--json", "--changes"], env, stdin=stdin)
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["format"] == "jsonl" and not summary["dry_run"]
    assert (summary["created"], summary["refused"]) == (2, 1)
    assert summary["refusals"] == [{"line": 3, "reason": "unknown field 'colour'; fields: "
                                    "email, id, plan, limit, tz, senders, status"}]
    assert [(c["line"], c["action"], c["email"]) for c in summary["changes"]] == \
        [(1, "created", "one@kw.test"), (2, "created", "two@kw.test")]
    two = await AccountStore(redis_client).find_user("two@kw.test")
    assert two is not None and (two.custom_limit, two.tz) == (12345, "Europe/Paris")


async def test_users_import_dry_run_writes_nothing(env, tmp_path,
                                                   redis_client: aioredis.Redis):
    """``--dry-run`` checks and reports (``--changes``: each user it would create or
    update), and Redis holds no key more afterwards; then the real import and an update."""
    path = write(tmp_path / "agents.csv", [HEADER, *agents(3)])
    dry = ok(await cli(["users", "import", str(path), "--dry-run", "--changes"], env))
    assert dry.splitlines() == [
        "line 2: would create u-00000 agent00000@kw.test",
        "line 3: would create u-00001 agent00001@kw.test",
        "line 4: would create u-00002 agent00002@kw.test",
        dry.splitlines()[3]]
    assert dry.splitlines()[3].startswith("dry run, nothing written: 3 lines: 3 to create, ")
    assert await redis_client.dbsize() == 0
    ok(await cli(["users", "import", str(path)], env))
    update = write(tmp_path / "update.csv", [HEADER, *agents(3, plan="team")])
    changed = ok(await cli(["users", "import", str(update), "--changes", "--by", "billing"],
                           env))
    assert changed.splitlines()[0] == "line 2: updated u-00000 agent00000@kw.test: plan (upgrade)"
    history = ok_json(await cli(["plan", "history", "u-00000", "--json"], env))
    assert [(h["by"], h["new_plan"]) for h in history] == [("billing", "team")]


async def test_users_import_format_option_and_unreadable_file(env, tmp_path):
    """``--format`` overrides the extension; a file that cannot be read is an error."""
    path = tmp_path / "agents.txt"
    path.write_text(json.dumps({"email": "j@kw.test"}) + "\n")
    summary = ok_json(await cli(["users", "import", str(path), "--format", "jsonl",
                                 "--json"], env))
    assert (summary["format"], summary["created"]) == ("jsonl", 1)
    stderr = failed(await cli(["users", "import", str(tmp_path / "missing.csv")], env))
    assert "cannot read" in stderr and "missing.csv" in stderr
    assert failed(await cli(["users", "import", str(path), "--format", "xml"], env), 2)


def _on_a_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``command-relay ARGV`` with standard error on a pseudo-terminal 100 columns
    wide; its exit status, standard output and what the terminal showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    shown = bytearray()

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                return
            if not data:
                return
            shown.extend(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "relay", *argv], env=env,
                              stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                              timeout=60, check=False)
    finally:
        os.close(slave)
    reader.join(10)
    os.close(master)
    return proc.returncode, proc.stdout.decode(), shown.decode(errors="replace")


async def test_users_import_progress_bar_with_rate_and_eta_on_a_terminal_only(
        env, tmp_path, redis_client: aioredis.Redis):
    """On a terminal the import shows a bar with the count, the rate (users/s) and the time
    left; when standard error is a pipe, no bar at all (scripts read clean output)."""
    path = write(tmp_path / "agents.csv", [HEADER, *agents(1500)])
    status, out, shown = await asyncio.to_thread(
        _on_a_terminal, ["users", "import", str(path)], env)
    assert status == 0, (out, shown)
    # tqdm's "[elapsed<remaining, rate]": the time left (ETA) and the rate.
    assert re.search(r"100%\|.*\| 1500/1500 \[\d\d:\d\d<\d\d:\d\d, [\d.]+ users/s\]",
                     shown), shown
    assert "Traceback" not in shown
    assert out.startswith("1,500 lines: 1,500 created")

    piped = await cli(["users", "import", str(path)], env)
    assert ok(piped).startswith("1,500 lines: 0 created, 0 updated, 1,500 unchanged")
    assert piped.stderr == ""
