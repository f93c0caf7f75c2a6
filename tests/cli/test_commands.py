"""``command-relay`` admin commands, run as real subprocesses against the test redis-server.

Each test builds the environment explicitly (no inherited ``RELAY_*`` variable) and checks
what an operator's script relies on: exit status 0/1/2, one JSON document with ``--json``,
``command-relay: error: …`` on stderr, and never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import redis
import redis.asyncio as aioredis
from cryptography.fernet import Fernet

from relay.config.endpoints import UpstreamTarget
from relay.config.policies import load_policies
from relay.config.zones import zone
from relay.decisions.months import SystemClock, period_at
from relay.decisions.quota import QuotaStore, ReserveStatus
from relay.events.stream import Event, EventLog, format_event, new_event
from relay.identity.accounts import AccountStore
from relay.identity.passwords import verify_password
from relay.smtp.tls import server_context
from relay.store import keys
from relay.store.client import connect_redis
from tests.conftest import (
    PASSWORD,
    POLICIES,
    CapturingUpstream,
    RedisServer,
    RelayFactory,
    UpstreamBehaviour,
    free_port,
    smtp_client,
)
from tests.serving import clean_env

CLI_PASSWORD = "s3cret pass phrase"
APP_PASSWORD = "an app secret of 30 characters"


@pytest.fixture
def env(redis_server: RedisServer, tmp_path: Path) -> dict[str, str]:
    return clean_env(RELAY_REDIS_URL=redis_server.url, RELAY_POLICIES_DIR=str(POLICIES),
                     RELAY_STATE_DIR=str(tmp_path / "state"))


def run_cli(args: list[str], env: dict[str, str], *, stdin: str = "",
            cwd: Path | None = None, timeout: float = 40) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


async def cli(args: list[str], env: dict[str, str], *, stdin: str = "",
              cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """run_cli in a thread, so the test's event loop stays free."""
    return await asyncio.to_thread(run_cli, args, env, stdin=stdin, cwd=cwd)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    """The command succeeded and its stdout is exactly one JSON document."""
    return json.loads(ok(result))


def failed(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout
    if code == 1:
        assert "command-relay: error:" in result.stderr
    return result.stderr


async def add_user(env: dict[str, str], email: str = "agent@kw.test",
                   *extra: str) -> dict[str, Any]:
    view: dict[str, Any] = ok_json(await cli(["users", "add", email, "--password-stdin",
                                              *extra], env, stdin=CLI_PASSWORD + "\n"))
    return view


# -- users -----------------------------------------------------------------------------------
async def test_users_add_prints_the_new_user_as_json(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """users add with every option prints the user as JSON and stores the password hash."""
    view = await add_user(env, "Agent@KW.test", "--plan", "plus", "--limit", "1234",
                          "--tz", "America/Chicago", "--sender", "other@x.test")
    assert view["email"] == "agent@kw.test"
    assert view["plan"] == "plus"
    assert view["custom_limit"] == 1234
    assert view["limit"] == 1234
    assert view["tz"] == "America/Chicago"
    assert view["status"] == "active"
    assert view["senders"] == ["agent@kw.test", "other@x.test"]
    assert view["id"].startswith("u-")
    assert "password" not in json.dumps(view)

    user = await AccountStore(redis_client).find_user("other@x.test")
    assert user is not None and user.id == view["id"]
    stored = await redis_client.hget(keys.user(view["id"]), "password")
    assert stored is not None
    assert await asyncio.to_thread(verify_password, CLI_PASSWORD.encode(), str(stored))


async def test_users_add_defaults_to_the_default_plan(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """Without --plan, --limit or --tz a user gets the [defaults] plan, its limit and UTC."""
    policies = load_policies(POLICIES)
    view = await add_user(env)
    assert view["plan"] == policies.default_plan
    assert view["custom_limit"] is None
    assert view["limit"] == policies.plans[policies.default_plan].monthly_limit
    assert view["tz"] == "UTC"


async def test_users_add_accepts_an_explicit_id(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """--id names the user; show finds them under it."""
    view = await add_user(env, "agent@kw.test", "--id", "agent-42")
    assert view["id"] == "agent-42"
    shown = ok_json(await cli(["users", "show", "agent-42", "--json"], env))
    assert shown["email"] == "agent@kw.test"


async def test_users_list_shows_users_as_table_and_json(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """users list prints a table with a header and, with --json, one JSON array."""
    assert ok_json(await cli(["users", "list", "--json"], env)) == []
    first = await add_user(env, "agent@kw.test", "--plan", "pro")
    second = await add_user(env, "boss@kw.test", "--limit", "77", "--tz", "Europe/Paris")

    listed = ok_json(await cli(["users", "list", "--json"], env))
    assert sorted(u["id"] for u in listed) == sorted([first["id"], second["id"]])
    by_email = {u["email"]: u for u in listed}
    assert by_email["agent@kw.test"]["limit"] == 25000
    assert by_email["boss@kw.test"]["limit"] == 77

    table = ok(await cli(["users", "list"], env)).splitlines()
    assert table[0].split() == ["ID", "EMAIL", "PLAN", "LIMIT", "TZ", "STATUS"]
    rows = {line.split()[1]: line.split() for line in table[1:]}
    assert rows["agent@kw.test"] == [first["id"], "agent@kw.test", "pro", "25000", "UTC",
                                     "active"]
    assert rows["boss@kw.test"] == [second["id"], "boss@kw.test", "free", "77",
                                    "Europe/Paris", "active"]


async def test_users_show_finds_a_user_by_id_and_by_email(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """users show accepts the id, the email or another owned address (any case)."""
    view = await add_user(env, "agent@kw.test", "--sender", "other@x.test")
    for ref in (view["id"], "agent@kw.test", "AGENT@kw.test", "other@x.test"):
        assert ok_json(await cli(["users", "show", ref, "--json"], env)) == view
    text = ok(await cli(["users", "show", "agent@kw.test"], env))
    assert f"id:           {view['id']}" in text.splitlines()
    assert "senders:      agent@kw.test, other@x.test" in text.splitlines()


async def test_users_show_rejects_an_unknown_user(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """users show of nobody exits 1 naming the reference."""
    for ref in ("nobody@kw.test", "u-0000000000", "bad id!"):
        stderr = failed(await cli(["users", "show", ref, "--json"], env))
        assert f"no user {ref!r}" in stderr


async def test_users_disable_and_enable_change_the_status(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """users disable makes show say disabled; users enable makes it active again."""
    view = await add_user(env)
    assert ok(await cli(["users", "disable", "agent@kw.test"], env)).strip() == \
        f"user {view['id']} disabled"
    assert ok_json(await cli(["users", "show", view["id"], "--json"], env))["status"] == \
        "disabled"
    assert "status:       disabled" in ok(await cli(["users", "show", view["id"]], env))
    assert (await AccountStore(redis_client).find_user("agent@kw.test")) is not None

    assert ok(await cli(["users", "enable", view["id"]], env)).strip() == \
        f"user {view['id']} enabled"
    assert ok_json(await cli(["users", "show", "agent@kw.test", "--json"], env))["status"] == \
        "active"
    failed(await cli(["users", "disable", "nobody@kw.test"], env))


@pytest.mark.parametrize(("email", "senders"), [
    ("agent@kw.test", []),
    ("AGENT@kw.test", []),
    ("new@kw.test", ["other@x.test"]),
    ("other@x.test", []),
])
async def test_users_add_refuses_an_address_already_taken(
        env: dict[str, str], redis_client: aioredis.Redis, email: str,
        senders: list[str]) -> None:
    """An email or sender another user owns exits 1, and the refused user leaves nothing."""
    await add_user(env, "agent@kw.test", "--sender", "other@x.test")
    extra = [arg for s in senders for arg in ("--sender", s)]
    stderr = failed(await cli(["users", "add", email, "--password-stdin", "--sender",
                               "fresh@kw.test", *extra], env, stdin=CLI_PASSWORD + "\n"))
    assert "already belongs to a user" in stderr
    listed = ok_json(await cli(["users", "list", "--json"], env))
    assert [u["email"] for u in listed] == ["agent@kw.test"]
    # The address claimed before the conflict was found is released again.
    assert await redis_client.get(keys.sender_index("fresh@kw.test")) is None


async def test_users_add_refuses_a_taken_id(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """A second user with the same --id exits 1."""
    await add_user(env, "agent@kw.test", "--id", "agent-1")
    stderr = failed(await cli(["users", "add", "boss@kw.test", "--id", "agent-1", "--no-password"],
                              env))
    assert "already exists" in stderr


@pytest.mark.parametrize(("extra", "stdin", "message"), [
    (["--plan", "gold"], CLI_PASSWORD, "unknown plan 'gold'; plans: free, plus, pro, team"),
    (["--tz", "Mars/Olympus_Mons"], CLI_PASSWORD, "unknown time zone 'Mars/Olympus_Mons'"),
    (["--limit", "0"], CLI_PASSWORD, "limit must be a positive integer"),
    (["--limit", "-5"], CLI_PASSWORD, "limit must be a positive integer"),
    (["--limit", "90071992547410"], CLI_PASSWORD, "of at most 90,071,992,547,409"),
    ([], "", "no password on standard input"),
    ([], "\n", "no password on standard input"),
    (["--id", "no spaces"], CLI_PASSWORD, "user id must be letters"),
])
async def test_users_add_rejects_bad_values(
        env: dict[str, str], redis_client: aioredis.Redis, extra: list[str], stdin: str,
        message: str) -> None:
    """A bad plan, zone, limit, id or an empty password exits 1 with a clear message."""
    stderr = failed(await cli(["users", "add", "agent@kw.test", "--password-stdin", *extra],
                              env, stdin=stdin))
    assert message in stderr
    assert await redis_client.smembers(keys.users_index()) == set()
    assert await redis_client.get(keys.sender_index("agent@kw.test")) is None


async def test_users_add_refuses_a_password_shorter_than_the_policy(
        env: dict[str, str], redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """A user password under [passwords] user_min_length (12 by default) is refused naming
    the rule and its key, without echoing it, and nothing is created; the policy sets it."""
    stderr = failed(await cli(["users", "add", "agent@kw.test", "--password-stdin"], env,
                              stdin="5char\n"))
    assert "the password is too short: 5 characters, a user password needs at least 12 " \
           "(plans.toml [passwords] user_min_length)" in stderr
    assert "5char" not in stderr
    assert await redis_client.smembers(keys.users_index()) == set()
    assert await redis_client.get(keys.sender_index("agent@kw.test")) is None
    await add_user(env, "agent@kw.test")  # 18 characters: fine by default

    stricter = _broken_policies(tmp_path, "user_min_length = 12", "user_min_length = 20")
    stderr = failed(await cli(["users", "add", "boss@kw.test", "--password-stdin"],
                              {**env, "RELAY_POLICIES_DIR": str(stricter)},
                              stdin=CLI_PASSWORD + "\n"))
    assert "needs at least 20" in stderr


async def test_users_add_needs_a_password_or_an_explicit_no_password(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """users add without --password-stdin no longer creates a user without a password
    silently: it says to choose; --no-password creates one that cannot log in over SMTP."""
    stderr = failed(await cli(["users", "add", "agent@kw.test"], env))
    assert "--password-stdin, or pass --no-password" in stderr
    assert await redis_client.smembers(keys.users_index()) == set()
    view = ok_json(await cli(["users", "add", "agent@kw.test", "--no-password"], env))
    assert await redis_client.hget(keys.user(view["id"]), "password") is None
    assert await AccountStore(redis_client).user_password_hash("agent@kw.test") is None
    result = await cli(["users", "add", "boss@kw.test", "--no-password", "--password-stdin"],
                       env, stdin=CLI_PASSWORD + "\n")
    assert "not allowed with argument" in failed(result, code=2)


async def test_apps_add_refuses_a_password_shorter_than_24(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """An app password needs [passwords] app_min_length characters (24 by default): one good
    enough for a user (18) is refused for an app, and no app is created."""
    stderr = failed(await cli(["apps", "add", "smartplans", "--password-stdin"], env,
                              stdin=CLI_PASSWORD + "\n"))
    assert "18 characters, an app password needs at least 24 (plans.toml [passwords] " \
           "app_min_length)" in stderr
    assert await redis_client.smembers(keys.apps_index()) == set()


async def test_users_add_rejects_a_malformed_address(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """An email without a single @ exits 1 naming it."""
    stderr = failed(await cli(["users", "add", "not-an-address", "--no-password"], env))
    assert "not an email address: 'not-an-address'" in stderr


# -- apps ------------------------------------------------------------------------------------
async def test_apps_add_and_list(env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """apps add prints the app as JSON; apps list shows it as JSON and as a table."""
    assert ok_json(await cli(["apps", "list", "--json"], env)) == []
    added = ok_json(await cli(["apps", "add", "smartplans", "--password-stdin"], env,
                              stdin=APP_PASSWORD + "\n"))
    assert added["name"] == "smartplans"
    assert added["status"] == "active"
    assert "password" not in added
    assert ok_json(await cli(["apps", "list", "--json"], env)) == [added]

    table = ok(await cli(["apps", "list"], env)).splitlines()
    assert table[0].split() == ["NAME", "STATUS", "CREATED"]
    assert table[1].split() == ["smartplans", "active", added["created_at"]]

    found = await AccountStore(redis_client).app_password_hash("smartplans")
    assert found is not None
    assert await asyncio.to_thread(verify_password, APP_PASSWORD.encode(), found[1])
    assert not await asyncio.to_thread(verify_password, PASSWORD.encode(), found[1])


async def test_apps_add_refuses_a_duplicate_name(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """A second app with the same name exits 1 and keeps the first app's password."""
    ok(await cli(["apps", "add", "smartplans", "--password-stdin"], env,
                 stdin=APP_PASSWORD + "\n"))
    stderr = failed(await cli(["apps", "add", "smartplans", "--password-stdin"], env,
                              stdin="another app password, long enough\n"))
    assert "app smartplans already exists" in stderr
    found = await AccountStore(redis_client).app_password_hash("smartplans")
    assert found is not None
    assert await asyncio.to_thread(verify_password, APP_PASSWORD.encode(), found[1])


@pytest.mark.parametrize(("name", "stdin", "message"), [
    ("SmartPlans", APP_PASSWORD, "app name must be"),
    ("x", APP_PASSWORD, "app name must be"),
    ("smartplans", "", "no password on standard input"),
])
async def test_apps_add_rejects_bad_values(
        env: dict[str, str], redis_client: aioredis.Redis, name: str, stdin: str,
        message: str) -> None:
    """A malformed app name or an empty password exits 1 and creates nothing."""
    stderr = failed(await cli(["apps", "add", name, "--password-stdin"], env, stdin=stdin))
    assert message in stderr
    assert await redis_client.smembers(keys.apps_index()) == set()


# -- usage -----------------------------------------------------------------------------------
async def test_usage_reports_the_current_month_as_one_json_object(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """usage --json prints one object: used, limit, remaining, percent, period, resets_at…"""
    view = await add_user(env, "agent@kw.test", "--plan", "plus", "--tz", "America/Chicago")
    tz = zone("America/Chicago")
    before = period_at(SystemClock().now(), tz)
    report = ok_json(await cli(["usage", "agent@kw.test", "--json"], env))
    after = period_at(SystemClock().now(), tz)
    assert isinstance(report, dict)
    period = before if report["period"] == before.label else after
    assert report["period"] == period.label
    assert report["resets_at"] == period.resets_at.isoformat()
    assert report["user_id"] == view["id"]
    assert report["email"] == "agent@kw.test"
    assert report["plan"] == "plus"
    assert report["tz"] == "America/Chicago"
    assert report["status"] == "active"
    assert (report["used"], report["limit"], report["remaining"]) == (0, 10000, 10000)
    assert report["percent"] == 0.0
    assert (report["delivered"], report["in_flight"]) == (0, 0)


async def test_usage_period_selects_a_month(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """--period YYYY-MM reports that month's committed and in-flight units, not this one's."""
    view = await add_user(env, "agent@kw.test", "--limit", "10", "--tz", "America/Chicago")
    quota = QuotaStore(redis_client)
    limits = load_policies(POLICIES).plan_limits()
    for rcpt in range(3):
        reserved = await quota.reserve(view["id"], "2020-02", "txn-a", rcpt, limits)
        assert reserved.status is ReserveStatus.RESERVED
    assert (await quota.commit(view["id"], "2020-02", "txn-a")).units == 3
    reserved = await quota.reserve(view["id"], "2020-02", "txn-b", 0, limits)
    assert reserved.status is ReserveStatus.RESERVED

    report = ok_json(await cli(["usage", view["id"], "--json", "--period", "2020-02"], env))
    assert report["period"] == "2020-02"
    assert (report["used"], report["delivered"], report["in_flight"]) == (4, 3, 1)
    assert (report["limit"], report["remaining"], report["percent"]) == (10, 6, 40.0)
    # March 1st, local midnight in Chicago (still standard time, UTC-6).
    assert report["resets_at"] == "2020-03-01T00:00:00-06:00"

    current = ok_json(await cli(["usage", "agent@kw.test", "--json"], env))
    assert current["period"] != "2020-02"
    assert current["used"] == 0

    text = ok(await cli(["usage", "agent@kw.test", "--period", "2020-02"], env))
    assert "used 4 of 10 (40.0%), 6 remaining" in text
    assert "1 reserved, not yet confirmed delivered" in text


async def test_usage_caps_remaining_at_zero(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """A month counted past a since-lowered limit shows remaining 0, not a negative number."""
    view = await add_user(env, "agent@kw.test", "--limit", "2")
    await redis_client.hset(keys.usage(view["id"], "2021-07"),
                            mapping={"used": "5", "delivered": "5"})
    report = ok_json(await cli(["usage", "agent@kw.test", "--json", "--period", "2021-07"],
                               env))
    assert (report["used"], report["limit"], report["remaining"]) == (5, 2, 0)
    assert report["percent"] == 250.0


@pytest.mark.parametrize("period", ["2026-13", "March", "2026/03", "26-03", ""])
async def test_usage_rejects_a_malformed_period(
        env: dict[str, str], redis_client: aioredis.Redis, period: str) -> None:
    """A --period that is not YYYY-MM exits 1 saying what is expected."""
    await add_user(env)
    stderr = failed(await cli(["usage", "agent@kw.test", "--json", "--period", period], env))
    assert "period must look like YYYY-MM" in stderr


async def test_usage_rejects_an_unknown_user(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """usage of nobody exits 1 with no output on stdout."""
    result = await cli(["usage", "nobody@kw.test", "--json"], env)
    assert "no user 'nobody@kw.test'" in failed(result)
    assert result.stdout == ""


# -- argument errors -------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["users"],
    ["apps"],
    ["users", "add"],
    ["apps", "add", "smartplans"],
    ["users", "add", "agent@kw.test", "--limit", "abc"],
    ["usage"],
    ["users", "list", "--colour"],
])
def test_cli_bad_arguments_exit_2_with_usage(tmp_path: Path, argv: list[str]) -> None:
    """Malformed command lines exit 2 with argparse's usage message, before touching Redis."""
    # An unreachable Redis proves the arguments are refused before any connection.
    env = clean_env(RELAY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                    RELAY_POLICIES_DIR=str(POLICIES), RELAY_STATE_DIR=str(tmp_path / "state"))
    result = run_cli(argv, env, cwd=tmp_path)
    stderr = failed(result, code=2)
    assert "usage: command-relay" in stderr
    assert "error:" in stderr
    assert result.stdout == ""


def test_cli_help_exits_0(tmp_path: Path) -> None:
    """--help lists the commands and exits 0."""
    out = ok(run_cli(["--help"], clean_env(), cwd=tmp_path))
    for command in ("serve", "check-config", "users", "apps", "usage"):
        assert command in out


# -- check-config ----------------------------------------------------------------------------
def test_check_config_accepts_the_shipped_files(tmp_path: Path) -> None:
    """check-config exits 0 on the shipped policies and prints every plan with its limit."""
    env = clean_env(RELAY_POLICIES_DIR=str(POLICIES), RELAY_STATE_DIR=str(tmp_path / "state"))
    out = ok(run_cli(["check-config"], env, cwd=tmp_path))
    plans = load_policies(POLICIES).plans
    assert "settings OK" in out
    assert "redis embedded" in out
    assert "policies OK" in out
    assert "passwords of 12+ characters for users, 24+ for apps" in out
    for plan in plans.values():
        assert f"{plan.name}={plan.monthly_limit}" in out
    # Validating must not start anything or create the state folder.
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(("settings", "message"), [
    ({"RELAY_LISTEN": "bogus"}, "environment: listen: expected host:port, got 'bogus'"),
    ({"RELAY_LISTEN": "example.com:25"}, "no DNS lookups"),
    ({"RELAY_ALLOW_PLAINTEXT_AUTH": "1", "RELAY_LISTEN": "0.0.0.0:2525"},
     "allow_plaintext_auth: refused because listen 0.0.0.0:2525 is not a loopback"),
    ({"RELAY_LISTN": "127.0.0.1:2525"}, "environment: RELAY_LISTN: unknown setting"),
    ({"RELAY_MAX_RECIPIENTS": "0"}, "max_recipients: must be a positive integer"),
    ({"RELAY_REDIS_URL": "http://127.0.0.1:6379"}, "redis_url: scheme must be"),
    ({"RELAY_UPSTREAM_URL": "smtp+starttls://user:hunter2@127.0.0.1:587x"},
     "upstream_url: the port must be a number from 1 to 65535; expected e.g. "
     "smtp+starttls://user:password@smtp.example.com:587"),
    ({"RELAY_TLS_CERT": "/nonexistent/cert.pem"}, "tls_cert, tls_key: set both or neither"),
])
def test_check_config_names_a_bad_setting(tmp_path: Path, settings: dict[str, str],
                                           message: str) -> None:
    """A malformed, unknown or unsafe setting exits 1 naming the key and the reason."""
    env = clean_env(RELAY_POLICIES_DIR=str(POLICIES), RELAY_STATE_DIR=str(tmp_path / "state"),
                    **settings)
    result = run_cli(["check-config"], env, cwd=tmp_path)
    stderr = failed(result)
    assert message in stderr
    assert "hunter2" not in stderr
    assert result.stdout == ""


def test_check_config_names_a_missing_tls_file(tmp_path: Path) -> None:
    """RELAY_TLS_CERT naming a missing file (with RELAY_TLS_KEY set) exits 1 naming it."""
    key = tmp_path / "key.pem"
    key.write_text("not checked before the certificate\n")
    cert = tmp_path / "missing-cert.pem"
    env = clean_env(RELAY_POLICIES_DIR=str(POLICIES), RELAY_STATE_DIR=str(tmp_path / "state"),
                    RELAY_TLS_CERT=str(cert), RELAY_TLS_KEY=str(key))
    stderr = failed(run_cli(["check-config"], env, cwd=tmp_path))
    assert f"file not found: {cert}" in stderr


@pytest.mark.parametrize("missing", ["RELAY_TLS_KEY", "RELAY_UPSTREAM_CA_FILE"])
def test_check_config_names_every_missing_file_setting(tmp_path: Path, missing: str) -> None:
    """Each setting declared as a file is checked: the TLS key and the upstream's CA bundle
    too, not only the certificate."""
    present = tmp_path / "present.pem"
    present.write_text("exists\n")
    files = {"RELAY_TLS_CERT": str(present), "RELAY_TLS_KEY": str(present),
             missing: str(tmp_path / "missing.pem")}
    env = clean_env(RELAY_POLICIES_DIR=str(POLICIES), RELAY_STATE_DIR=str(tmp_path / "state"),
                    **files)
    stderr = failed(run_cli(["check-config"], env, cwd=tmp_path))
    assert f"file not found: {tmp_path / 'missing.pem'}" in stderr


def test_check_config_lists_the_settings_other_than_the_defaults(tmp_path: Path) -> None:
    """check-config lists each setting that differs from its default as RELAY_NAME=value, in
    the order of docs/configuration.md, route URLs one by one, secrets masked as in repr, a
    listener turned off as an empty value."""
    state = tmp_path / "state"
    env = clean_env(RELAY_POLICIES_DIR=str(POLICIES), RELAY_STATE_DIR=str(state),
                    RELAY_ADMIN_TOKEN="hunter2-admin-token",
                    RELAY_UPSTREAM_URL="smtp+starttls://u:hunter2@127.0.0.1:587",
                    RELAY_ROUTE_MAILCHIMP_URL="smtps://mc:hunter2@127.0.0.1:465",
                    RELAY_REDIS_URL="redis://:hunter2@127.0.0.1:6379/0",
                    RELAY_MAX_RECIPIENTS="50", RELAY_TRUSTED_PROXIES="10.0.0.0/8 192.0.2.7",
                    RELAY_PROXY_PROTOCOL="1", RELAY_METRICS_LISTEN="",
                    RELAY_NOTIFIER_METRICS_LISTEN="127.0.0.1:9466")
    out = ok(run_cli(["check-config"], env, cwd=tmp_path))
    assert "hunter2" not in out
    head, listed = out.split("settings other than the defaults:\n")
    assert "settings OK: listen 127.0.0.1:2525, redis configured, upstream " \
        "smtp+starttls://u:***@127.0.0.1:587" in head
    assert "metrics: off; notifier metrics: 127.0.0.1:9466" in head
    assert listed.splitlines() == [
        "  RELAY_REDIS_URL=redis://:***@127.0.0.1:6379/0",
        "  RELAY_UPSTREAM_URL=smtp+starttls://u:***@127.0.0.1:587",
        f"  RELAY_STATE_DIR={state}",
        f"  RELAY_POLICIES_DIR={POLICIES}",
        "  RELAY_MAX_RECIPIENTS=50",
        "  RELAY_PROXY_PROTOCOL=1",
        "  RELAY_TRUSTED_PROXIES=10.0.0.0/8, 192.0.2.7/32",
        "  RELAY_ROUTE_MAILCHIMP_URL=smtps://mc:***@127.0.0.1:465",
        "  RELAY_ADMIN_TOKEN=***",
        "  RELAY_METRICS_LISTEN=",
    ]


def test_check_config_says_when_every_setting_has_its_default(tmp_path: Path) -> None:
    """With nothing set away from the defaults, check-config says so."""
    env = clean_env(metrics_ports=False)
    shutil.copytree(POLICIES, tmp_path / "policies")
    out = ok(run_cli(["check-config"], env, cwd=tmp_path))
    assert out.splitlines()[-1] == "settings other than the defaults: none"


def _broken_policies(tmp_path: Path, old: str, new: str) -> Path:
    directory = tmp_path / "policies"
    shutil.copytree(POLICIES, directory)
    plans = directory / "plans.toml"
    text = plans.read_text(encoding="utf-8")
    assert old in text
    plans.write_text(text.replace(old, new, 1), encoding="utf-8")
    return directory


@pytest.mark.parametrize(("old", "new", "message"), [
    ("monthly_limit = 5000\n", "monthly_limit = 5000\n[[[ not toml\n", ""),
    ("monthly_limit = 5000\n", 'monthly_limit = "lots"\n', "plans.free.monthly_limit"),
    ('plan = "free"', 'plan = "gold"', "defaults.plan"),
    ("monthly_limit = 5000\n", "monthly_limit = 5000\nmonthly_limt = 6000\n", "monthly_limt"),
])
def test_check_config_names_the_broken_policy_file(tmp_path: Path, old: str, new: str,
                                                    message: str) -> None:
    """A corrupt plans.toml exits 1 with a message naming the file (and the key)."""
    directory = _broken_policies(tmp_path, old, new)
    env = clean_env(RELAY_POLICIES_DIR=str(directory), RELAY_STATE_DIR=str(tmp_path / "state"))
    stderr = failed(run_cli(["check-config"], env, cwd=tmp_path))
    assert str(directory / "plans.toml") in stderr
    assert message in stderr


def test_check_config_names_a_missing_policy_file(tmp_path: Path) -> None:
    """A policies folder without plans.toml exits 1 naming the missing file."""
    directory = tmp_path / "empty-policies"
    directory.mkdir()
    env = clean_env(RELAY_POLICIES_DIR=str(directory), RELAY_STATE_DIR=str(tmp_path / "state"))
    stderr = failed(run_cli(["check-config"], env, cwd=tmp_path))
    assert f"{directory / 'plans.toml'}: cannot read" in stderr


async def test_admin_command_refuses_broken_policies(
        env: dict[str, str], redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """Admin commands load the policies too, and stop on a broken file before writing."""
    directory = _broken_policies(tmp_path, 'plan = "free"', 'plan = "gold"')
    env = {**env, "RELAY_POLICIES_DIR": str(directory)}
    stderr = failed(await cli(["users", "add", "agent@kw.test"], env))
    assert str(directory / "plans.toml") in stderr
    assert await redis_client.smembers(keys.users_index()) == set()


# -- settings files --------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["--config", "RELAY_CONFIG"])
async def test_cli_reads_settings_from_a_config_file(
        redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path,
        how: str) -> None:
    """The redis_url and policies_dir of a TOML settings file are what admin commands use."""
    config = tmp_path / "relay.toml"
    config.write_text(f'redis_url = "{redis_server.url}"\npolicies_dir = "{POLICIES}"\n'
                      f'state_dir = "{tmp_path / "state"}"\n', encoding="utf-8")
    await AccountStore(redis_client).add_user("agent@kw.test", plan="pro", tz="UTC",
                                              password_hash=None)
    env = clean_env()
    argv = ["users", "list", "--json"]
    if how == "--config":
        argv = ["--config", str(config), *argv]
    else:
        env["RELAY_CONFIG"] = str(config)
    # cwd has no policies/ folder: only the file's policies_dir can resolve the plan limit.
    listed = ok_json(await cli(argv, env, cwd=tmp_path))
    assert [(u["email"], u["limit"]) for u in listed] == [("agent@kw.test", 25000)]
    # Nothing fell back to the embedded development Redis.
    assert not (tmp_path / "state").exists()


async def test_cli_environment_overrides_the_config_file(
        redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """A RELAY_* variable wins over the same key in the settings file."""
    config = tmp_path / "relay.toml"
    config.write_text(f'redis_url = "redis://127.0.0.1:{free_port()}/0"\n'
                      f'policies_dir = "{POLICIES}"\n', encoding="utf-8")
    env = clean_env(RELAY_REDIS_URL=redis_server.url, RELAY_STATE_DIR=str(tmp_path / "state"))
    assert ok_json(await cli(["--config", str(config), "apps", "list", "--json"], env,
                             cwd=tmp_path)) == []


@pytest.mark.parametrize(("content", "message"), [
    ('redis_urll = "redis://127.0.0.1:1/0"\n', "redis_urll: unknown setting"),
    ("listen = [1, 2]\n", "listen: expected a single value"),
    ("listen = \n", ""),
])
def test_cli_rejects_a_bad_config_file(tmp_path: Path, content: str, message: str) -> None:
    """An unknown key, a table value or bad TOML in the settings file exits 1 naming it."""
    config = tmp_path / "relay.toml"
    config.write_text(content, encoding="utf-8")
    stderr = failed(run_cli(["--config", str(config), "check-config"],
                            clean_env(RELAY_POLICIES_DIR=str(POLICIES)), cwd=tmp_path))
    assert str(config) in stderr
    assert message in stderr


def test_cli_rejects_a_missing_config_file(tmp_path: Path) -> None:
    """RELAY_CONFIG naming a missing file exits 1 naming it."""
    config = tmp_path / "nowhere.toml"
    stderr = failed(run_cli(["check-config"], clean_env(RELAY_CONFIG=str(config)),
                            cwd=tmp_path))
    assert f"{config}: cannot read" in stderr


# -- Redis unreachable -----------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "stdin"), [
    (["users", "list", "--json"], ""),
    (["apps", "add", "smartplans", "--password-stdin"], APP_PASSWORD + "\n"),
])
def test_cli_reports_unreachable_redis(tmp_path: Path, argv: list[str], stdin: str) -> None:
    """With nothing listening at RELAY_REDIS_URL a command exits 1 saying Redis, promptly."""
    env = clean_env(RELAY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                    RELAY_POLICIES_DIR=str(POLICIES), RELAY_STATE_DIR=str(tmp_path / "state"))
    started = time.monotonic()
    result = run_cli(argv, env, stdin=stdin, cwd=tmp_path)
    elapsed = time.monotonic() - started
    stderr = failed(result)
    assert "Redis" in stderr
    assert result.stdout == ""
    # wait_for_redis retries for 5 s; the command must not hang beyond that.
    assert elapsed < 15, elapsed


# -- plan ------------------------------------------------------------------------------------
def _months() -> tuple[set[str], set[str]]:
    """The current UTC month and the next, as seen now and a few minutes from now (so a test
    run across a month boundary still has the label the CLI used)."""
    now = SystemClock().now()
    periods = [period_at(now + timedelta(minutes=m), zone("UTC")) for m in (0, 5)]
    return {p.label for p in periods}, {p.following.label for p in periods}


async def test_plan_set_upgrades_now(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """plan set USER plus --by billing --json prints the upgrade, applied to this month, and
    records it in the audit trail and as a plan.changed event."""
    view = await add_user(env)
    current, _ = _months()
    result = ok_json(await cli(["plan", "set", "agent@kw.test", "plus", "--by", "billing",
                                "--json"], env))
    assert result["effective_from"] in current
    assert result == {"user_id": view["id"], "email": "agent@kw.test", "outcome": "upgrade",
                      "effective_from": result["effective_from"], "old_plan": "free",
                      "old_limit": 5000, "new_plan": "plus", "new_limit": 10_000,
                      "by": "billing"}
    shown = ok_json(await cli(["users", "show", view["id"], "--json"], env))
    assert (shown["plan"], shown["limit"], shown["pending"]) == ("plus", 10_000, None)
    assert await redis_client.xlen(keys.audit(view["id"])) == 1
    published = [e for _, e in await EventLog(redis_client).recent(10)]
    assert [(e.kind, e.user_id, e.data["outcome"], e.data["by"]) for e in published] == [
        ("plan.changed", view["id"], "upgrade", "billing")]


async def test_plan_set_prints_a_readable_line_and_names_the_operator(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """Without --json, plan set prints one line; without --by the audit names cli:<user>."""
    view = await add_user(env, "agent@kw.test", "--plan", "plus")
    current, _ = _months()
    line = ok(await cli(["plan", "set", "agent@kw.test", "pro"], env)).strip()
    assert any(line == f"agent@kw.test: upgrade plus (10000) -> pro (25000), now, in {month}"
               for month in current), line
    [entry] = await redis_client.xrange(keys.audit(view["id"]))
    assert entry[1]["by"].startswith("cli:")
    assert len(entry[1]["by"]) > len("cli:")


async def test_plan_set_downgrade_waits_for_the_next_month(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """plan set USER free from plus is a downgrade from next month; usage keeps plus and
    shows the pending change."""
    await add_user(env, "agent@kw.test", "--plan", "plus")
    _, following = _months()
    result = ok_json(await cli(["plan", "set", "agent@kw.test", "free", "--json"], env))
    assert (result["outcome"], result["old_limit"], result["new_plan"],
            result["new_limit"]) == ("downgrade", 10_000, "free", 5000)
    assert result["effective_from"] in following
    report = ok_json(await cli(["usage", "agent@kw.test", "--json"], env))
    assert (report["plan"], report["limit"]) == ("plus", 10_000)
    assert report["pending_change"] == {"plan": "free", "custom_limit": None,
                                        "effective_from": result["effective_from"]}
    text = ok(await cli(["usage", "agent@kw.test"], env))
    assert f"  pending: plan free from {result['effective_from']}" in text.splitlines()

    line = ok(await cli(["plan", "set", "agent@kw.test", "plus", "--limit", "9000"],
                        env)).strip()
    assert line == ("agent@kw.test: downgrade plus (10000) -> plus (9000), at the reset to "
                    f"{result['effective_from']}")


async def test_plan_cancel_is_a_downgrade_to_the_default_plan(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """plan cancel moves a paid user to the default plan at the next reset."""
    view = await add_user(env, "agent@kw.test", "--plan", "pro")
    _, following = _months()
    result = ok_json(await cli(["plan", "cancel", view["id"], "--by", "billing", "--json"],
                               env))
    assert (result["outcome"], result["old_plan"], result["new_plan"], result["by"]) == (
        "downgrade", "pro", load_policies(POLICIES).default_plan, "billing")
    assert result["effective_from"] in following
    shown = ok_json(await cli(["users", "show", view["id"], "--json"], env))
    assert shown["limit"] == 25_000
    assert shown["pending"] == {"plan": "free", "custom_limit": None,
                                "effective_from": result["effective_from"]}


async def test_plan_history_lists_the_audit_trail(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """plan history --json lists every change oldest first (unchanged included); the text
    form prints one line per entry, then the plan and limit of the months on record."""
    view = await add_user(env)
    current, following = _months()
    assert ok_json(await cli(["plan", "history", view["id"], "--json"], env)) == []
    for argv in (["set", "agent@kw.test", "plus"], ["set", "agent@kw.test", "plus"],
                 ["cancel", "agent@kw.test"]):
        ok(await cli(["plan", *argv, "--by", "ops"], env))
    entries = ok_json(await cli(["plan", "history", "agent@kw.test", "--json"], env))
    assert [(e["outcome"], e["old_plan"], e["old_limit"], e["new_plan"], e["new_limit"],
             e["by"]) for e in entries] == [
        ("upgrade", "free", 5000, "plus", 10_000, "ops"),
        ("unchanged", "plus", 10_000, "plus", 10_000, "ops"),
        ("downgrade", "plus", 10_000, "free", 5000, "ops")]
    assert entries[0]["effective_from"] in current
    assert entries[2]["effective_from"] in following
    assert all(set(e) == {"id", "at", "by", "outcome", "old_plan", "old_limit", "new_plan",
                          "new_limit", "effective_from"} for e in entries)
    assert [e["id"] for e in entries] == sorted(
        (e["id"] for e in entries), key=lambda i: tuple(map(int, i.split("-"))))
    lines = ok(await cli(["plan", "history", "agent@kw.test"], env)).splitlines()
    assert len(lines) == 5
    assert lines[2].startswith(entries[2]["at"])
    assert lines[2].split()[1:] == ["ops", "downgrade", "plus", "(10000)", "->", "free",
                                    "(5000)", "from", entries[2]["effective_from"]]
    # The month keeps the plus plan until its end: the downgrade is next month's.
    assert lines[3] == "plan and limit by month:"
    assert lines[4].split()[0] in current
    assert lines[4].split()[1:] == ["plus", "10,000", "(in", "force)"]


@pytest.mark.parametrize(("argv", "message"), [
    (["plan", "set", "agent@kw.test", "gold"], "unknown plan 'gold'; plans: free, plus, pro"),
    (["plan", "set", "agent@kw.test", "plus", "--limit", "0"],
     "the custom limit must be a positive integer"),
    # Beyond what reserve.lua counts exactly: refused before anything is written.
    (["plan", "set", "agent@kw.test", "plus", "--limit", "776287861482925568"],
     "the custom limit must be a positive integer of at most 90,071,992,547,409 (2**53 / 100)"),
    (["plan", "set", "nobody@kw.test", "plus"], "no user 'nobody@kw.test'"),
    (["plan", "cancel", "nobody@kw.test"], "no user 'nobody@kw.test'"),
    (["plan", "history", "nobody@kw.test"], "no user 'nobody@kw.test'"),
])
async def test_plan_refuses_an_unknown_plan_or_user(
        env: dict[str, str], redis_client: aioredis.Redis, argv: list[str],
        message: str) -> None:
    """An unknown plan or user exits 1 with a clear message, prints nothing and records
    nothing."""
    view = await add_user(env)
    result = await cli([*argv, "--json"], env)
    assert message in failed(result)
    assert result.stdout == ""
    assert await redis_client.xlen(keys.audit(view["id"])) == 0
    assert await redis_client.exists(keys.events()) == 0


# -- usage --all -----------------------------------------------------------------------------
async def test_usage_all_lists_every_user_by_percent(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """usage --all --json is one array, highest percentage first; the table shows the same
    order with the pending change."""
    current, following = _months()
    seeded = {"a@kw.test": 4000, "b@kw.test": 500, "c@kw.test": 10}
    for email, extra in (("a@kw.test", []), ("b@kw.test", ["--plan", "plus"]),
                         ("c@kw.test", ["--limit", "10"])):
        view = await add_user(env, email, *extra)
        for label in current:
            await redis_client.hset(keys.usage(view["id"], label),
                                    mapping={"used": seeded[email], "delivered": seeded[email]})
    result = ok_json(await cli(["plan", "set", "b@kw.test", "free", "--json"], env))

    reports = ok_json(await cli(["usage", "--all", "--json"], env))
    assert [(r["email"], r["used"], r["limit"], r["percent"]) for r in reports] == [
        ("c@kw.test", 10, 10, 100.0), ("a@kw.test", 4000, 5000, 80.0),
        ("b@kw.test", 500, 10_000, 5.0)]
    assert reports[2]["pending_change"]["effective_from"] in following

    table = ok(await cli(["usage", "--all"], env)).splitlines()
    assert table[0].split() == ["EMAIL", "PLAN", "USED", "LIMIT", "%", "PERIOD", "PENDING"]
    rows = [line.split() for line in table[1:]]
    assert [row[:5] for row in rows] == [["c@kw.test", "free", "10", "10", "100.0"],
                                         ["a@kw.test", "free", "4,000", "5,000", "80.0"],
                                         ["b@kw.test", "plus", "500", "10,000", "5.0"]]
    assert all(row[5] in current for row in rows)
    assert rows[2][6:] == ["free", "from", result["effective_from"]]
    assert rows[0][6:] == []


async def test_usage_without_user_or_all_is_a_usage_error(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """usage with neither USER nor --all exits 2 saying what to name."""
    result = await cli(["usage", "--json"], env)
    assert "name a USER, or use --all" in failed(result, code=2)
    assert result.stdout == ""


@pytest.mark.parametrize("argv", [["usage", "--all", "agent@kw.test"],
                                  ["usage", "--all", "--period", "2026-01"]])
async def test_usage_all_refuses_a_user_or_period(
        env: dict[str, str], redis_client: aioredis.Redis, argv: list[str]) -> None:
    """usage --all with a USER or --period exits 1."""
    await add_user(env)
    result = await cli(argv, env)
    assert "--all takes no USER or --period" in failed(result)
    assert result.stdout == ""


# -- events ----------------------------------------------------------------------------------
async def _publish(redis_client: aioredis.Redis, count: int) -> list[tuple[str, Event]]:
    log = EventLog(redis_client)
    published = []
    for i in range(count):
        event = (new_event("quota.threshold", "u-1", email="agent@kw.test", percent=80,
                           used=4000 + i, limit=5000) if i % 2 else
                 new_event("plan.changed", "u-2", email="boss@kw.test", outcome="upgrade",
                           old_plan="free", new_plan="plus", effective_from="2026-11",
                           by=f"op{i}"))
        published.append((await log.publish(event), event))
    return published


async def test_events_tail_json_prints_the_latest_events_as_json_lines(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """events tail --json -n 5 prints the newest five events, oldest first, one JSON object
    per line with the stream id."""
    published = await _publish(redis_client, 7)
    lines = ok(await cli(["events", "tail", "--json", "-n", "5"], env)).splitlines()
    assert [json.loads(line) for line in lines] == [
        {"stream_id": stream_id, **json.loads(event.to_json())}
        for stream_id, event in published[2:]]


async def test_events_tail_prints_readable_lines_and_filters_by_kind(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """events tail prints format_event lines; --kind keeps only that kind."""
    published = await _publish(redis_client, 4)
    out = ok(await cli(["events", "tail"], env)).splitlines()
    assert out == [format_event(event) for _, event in published]
    assert "upgrade free -> plus from 2026-11 by op0" in out[0]
    assert "80% (4001/5000)" in out[1]
    only = ok(await cli(["events", "tail", "--kind", "plan.changed"], env)).splitlines()
    assert only == [format_event(e) for _, e in published if e.kind == "plan.changed"]
    assert ok(await cli(["events", "tail", "--kind", "quota.reached"], env)) == ""


def _xread_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_xread")
    return int(stats["calls"]) if stats else 0


def _until(predicate: Any, what: str, follower: subprocess.Popen[bytes], out: Path,
           err: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if follower.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what}: exit={follower.poll()}\n{out.read_text()}\n"
                                 f"{err.read_text()}")
        time.sleep(0.05)


def test_events_tail_follow_keeps_following_and_reconnects_to_a_restarted_redis(
        tmp_path: Path) -> None:
    """events tail -f follows until Ctrl-C: it outlives many blocking reads (each shorter
    than the client's socket timeout, which used to end it with "Redis is unreachable"),
    says once when Redis goes away, reconnects by itself when it is back, prints what is
    published then, and exits 130 on Ctrl-C without a traceback."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    follower: subprocess.Popen[bytes] | None = None
    try:
        env = clean_env(RELAY_REDIS_URL=server.url, RELAY_POLICIES_DIR=str(POLICIES),
                        RELAY_STATE_DIR=str(tmp_path / "state"), RELAY_REDIS_TIMEOUT="2")
        admin = redis.Redis(port=server.port)
        _publish_one(server, "before")
        out, err = tmp_path / "tail.out", tmp_path / "tail.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            follower = subprocess.Popen([sys.executable, "-m", "relay", "events", "tail", "-f"],
                                        env=env, stdout=stdout, stderr=stderr,
                                        stdin=subprocess.DEVNULL)
        _until(lambda: "by before" in out.read_text(), "first event", follower, out, err)
        # Several blocking reads go by, with no event: it keeps following.
        calls = _xread_calls(admin)
        _until(lambda: _xread_calls(admin) >= calls + 4, "blocking reads", follower,
                     out, err)
        _publish_one(server, "while-up")
        _until(lambda: "by while-up" in out.read_text(), "a new event", follower, out,
                     err)

        server.stop()
        _until(lambda: "events.redis_unavailable" in err.read_text(), "outage noticed",
                     follower, out, err)
        server.start()  # the same port, an empty database (persistence off)
        admin = redis.Redis(port=server.port)
        # Published once it has reconnected (a read was made on the new server).
        _until(lambda: _xread_calls(admin) >= 1, "reconnected", follower, out, err)
        _publish_one(server, "after-restart")
        _until(lambda: "by after-restart" in out.read_text(), "event after the restart",
                     follower, out, err)
        assert "events.redis_back" in err.read_text()
        assert err.read_text().count("events.redis_unavailable") == 1
        assert all(line.startswith("command-relay: warning: ")
                   for line in err.read_text().splitlines())

        follower.send_signal(signal.SIGINT)
        assert follower.wait(20) == 130
        assert "Traceback" not in err.read_text()
        printed = out.read_text().splitlines()
        assert [line.rpartition(" by ")[2] for line in printed] == \
            ["before", "while-up", "after-restart"]
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait()
        server.stop()


def _publish_one(server: RedisServer, by: str) -> None:
    async def publish() -> None:
        client = connect_redis(server.url, timeout=2)
        try:
            await EventLog(client).publish(new_event(
                "plan.changed", "u-2", email="boss@kw.test", outcome="upgrade",
                old_plan="free", new_plan="plus", effective_from="2026-11", by=by))
        finally:
            await client.aclose()
    asyncio.run(publish())


async def _bury(redis_client: aioredis.Redis) -> list[Event]:
    log = EventLog(redis_client)
    buried = [new_event("quota.reached", "u-1", email="agent@kw.test", used=5000, limit=5000),
              new_event("plan.changed", "u-2", email="boss@kw.test", outcome="downgrade")]
    for event, channel in zip(buried, ("in_app", "email"), strict=True):
        # What the notifier leaves behind for a channel it gave up on.
        await redis_client.hset(keys.attempts(event.id), channel, 6)
        await redis_client.sadd(keys.notified(event.id), channel)
        await log.bury(event, channel, "HTTP 503 from the CRM", 6)
    return buried


async def test_events_dead_lists_dead_letters(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """events dead --json lists each dead letter with its channel, error, attempts and event;
    the text form prints one line each."""
    assert ok_json(await cli(["events", "dead", "--json"], env)) == []
    # None yet: the text form says so rather than printing nothing.
    assert ok(await cli(["events", "dead"], env)) == \
        "no dead letters: every event was delivered, or is still being retried\n"
    buried = await _bury(redis_client)
    letters = ok_json(await cli(["events", "dead", "--json"], env))
    assert [(d["channel"], d["error"], d["attempts"], d["event"]) for d in letters] == [
        ("in_app", "HTTP 503 from the CRM", 6, json.loads(buried[0].to_json())),
        ("email", "HTTP 503 from the CRM", 6, json.loads(buried[1].to_json()))]
    lines = ok(await cli(["events", "dead"], env)).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{letters[0]['stream_id']}  in_app  attempts=6")
    assert format_event(buried[1]) in lines[1]


async def test_events_retry_one_id_requeues_only_that_letter(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """events retry ID moves that dead letter back to relay:events, with the same event id
    and only=<channel>, and forgets the channel's attempts; the other stays dead."""
    buried = await _bury(redis_client)
    letters = ok_json(await cli(["events", "dead", "--json"], env))
    out = ok(await cli(["events", "retry", letters[1]["stream_id"]], env))
    assert out.strip() == "re-queued 1 event(s)"
    remaining = ok_json(await cli(["events", "dead", "--json"], env))
    assert [d["stream_id"] for d in remaining] == [letters[0]["stream_id"]]
    entries = await redis_client.xrange(keys.events())
    assert [fields for _, fields in entries] == [{"event": buried[1].to_json(),
                                                  "only": "email"}]
    assert await redis_client.hget(keys.attempts(buried[1].id), "email") is None
    assert not await redis_client.sismember(keys.notified(buried[1].id), "email")
    assert await redis_client.hget(keys.attempts(buried[0].id), "in_app") == "6"


async def test_events_retry_all_requeues_every_letter(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """events retry --all empties the dead-letter stream into relay:events, in order."""
    buried = await _bury(redis_client)
    assert ok(await cli(["events", "retry", "--all"], env)).strip() == "re-queued 2 event(s)"
    assert await redis_client.xlen(keys.dead_letters()) == 0
    entries = await redis_client.xrange(keys.events())
    assert [(Event.from_json(f["event"]).id, f["only"]) for _, f in entries] == [
        (buried[0].id, "in_app"), (buried[1].id, "email")]
    tailed = [json.loads(line) for line in
              ok(await cli(["events", "tail", "--json"], env)).splitlines()]
    assert [e["id"] for e in tailed] == [buried[0].id, buried[1].id]
    assert ok(await cli(["events", "retry", "--all"], env)).strip() == "re-queued 0 event(s)"


async def test_events_retry_without_ids_or_all_fails(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """events retry with neither ids nor --all exits 1 and re-queues nothing."""
    await _bury(redis_client)
    result = await cli(["events", "retry"], env)
    assert "name dead-letter ids (see `events dead`), or use --all" in failed(result)
    assert result.stdout == ""
    assert await redis_client.xlen(keys.dead_letters()) == 2
    assert await redis_client.exists(keys.events()) == 0


# -- route -----------------------------------------------------------------------------------
MC_SECRET = "md-Zx81-secret-api-key"


@pytest.fixture
def cred_env(env: dict[str, str]) -> dict[str, str]:
    """env with a fixed RELAY_CREDENTIALS_KEY, so a relay in the test can share it."""
    return {**env, "RELAY_CREDENTIALS_KEY": Fernet.generate_key().decode()}


async def test_route_set_saves_and_clears_the_preference(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """route set USER campaigns mailchimp saves the preference rules use; --clear forgets
    it."""
    view = await add_user(env)
    result = ok_json(await cli(["route", "set", "agent@kw.test", "campaigns", "mailchimp"], env))
    assert result == {"user_id": view["id"], "app": "campaigns", "route": "mailchimp"}
    user = await AccountStore(redis_client).get_user(view["id"])
    assert user is not None and user.preferences == {"campaigns": "mailchimp"}
    explained = ok_json(await cli(["route", "explain", "--app", "campaigns", "--user",
                                   view["id"], "--json"], env))
    assert (explained["preference"], explained["rule"], explained["route"]) == \
        ("mailchimp", "campaigns-preference-mailchimp", "mailchimp")

    cleared = ok_json(await cli(["route", "set", view["id"], "campaigns", "--clear"], env))
    assert cleared == {"user_id": view["id"], "app": "campaigns", "route": None}
    user = await AccountStore(redis_client).get_user(view["id"])
    assert user is not None and user.preferences == {}
    explained = ok_json(await cli(["route", "explain", "--app", "campaigns", "--user",
                                   view["id"], "--json"], env))
    assert (explained["preference"], explained["rule"], explained["route"]) == \
        (None, "everything-else-command", "command")


@pytest.mark.parametrize(("argv", "message"), [
    (["route", "set", "agent@kw.test", "campaigns", "sendgrid"],
     "unknown route 'sendgrid'; routes: command, mailchimp"),
    (["route", "set", "agent@kw.test", "campaigns"], "give a ROUTE, or --clear"),
    (["route", "set", "agent@kw.test", "campaigns", "mailchimp", "--clear"],
     "give a ROUTE, or --clear"),
    (["route", "set", "nobody@kw.test", "campaigns", "mailchimp"], "no user 'nobody@kw.test'"),
    (["route", "credentials", "agent@kw.test", "sendgrid", "--secret-stdin"],
     "unknown route 'sendgrid'; routes: command, mailchimp"),
    (["route", "credentials", "agent@kw.test", "sendgrid", "--delete"],
     "unknown route 'sendgrid'"),
    (["route", "credentials", "agent@kw.test", "command", "--username", "u", "--secret-stdin"],
     "route command uses the upstream's credentials, not the user's"),
    (["route", "credentials", "agent@kw.test", "mailchimp", "--username", "u"],
     "pass the secret on standard input with --secret-stdin"),
    (["route", "credentials", "nobody@kw.test", "mailchimp", "--secret-stdin"],
     "no user 'nobody@kw.test'"),
    (["route", "explain", "--app", "campaigns", "--user", "nobody@kw.test"],
     "no user 'nobody@kw.test'"),
])
async def test_route_refuses_unknown_routes_users_and_misuse(
        env: dict[str, str], redis_client: aioredis.Redis, argv: list[str],
        message: str) -> None:
    """An unknown route or user, credentials for a route that uses the upstream's own, or a
    missing ROUTE/secret exits 1 with a clear message and stores nothing."""
    view = await add_user(env)
    result = await cli(argv, env, stdin=MC_SECRET + "\n")
    assert message in failed(result)
    assert result.stdout == ""
    for route in ("command", "mailchimp", "sendgrid"):
        assert await redis_client.exists(keys.route_credentials(view["id"], route)) == 0
    user = await AccountStore(redis_client).get_user(view["id"])
    assert user is not None and user.preferences == {}


async def test_route_credentials_stores_only_ciphertext(
        cred_env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """route credentials USER mailchimp --username u --secret-stdin prints the user and route,
    never the secret, and Redis holds only the Fernet ciphertext of it."""
    view = await add_user(cred_env)
    result = await cli(["route", "credentials", "agent@kw.test", "mailchimp", "--username",
                        "mcuser", "--secret-stdin"], cred_env, stdin=MC_SECRET + "\n")
    assert ok_json(result) == {"user_id": view["id"], "route": "mailchimp",
                               "username": "mcuser"}
    assert MC_SECRET not in result.stdout + result.stderr
    key = keys.route_credentials(view["id"], "mailchimp")
    assert key == f"relay:cred:{{{view['id']}}}:mailchimp"
    stored = await redis_client.hgetall(key)
    assert stored["username"] == "mcuser"
    assert MC_SECRET not in json.dumps(stored)
    sealed = await redis_client.hget(key, "secret")
    assert sealed is not None and MC_SECRET not in sealed
    fernet = Fernet(cred_env["RELAY_CREDENTIALS_KEY"].encode())
    assert fernet.decrypt(sealed.encode()).decode() == MC_SECRET


async def test_route_credentials_are_used_by_the_relay_then_deleted(
        cred_env: dict[str, str], redis_client: aioredis.Redis, make_relay: RelayFactory,
        upstream: CapturingUpstream, tls_files: tuple[Path, Path]) -> None:
    """Credentials saved with the CLI log the relay in to MailChimp as the user; after
    --delete the next MailChimp send is refused naming the command, and explain says the
    user has none."""
    mailchimp = CapturingUpstream(UpstreamBehaviour(credentials=("mcuser", MC_SECRET)),
                                  tls=server_context(*tls_files))
    await mailchimp.start()
    try:
        view = await add_user(cred_env)
        ok(await cli(["apps", "add", "campaigns", "--password-stdin"], cred_env,
                     stdin=APP_PASSWORD + "\n"))
        ok(await cli(["route", "credentials", view["id"], "mailchimp", "--username", "mcuser",
                      "--secret-stdin"], cred_env, stdin=MC_SECRET + "\n"))
        explain = ["route", "explain", "--app", "campaigns", "--user", view["id"], "--header",
                   "mailchimp", "--json"]
        assert ok_json(await cli(explain, cred_env))["user_has_credentials"] is True
        app = await make_relay(
            upstream=upstream, credentials_key=cred_env["RELAY_CREDENTIALS_KEY"],
            route_urls={"mailchimp": UpstreamTarget("127.0.0.1", mailchimp.port, "starttls")},
            upstream_ca_file=tls_files[0])
        content = (b"From: agent@kw.test\r\nTo: c@example.test\r\nSubject: hi\r\n"
                   b"X-KW-Route: mailchimp\r\n\r\nBody\r\n")
        async with smtp_client(app, login="campaigns", password=APP_PASSWORD) as client:
            errors, _ = await client.sendmail("agent@kw.test", ["c@example.test"], content)
        assert errors == {}
        assert mailchimp.handler.auth_logins == ["mcuser"]
        assert [m.rcpt_tos for m in mailchimp.messages] == [["c@example.test"]]
        assert upstream.messages == []

        out = ok(await cli(["route", "credentials", "agent@kw.test", "mailchimp", "--delete"],
                           cred_env))
        assert out.strip() == "credentials removed"
        assert await redis_client.exists(keys.route_credentials(view["id"], "mailchimp")) == 0
        again = ok(await cli(["route", "credentials", "agent@kw.test", "mailchimp",
                              "--delete"], cred_env))
        assert again.strip() == "credentials not found"
        assert ok_json(await cli(explain, cred_env))["user_has_credentials"] is False
        async with smtp_client(app, login="campaigns", password=APP_PASSWORD) as client:
            await client.mail("agent@kw.test")
            await client.rcpt("c@example.test")
            with pytest.raises(aiosmtplib.SMTPDataError) as refused:
                await client.data(content)
        assert refused.value.code == 550
        assert "command-relay route credentials USER mailchimp" in refused.value.message
        assert len(mailchimp.messages) == 1 and upstream.messages == []
    finally:
        await mailchimp.stop()


async def test_route_explain_campaigns_header_json(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """route explain --app campaigns --user U --header mailchimp --json names the rule, the
    route, that it is not counted, decided at DATA, and whether the user has credentials."""
    view = await add_user(env)
    result = ok_json(await cli(["route", "explain", "--app", "campaigns", "--user",
                                view["id"], "--header", "mailchimp", "--json"], env))
    assert result == {
        "app": "campaigns", "known_app": True, "preference": None, "header": "mailchimp",
        "header_ignored": False, "rule": "campaigns-header-mailchimp", "refused": None,
        "route": "mailchimp", "counted": False, "decided_at": "data", "timeline": False,
        "stripped_headers": [], "failover": None, "user_has_credentials": False}
    text = ok(await cli(["route", "explain", "--app", "campaigns", "--user", view["id"],
                         "--header", "mailchimp"], env)).splitlines()
    assert text == ["app campaigns, preference None, header mailchimp",
                    "  rule campaigns-header-mailchimp: route mailchimp (not counted); "
                    "decided at DATA",
                    "  user has credentials: no"]


async def test_route_explain_campaigns_unknown_header_is_refused(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """route explain shows a refusing rule and its text."""
    result = ok_json(await cli(["route", "explain", "--app", "campaigns", "--header",
                                "sendgrid", "--json"], env))
    assert (result["rule"], result["route"], result["refused"], result["counted"]) == \
        ("campaigns-header-unknown", None, "X-KW-Route must be command or mailchimp", None)
    text = ok(await cli(["route", "explain", "--app", "campaigns", "--header", "sendgrid"],
                        env))
    assert "refused: X-KW-Route must be command or mailchimp" in text


async def test_route_explain_smartplans_ignores_the_header(
        env: dict[str, str], redis_client: aioredis.Redis) -> None:
    """route explain --app smartplans --header mailchimp shows the header ignored: SmartPlans
    always go through the counted command route, which strips X-MC-*."""
    result = ok_json(await cli(["route", "explain", "--app", "smartplans", "--header",
                                "mailchimp", "--json"], env))
    assert (result["header"], result["header_ignored"], result["rule"], result["route"],
            result["counted"], result["decided_at"], result["timeline"]) == \
        ("mailchimp", True, "smartplans-always-command", "command", True, "data", True)
    assert result["stripped_headers"] == ["x-mc-"]
    assert "user_has_credentials" not in result
    text = ok(await cli(["route", "explain", "--app", "smartplans", "--header", "mailchimp"],
                        env)).splitlines()
    assert text == ["app smartplans, preference None, header mailchimp "
                    "(ignored: the app may not choose)",
                    "  rule smartplans-always-command: route command (counted); decided at DATA",
                    "  strips x-mc-*"]
