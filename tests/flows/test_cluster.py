"""Redis Cluster: a real 3-master cluster on loopback (the suite's redis-server binary) with
``redis+cluster://`` settings. Two ``command-relay serve`` processes share one exact count
per user, on users whose keys live on different masters; every store's multi-key step (Lua
scripts, pipelines across slots, multi-key DEL) works on the cluster; the CLI too."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiosmtplib
import pytest
from cryptography.fernet import Fernet
from redis.asyncio.cluster import RedisCluster
from redis.cluster import key_slot

from relay.admin.operations import Admin, AdminError
from relay.config.policies import load_policies
from relay.decisions.months import SystemClock
from relay.decisions.quota import QuotaStore, ReserveStatus
from relay.decisions.suppression import GLOBAL, SuppressionReason, SuppressionStore
from relay.delivery.credentials import CredentialStore, RouteCredentials
from relay.events.channels import DeliveryError
from relay.events.notifier import Notifier
from relay.events.stream import THRESHOLD, Event, EventLog, new_event
from relay.identity.accounts import AccountStore
from relay.process.wiring import RelayApp
from relay.store import keys
from relay.store.client import close_redis, connect_redis
from tests.conftest import (
    PASSWORD,
    POLICIES,
    CapturingUpstream,
    RelayFactory,
    add_user,
    message,
    smtp_client,
    wait_for,
)
from tests.redis_topology import RedisClusterNodes, RelayProcess
from tests.serving import clean_env

# Long enough for two relay processes to start and 80 sessions to finish on a loaded machine.
pytestmark = pytest.mark.timeout(180)

PLANS: list[str | int] = load_policies(POLICIES).plan_limits()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes(tmp_path_factory.mktemp("cluster"))
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
async def cluster_client(cluster: RedisClusterNodes) -> AsyncIterator[RedisCluster]:
    client = connect_redis(cluster.url, timeout=5)
    assert isinstance(client, RedisCluster)
    await client.flushall()  # every master (redis-py sends FLUSHALL to all primaries)
    yield client
    await close_redis(client)


async def owner(client: RedisCluster, key: str) -> str:
    return str(client.get_node_from_key(key).name)


async def ids_on_distinct_masters(client: RedisCluster, count: int) -> list[str]:
    """User ids whose keys live on ``count`` different masters."""
    await client.initialize()
    chosen: dict[str, str] = {}
    for n in range(1000):
        user_id = f"u-{n:04d}"
        node = await owner(client, keys.user(user_id))
        chosen.setdefault(node, user_id)
        if len(chosen) == count:
            return list(chosen.values())
    raise AssertionError("no spread of user ids over the masters")


# -- the keys -----------------------------------------------------------------------------------
def test_cluster_every_key_of_one_user_is_in_one_slot() -> None:
    """Every per-user key (the ones a Lua script or a pipeline combines) hashes to the
    user's slot, whatever the user id."""
    for user_id in ("u-1", "u-0a1b2c3d4e", "agent_7", "x"):
        slots = {key_slot(k.encode()) for k in (
            keys.user(user_id), keys.user_senders(user_id), keys.usage(user_id, "2026-11"),
            keys.usage(user_id, "2027-01"), keys.reservations(user_id, "t1"),
            keys.reservations(user_id, "t2"), keys.audit(user_id),
            keys.route_credentials(user_id, "mailchimp"), keys.suppressions(user_id))}
        assert slots == {key_slot(user_id.encode())}


# -- two relay processes, one exact count ---------------------------------------------------------
async def test_cluster_two_relay_processes_take_exactly_the_limit(
        cluster: RedisClusterNodes, cluster_client: RedisCluster, upstream: CapturingUpstream,
        tmp_path: Path) -> None:
    """Two `serve` processes on a 3-master cluster, one message through each, then 40
    concurrent SMTP sessions per user (two recipients each, alternating relays) for two users
    on different masters, limits 15 and 9: exactly 15 and 9 recipients are accepted, reach
    the upstream, and are counted."""
    accounts = AccountStore(cluster_client)
    first_id, second_id = await ids_on_distinct_masters(cluster_client, 2)
    limits = {"a@kw.test": 15, "b@kw.test": 9}
    await add_user(accounts, "a@kw.test", limit=15, user_id=first_id)
    await add_user(accounts, "b@kw.test", limit=9, user_id=second_id)

    settings = {"RELAY_REDIS_URL": cluster.url,
                "RELAY_UPSTREAM_URL": f"smtp://127.0.0.1:{upstream.port}"}
    relays = [RelayProcess(tmp_path, name, **settings) for name in ("relay1", "relay2")]
    try:
        for relay in relays:
            await asyncio.to_thread(relay.wait_listening)

        async def send(relay: RelayProcess, sender: str, i: int) -> int:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False,
                                     local_hostname="client.test", timeout=60)
            async with client:
                await client.login(sender, PASSWORD)
                try:
                    errors, _ = await client.sendmail(
                        sender, [f"x{i}@example.test", f"y{i}@example.test"], message(sender))
                except aiosmtplib.SMTPRecipientsRefused as refused:
                    assert {r.code for r in refused.recipients} == {550}
                    return 0
            assert all(error.code == 550 for error in errors.values()), errors
            return 2 - len(errors)

        # First one message per user through each relay, one after another, so that both
        # relays deliver whatever the race below does (the first to start may take it all).
        warm = {sender: [await send(relay, sender, 100 + n) for n, relay in enumerate(relays)]
                for sender in limits}
        assert warm == {sender: [2, 2] for sender in limits}
        tasks = [send(relays[i % 2], sender, i) for sender in limits for i in range(40)]
        accepted = await asyncio.gather(*tasks)
        per_user = {sender: 4 + sum(accepted[n * 40:(n + 1) * 40])
                    for n, sender in enumerate(limits)}
        assert per_user == limits
        delivered = {sender: sum(len(m.rcpt_tos) for m in upstream.messages
                                 if m.mail_from == sender) for sender in limits}
        assert delivered == limits
        quota = QuotaStore(cluster_client)
        for user_id, limit in ((first_id, 15), (second_id, 9)):
            usage = await quota.usage(user_id, current_period())
            assert (usage.used, usage.delivered) == (limit, limit)
        # Both relays delivered (the warm-up made sure of it).
        for relay in relays:
            assert delivered_here(relay.log), relay.log[-2000:]
    finally:
        for relay in relays:
            await asyncio.to_thread(relay.stop)
    for relay in relays:
        assert relay.process.returncode == 0, relay.log
        assert "Traceback" not in relay.log


def current_period() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def delivered_here(text: str) -> bool:
    """Some message was delivered through this relay (its canonical delivery.finished line)."""
    return any(entry.get("event") == "delivery.finished" and entry.get("outcome") == "delivered"
               for entry in map(json.loads, (line for line in text.splitlines()
                                             if line.startswith("{"))))


# -- every store on the cluster -----------------------------------------------------------------
async def test_cluster_quota_scripts_run_on_each_master_and_reload_after_script_flush(
        cluster_client: RedisCluster) -> None:
    """reserve/commit/refund run on the master owning each user (loading the script there on
    first use), and again after every master forgot its scripts (SCRIPT FLUSH)."""
    accounts = AccountStore(cluster_client)
    quota = QuotaStore(cluster_client)
    ids = await ids_on_distinct_masters(cluster_client, 3)
    for n, user_id in enumerate(ids):
        await add_user(accounts, f"agent{n}@kw.test", limit=2, user_id=user_id)
    for round_no in range(2):
        for user_id in ids:
            txn = f"t{round_no}"
            assert (await quota.reserve(user_id, "2026-11", txn, 1, PLANS)).status \
                is ReserveStatus.RESERVED
            assert (await quota.refund(user_id, "2026-11", txn, [1])).units == 1
            assert (await quota.reserve(user_id, "2026-11", txn, [2, 3], PLANS)).status \
                is ReserveStatus.RESERVED
            assert (await quota.commit(user_id, "2026-11", txn)).units == 2
            assert (await quota.reserve(user_id, "2026-11", txn, 4, PLANS)).status \
                is ReserveStatus.OVER_LIMIT
            await cluster_client.delete(keys.usage(user_id, "2026-11"))
        await cluster_client.script_flush()  # on every master
    assert len({await owner(cluster_client, keys.user(u)) for u in ids}) == 3


async def test_cluster_suppression_checked_on_each_master(
        cluster_client: RedisCluster, make_relay: RelayFactory, upstream: CapturingUpstream,
        ) -> None:
    """The suppression list on a cluster: reserve.lua reads each user's own list in the
    user's slot on three masters; the global list (a slot of its own) and both scopes in one
    pipeline across slots answer; and a relay on the cluster refuses a user's and a global
    entry at RCPT with their replies, delivering the rest, counting nothing but the
    refusals."""
    accounts = AccountStore(cluster_client)
    quota = QuotaStore(cluster_client)
    store = SuppressionStore(cluster_client)
    ids = await ids_on_distinct_masters(cluster_client, 3)
    for n, user_id in enumerate(ids):
        await add_user(accounts, f"agent{n}@kw.test", limit=5, user_id=user_id)
        await store.add("gone@example.test", user_id=user_id,
                        reason=SuppressionReason.UNSUBSCRIBE, source="test")
    await store.add("bounced@example.test", user_id=None, reason=SuppressionReason.BOUNCE,
                    source="test")
    for user_id in ids:
        result = await quota.reserve(user_id, "2026-11", "t", 1, PLANS,
                                     recipient="gone@example.test")
        assert (result.status, result.suppressed) == (ReserveStatus.SUPPRESSED,
                                                      SuppressionReason.UNSUBSCRIBE)
        found = await store.check_many(["gone@example.test", "bounced@example.test",
                                        "kept@example.test"], user_id=user_id)
        assert {a: e.scope for a, e in found.items()} == {
            "gone@example.test": user_id, "bounced@example.test": GLOBAL}
        await quota.count_suppressed(user_id, "2026-11", [SuppressionReason.BOUNCE])
        usage = await quota.usage(user_id, "2026-11")
        assert (usage.used, usage.suppressed) == (0, 2)

    relay: RelayApp = await make_relay(upstream=upstream, redis=cluster_client)
    async with smtp_client(relay, login="agent0@kw.test") as client:
        refused, _ = await client.sendmail(
            "agent0@kw.test", ["gone@example.test", "bounced@example.test",
                               "kept@example.test"], message("agent0@kw.test"))
    assert {a: f"{r.code} {r.message}" for a, r in refused.items()} == {
        "gone@example.test": "550 5.7.1 Recipient has unsubscribed from this sender",
        "bounced@example.test": "550 5.7.1 Recipient address bounced permanently before"}
    assert [m.rcpt_tos for m in upstream.messages] == [["kept@example.test"]]
    usage = await quota.usage(ids[0], "2026-11")  # the relay's clock: November 2026
    assert (usage.used, usage.delivered, usage.suppressed) == (1, 1, 4)


class Recording:
    """A notification channel that records what it is given and fails on request."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.delivered: list[Event] = []

    async def deliver(self, event: Event) -> None:
        if self.fail:
            raise DeliveryError("refused", permanent=True)
        self.delivered.append(event)


async def test_cluster_admin_events_notifier_and_credentials(
        cluster_client: RedisCluster, tmp_path: Path) -> None:
    """Admin operations (add with senders, a refused add rolled back across slots, disable,
    plan change, usage, history), the event stream with the notifier's group, acks and dead
    letters re-queued, and sealed credentials: all on the cluster."""
    policies = load_policies(POLICIES)
    credentials = CredentialStore(cluster_client, Fernet.generate_key())
    admin = Admin(cluster_client, policies, SystemClock(), "UTC", credentials)
    one = await admin.add_user("one@kw.test", senders=("one@other.test",),
                               password="pw-one-long-enough")
    # The second user's claim collides on its last address: the addresses it claimed first
    # (other slots) are released again by one multi-key DEL across slots.
    with pytest.raises(AdminError, match="already belongs"):
        await admin.add_user("two@kw.test", senders=("aaa@kw.test", "one@other.test"))
    assert await admin.accounts.find_user("aaa@kw.test") is None
    assert await admin.accounts.find_user("two@kw.test") is None
    assert (await admin.find("one@other.test")).id == one.id
    assert not (await admin.set_status(one.email, active=False)).active
    assert (await admin.set_status(one.email, active=True)).active

    change = await admin.change_plan(one.email, "pro", by="test")
    assert (change["outcome"], change["new_limit"]) == ("upgrade", 25000)
    assert [h["new_plan"] for h in await admin.plan_history(one.email)] == ["pro"]
    report = await admin.usage(one.email)
    assert (report["plan"], report["used"], len(report["history"])) == ("pro", 0, 6)
    assert [r["email"] for r in await admin.usage_all()] == ["one@kw.test"]

    await admin.save_credentials(one.email, "mailchimp", "mc-user", "mc-secret")
    loaded = await credentials.load(one.id, "mailchimp")
    assert loaded == RouteCredentials("mc-user", "mc-secret")

    log = EventLog(cluster_client)
    good = new_event(THRESHOLD, one.id, email=one.email, percent=80)
    await log.publish(good)
    kinds = [e.kind for _, e in await log.recent(10)]
    assert kinds == ["plan.changed", THRESHOLD]

    policy = policies.notifications
    in_app, email = Recording("in_app"), Recording("email", fail=True)
    worker = Notifier(cluster_client, {"in_app": in_app, "email": email}, policy,
                      consumer="n1")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await wait_for(lambda: len(in_app.delivered) == 2, 20)
        await wait_for(lambda: _dead_count(log, 1), 20)
        email.fail = False
        assert await log.retry(None) == 1  # re-queued for the channel that failed
        await wait_for(lambda: len(email.delivered) == 1, 20)
    finally:
        stop.set()
        await task
    assert email.delivered[0].id == good.id
    assert await log.dead() == []


async def _dead_count(log: EventLog, count: int) -> bool:
    return len(await log.dead()) == count


# -- the CLI ---------------------------------------------------------------------------------------
async def test_cluster_cli_check_config_users_and_usage(cluster: RedisClusterNodes,
                                                        cluster_client: RedisCluster,
                                                        tmp_path: Path) -> None:
    """`check-config`, `users add` and `usage --all` run against a redis+cluster:// URL."""
    env = clean_env(metrics_ports=False)
    env.update(RELAY_REDIS_URL=cluster.url, RELAY_POLICIES_DIR=str(POLICIES),
               RELAY_STATE_DIR=str(tmp_path / "state"))

    def run(*args: str, stdin: str = "") -> str:
        result = subprocess.run([sys.executable, "-m", "relay", *args], env=env, input=stdin,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result.stdout

    await asyncio.to_thread(run, "check-config")
    await asyncio.to_thread(run, "users", "add", "cli@kw.test", "--password-stdin",
                            stdin="a-long-password\n")
    listing = await asyncio.to_thread(run, "usage", "--all", "--json")
    assert "cli@kw.test" in listing
    user = await AccountStore(cluster_client).find_user("cli@kw.test")
    assert user is not None and user.plan == "free"


# -- bulk onboarding -------------------------------------------------------------------------------
async def test_cluster_users_import_writes_claims_and_releases_on_every_master(
        cluster: RedisClusterNodes, cluster_client: RedisCluster, tmp_path: Path) -> None:
    """`users import` on a redis+cluster:// URL: users on different masters are created,
    updated (a plan change, a sender swapped: released on its own slot) and then unchanged,
    and an address another user owns is refused there too (relay/identity/bulk.py's
    pipelines and scripts route by key)."""
    env = clean_env(metrics_ports=False)
    env.update(RELAY_REDIS_URL=cluster.url, RELAY_POLICIES_DIR=str(POLICIES),
               RELAY_STATE_DIR=str(tmp_path / "state"))
    ids = await ids_on_distinct_masters(cluster_client, 3)
    path = tmp_path / "agents.csv"

    def run(*lines: str) -> dict[str, object]:
        path.write_text("email,id,plan,senders\n" + "\n".join(lines) + "\n")
        result = subprocess.run([sys.executable, "-m", "relay", "users", "import",
                                 str(path), "--json"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert "Traceback" not in result.stderr
        summary: dict[str, object] = json.loads(result.stdout)
        return summary

    first = await asyncio.to_thread(
        run, *(f"a{n}@kw.test,{uid},free,s{n}@kw.test" for n, uid in enumerate(ids)),
        "x@kw.test,u-x,free,s0@kw.test")
    assert (first["created"], first["refused"]) == (3, 1)
    assert first["refusals"] == [{"line": 5, "reason": f"address s0@kw.test already "
                                                       f"belongs to user {ids[0]}"}]
    second = await asyncio.to_thread(
        run, *(f"a{n}@kw.test,{uid},pro,t{n}@kw.test" for n, uid in enumerate(ids)))
    assert second["updated"] == 3
    accounts = AccountStore(cluster_client)
    for n, uid in enumerate(ids):
        user = await accounts.find_user(f"t{n}@kw.test")
        assert user is not None and (user.id, user.plan) == (uid, "pro")
        assert await accounts.find_user(f"s{n}@kw.test") is None
    third = await asyncio.to_thread(
        run, *(f"a{n}@kw.test,{uid},pro,t{n}@kw.test" for n, uid in enumerate(ids)))
    assert third["unchanged"] == 3
