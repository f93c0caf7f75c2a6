"""``command-relay suppress …`` run as real subprocesses against the test redis-server: add,
remove and list on the global list and a user's; every refusal is one clear line and exit 1
(no traceback); import (streamed from a file or standard input, a few thousand lines with bad
ones among them, a progress bar only on a terminal) and export, read back the same."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from relay.decisions.suppression import SuppressionReason, SuppressionStore
from relay.store import keys
from tests.cli.test_commands import add_user, cli, failed, ok, ok_json
from tests.conftest import POLICIES, RedisServer
from tests.serving import clean_env

HEADER = "address,scope,reason,source,time\n"
# Each test runs several CLI processes (about 0.6 s of CPU to start each): on a busy
# two-core machine that is more than the suite's default 60 s.
pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def env(redis_server: RedisServer, tmp_path: Path) -> dict[str, str]:
    return clean_env(RELAY_REDIS_URL=redis_server.url, RELAY_POLICIES_DIR=str(POLICIES),
                     RELAY_STATE_DIR=str(tmp_path / "state"))


async def test_suppress_add_and_list(env, redis_client: aioredis.Redis) -> None:
    """add puts an address on the global list (no --user, or --user '*') or a user's (id or
    email), A-Z lower-cased; the same address again replaces its entry; list shows every list
    (global first) or one, as a table or JSON."""
    user = await add_user(env)
    assert ok(await cli(["suppress", "add", "Gone@Example.test", "--reason", "bounce"],
                        env)) == "gone@example.test suppressed on the global list (bounce)\n"
    assert ok(await cli(["suppress", "add", "left@example.test", "--user", "agent@kw.test",
                         "--reason", "unsubscribe"], env)) == \
        f"left@example.test suppressed on the list of user {user['id']} (unsubscribe)\n"
    assert ok(await cli(["suppress", "add", "gone@example.test", "--user", "*", "--reason",
                         "complaint"], env)) == \
        "gone@example.test suppressed on the global list (complaint), replacing its entry\n"
    entry = await SuppressionStore(redis_client).get("gone@example.test", user_id=None)
    assert entry is not None
    assert (entry.reason, entry.source) == (SuppressionReason.COMPLAINT, "cli")

    listed = ok_json(await cli(["suppress", "list", "--json"], env))
    assert [(e["scope"], e["address"], e["reason"], e["source"]) for e in listed] == [
        ("*", "gone@example.test", "complaint", "cli"),
        (user["id"], "left@example.test", "unsubscribe", "cli")]
    assert all(e["time"].endswith("+00:00") for e in listed)
    table = ok(await cli(["suppress", "list"], env)).splitlines()
    assert table[0].split() == ["SCOPE", "ADDRESS", "REASON", "SOURCE", "TIME"]
    assert [row.split()[:4] for row in table[1:]] == [
        ["*", "gone@example.test", "complaint", "cli"],
        [user["id"], "left@example.test", "unsubscribe", "cli"]]
    mine = ok_json(await cli(["suppress", "list", "--user", user["id"], "--json"], env))
    assert [e["address"] for e in mine] == ["left@example.test"]
    glob = ok_json(await cli(["suppress", "list", "--user", "*", "--json"], env))
    assert [e["address"] for e in glob] == ["gone@example.test"]


async def test_suppress_remove_takes_an_address_off_one_list(
        env, redis_client: aioredis.Redis) -> None:
    """remove --user takes the address off that user's list only (the global entry of the
    same address stays); removing it again is refused, naming the list."""
    user = await add_user(env)
    store = SuppressionStore(redis_client)
    await store.add("left@example.test", user_id=user["id"],
                    reason=SuppressionReason.UNSUBSCRIBE, source="one-click")
    await store.add("left@example.test", user_id=None, reason=SuppressionReason.MANUAL,
                    source="cli")
    assert ok(await cli(["suppress", "remove", "LEFT@example.test", "--user", "agent@kw.test"],
                        env)) == \
        f"left@example.test removed from the list of user {user['id']} (was unsubscribe)\n"
    assert await redis_client.hlen(keys.suppressions(user["id"])) == 0
    assert await redis_client.hexists(keys.global_suppressions(), "left@example.test")
    stderr = failed(await cli(["suppress", "remove", "left@example.test", "--user",
                               user["id"]], env))
    assert f"'left@example.test' is not on the list of user {user['id']}" in stderr


@pytest.mark.parametrize(("args", "error"), [
    (["add", "a@x.test", "--user", "nobody@kw.test", "--reason", "bounce"],
     "no user 'nobody@kw.test'"),
    (["add", "a@x.test", "--user", "u-0000000000", "--reason", "bounce"],
     "no user 'u-0000000000'"),
    (["add", "not-an-address", "--reason", "bounce"], "not an email address: 'not-an-address'"),
    (["add", "a@x.test", "--reason", "spam"],
     "unknown reason 'spam'; reasons: unsubscribe, complaint, bounce, manual"),
    (["remove", "a@x.test", "--user", "nobody"], "no user 'nobody'"),
    (["remove", "a@x.test"], "'a@x.test' is not on the global list"),
    (["list", "--user", "nobody@kw.test"], "no user 'nobody@kw.test'"),
    (["export", "--user", "nobody@kw.test"], "no user 'nobody@kw.test'"),
    (["import", "/nonexistent/list.csv"], "cannot read /nonexistent/list.csv: No such file"),
])
async def test_suppress_refusals_are_one_clear_line(env, redis_client, args, error) -> None:
    """An unknown user, a bad address or reason, an entry that is not there or a file that
    cannot be read: `command-relay: error: …` naming it, exit 1, no traceback, nothing
    written."""
    result = await cli(["suppress", *args], env)
    stderr = failed(result)
    assert stderr.startswith(f"command-relay: error: {error}") and stderr.count("\n") == 1
    assert result.stdout == ""
    assert await redis_client.keys("relay:supp*") == []


async def test_suppress_add_without_reason_is_a_usage_error(env) -> None:
    """--reason is required: exit 2 with argparse's usage line."""
    stderr = failed(await cli(["suppress", "add", "a@x.test"], env), code=2)
    assert "the following arguments are required: --reason" in stderr


def _big_file(path: Path, user_id: str, lines: int) -> dict[int, str]:
    """A CSV file of ``lines`` entries, every 101st line broken; the bad line numbers with
    the error each must get (the header is line 1)."""
    bad: dict[int, str] = {}
    with path.open("w") as out:
        out.write(HEADER)
        for n in range(lines):
            number = n + 2
            if n % 101 == 100:
                kind = len(bad) % 3
                out.write(["oops,*,bounce,,\n", f"x{n}@x.test,ghost,bounce,,\n",
                           f"x{n}@x.test,*,bounced,,\n"][kind])
                bad[number] = ["not an email address: 'oops'", "scope: no user 'ghost'",
                               "unknown reason 'bounced'; reasons: unsubscribe, complaint, "
                               "bounce, manual"][kind]
            else:
                scope = user_id if n % 3 == 0 else "*"
                out.write(f"r{n}@x.test,{scope},unsubscribe,crm,2026-10-01T08:00:00Z\n")
    return bad


async def test_suppress_import_of_thousands_of_lines_lists_the_bad_ones(
        env, redis_client, tmp_path) -> None:
    """A 5,000-line import adds every good line and lists every bad one with its number and
    the reason, then exits 1 (lines were refused); a second run is idempotent (everything
    replaced, the same list); --json prints the summary as one document."""
    user = await add_user(env)
    path = tmp_path / "big.csv"
    bad = _big_file(path, user["id"], 5000)
    result = await cli(["suppress", "import", str(path)], env)
    stderr = failed(result)
    good = 5000 - len(bad)
    assert stderr == f"command-relay: error: {len(bad)} line(s) refused (see the summary); " \
        "the other lines were imported\n"
    lines = result.stdout.splitlines()
    assert lines[0] == f"imported {path}: {good:,} added, 0 replaced, {len(bad)} refused"
    assert lines[1:] == [f"  line {n}: {bad[n]}" for n in sorted(bad)]
    stored = (await redis_client.hlen(keys.global_suppressions())
              + await redis_client.hlen(keys.suppressions(user["id"])))
    assert stored == good
    before = ok_json(await cli(["suppress", "list", "--json"], env))
    assert len(before) == good

    again = await cli(["suppress", "import", str(path), "--json"], env)
    failed(again)
    summary = json.loads(again.stdout)
    assert (summary["added"], summary["replaced"], summary["refused"]) == \
        (0, good, len(bad))
    assert [r["line"] for r in summary["refusals"]] == sorted(bad)
    assert ok_json(await cli(["suppress", "list", "--json"], env)) == before


async def test_suppress_export_then_import_gives_the_same_list(
        env, redis_client, tmp_path) -> None:
    """export writes the header and every list as CSV on stdout; imported (here from standard
    input) into an emptied store it gives the same list and the same export; export --user
    writes one list; an import with nothing refused exits 0 and says so."""
    one = await add_user(env, "one@kw.test")
    await add_user(env, "two@kw.test")
    for args in (["a@x.test", "--reason", "bounce"],
                 ["b@x.test", "--user", "one@kw.test", "--reason", "unsubscribe"],
                 ["c@x.test", "--user", "two@kw.test", "--reason", "complaint"],
                 ["d@x.test", "--user", "two@kw.test", "--reason", "manual"]):
        ok(await cli(["suppress", "add", *args], env))
    exported = ok(await cli(["suppress", "export"], env))
    assert exported.startswith(HEADER) and exported.count("\n") == 5
    listed = ok_json(await cli(["suppress", "list", "--json"], env))

    for key in await redis_client.keys("relay:supp*"):
        await redis_client.delete(key)
    assert ok(await cli(["suppress", "import", "-"], env, stdin=exported)) == \
        "imported standard input: 4 added, 0 replaced, 0 refused\n"
    assert ok_json(await cli(["suppress", "list", "--json"], env)) == listed
    assert ok(await cli(["suppress", "export"], env)) == exported
    only = ok(await cli(["suppress", "export", "--user", "one@kw.test"], env))
    assert only.splitlines() == [HEADER.strip(), next(
        line for line in exported.splitlines() if line.startswith(f"b@x.test,{one['id']},"))]


async def test_suppress_import_without_header_writes_nothing(env, redis_client, tmp_path):
    """A file that does not open with the header row is refused whole."""
    path = tmp_path / "plain.csv"
    path.write_text("a@x.test,*,bounce,,\n")
    stderr = failed(await cli(["suppress", "import", str(path)], env))
    assert "line 1 is not a header row address,scope,reason,source,time" in stderr
    assert await redis_client.keys("relay:supp*") == []


async def test_suppress_import_refuses_an_endless_line_and_goes_on(env, redis_client, tmp_path):
    """A line of 20 MB (a binary file, a missing line end) is refused by number without
    stopping the import, and the lines after it are imported."""
    path = tmp_path / "odd.csv"
    with path.open("wb") as out:
        out.write(HEADER.encode() + b"z" * 20_000_000 + b"\nlast@x.test,*,bounce,,\n")
    result = await cli(["suppress", "import", str(path)], env)
    failed(result)
    assert result.stdout.splitlines()[1:] == ["  line 2: line longer than 4096 bytes"]
    assert await redis_client.hkeys(keys.global_suppressions()) == ["last@x.test"]


def _run_with_terminal_stderr(args: list[str], env: dict[str, str],
                              columns: int) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal of ``columns`` (0: never sized, as under
    `script`): its exit status, stdout and what it wrote on the terminal."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24 if columns else 0, columns,
                                                       0, 0))
    seen = bytearray()

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer has closed it
                return
            if not data:
                return
            seen.extend(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        process = subprocess.run([sys.executable, "-m", "relay", *args], env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=slave, text=True, timeout=60)
    finally:
        os.close(slave)
        reader.join(timeout=30)
        os.close(master)
    return process.returncode, process.stdout, seen.decode(errors="replace")


async def test_suppress_import_shows_a_progress_bar_only_on_a_terminal(env, tmp_path):
    """On a terminal, import draws a tqdm bar on stderr that ends at 100 % of the file's
    size (on one that gives no size too); the summary stays on stdout. With stderr not a
    terminal (a script, a log) stderr gets no bar at all."""
    path = tmp_path / "list.csv"
    path.write_text(HEADER + "".join(f"p{n}@x.test,*,bounce,,\n" for n in range(3000)))
    for columns, added in ((100, 3000), (0, 0)):
        status, stdout, terminal = await asyncio.to_thread(
            _run_with_terminal_stderr, ["suppress", "import", str(path)], env, columns)
        assert (status, stdout) == (0, f"imported {path}: {added:,} added, "
                                       f"{3000 - added:,} replaced, 0 refused\n")
        last = terminal.replace("\r", "\n").strip().splitlines()[-1]
        # All of the file read: "importing: 100%|███…| 69.3k/69.3k [00:00<00:00, 442kB/s]".
        assert re.match(r"importing: 100%\|.+\| ([0-9.]+k)/\1 \[", last), terminal
        assert "Traceback" not in terminal

    plain = await cli(["suppress", "import", str(path)], env)
    assert ok(plain) == f"imported {path}: 0 added, 3,000 replaced, 0 refused\n"
    assert plain.stderr == ""
