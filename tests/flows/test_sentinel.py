"""Redis Sentinel and replica acknowledgements (RELAY_REDIS_WAIT_REPLICAS) on real processes.

A master with two replicas and three sentinels (quorum 2, down after 1 s): ``serve`` with a
``redis+sentinel://`` URL and WAIT 1 keeps sending while the master is SIGKILLed, answers 4xx
until the sentinels promote a replica, then sends again, and the new master's count covers
every recipient the client was told 250 for, never more than the limit. And with one replica
and WAIT 1, a reservation the replica cannot acknowledge is refused with a 451 and given back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiosmtplib
import pytest
from structlog.testing import capture_logs

from relay.decisions.quota import QuotaStore
from relay.identity.accounts import AccountStore
from relay.store.client import RedisClient, close_redis, connect_redis
from tests.conftest import (
    PASSWORD,
    CapturingUpstream,
    RelayFactory,
    add_user,
    message,
    smtp_client,
    wait_for,
)
from tests.redis_topology import RedisProcess, RelayProcess, SentinelSetup

# Forming the topology, a failover and a refill of the quota, with room for a loaded machine.
pytestmark = pytest.mark.timeout(180)

SENDER = "agent@kw.test"


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path / "redis", replicas=2, sentinels=3)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.fixture
async def sentinel_client(sentinels: SentinelSetup) -> AsyncIterator[RedisClient]:
    client = connect_redis(sentinels.url, timeout=2)
    yield client
    await close_redis(client)


@dataclass(frozen=True)
class Attempt:
    started: float  # time.monotonic() when the session began
    outcome: str    # accepted, temporary (4xx), over_limit (550)
    code: int


async def attempt(port: int, n: int) -> Attempt:
    """One session, one message, one recipient; the outcome as the client saw it. Anything
    other than 250, a 4xx or the over-limit 550 fails the test."""
    started = time.monotonic()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                             local_hostname="client.test", timeout=30)
    try:
        async with client:
            await client.login(SENDER, PASSWORD)
            await client.sendmail(SENDER, [f"r{n}@example.test"], message())
    except aiosmtplib.SMTPRecipientsRefused as refused:
        code = refused.recipients[0].code
        assert code == 550 or 400 <= code < 500, refused
        return Attempt(started, "over_limit" if code == 550 else "temporary", code)
    except aiosmtplib.SMTPResponseException as exc:
        # AUTH (454), MAIL FROM, RCPT or DATA answered 4xx while Redis had no master.
        assert 400 <= exc.code < 500, exc
        return Attempt(started, "temporary", exc.code)
    return Attempt(started, "accepted", 250)


def log_events(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_sentinel_failover_relay_recovers_with_no_over_limit_send(
        sentinels: SentinelSetup, sentinel_client: RedisClient, upstream: CapturingUpstream,
        tmp_path: Path) -> None:
    """Three clients keep sending (limit 30, WAIT 1). The replicas fall behind (stopped, with
    a 16 MB write queued behind them), then the master is SIGKILLed, losing what they had
    not received: nothing was accepted meanwhile, the relay answers 4xx until the sentinels
    promote a replica, then sends again up to the 550 at the limit. Every recipient the client
    was told 250 for reached the upstream and is in the new master's count, which never
    exceeds the limit. (Without WAIT, the sends made while the replicas lagged are lost from
    the count and the user goes over the limit: this test fails with
    RELAY_REDIS_WAIT_REPLICAS=0.)"""
    limit = 30
    user = await add_user(AccountStore(sentinel_client), SENDER, limit=limit)
    relay = RelayProcess(tmp_path, "relay", RELAY_REDIS_URL=sentinels.url,
                         RELAY_REDIS_WAIT_REPLICAS="1", RELAY_REDIS_TIMEOUT="1",
                         RELAY_UPSTREAM_URL=f"smtp://127.0.0.1:{upstream.port}")
    attempts: list[Attempt] = []
    stop = asyncio.Event()

    async def keep_sending(worker: int) -> None:
        n = 0
        while not stop.is_set():
            result = await attempt(relay.port, worker * 10_000 + n)
            attempts.append(result)
            n += 1
            if result.outcome != "accepted":
                await asyncio.sleep(0.05)

    def since(moment: float, outcome: str | None = None) -> list[Attempt]:
        return [a for a in attempts if a.started >= moment
                and (outcome is None or a.outcome == outcome)]

    old_host, old_port = sentinels.master_address()
    master = sentinels.process_at(old_port)
    try:
        await asyncio.to_thread(relay.wait_listening)
        workers = [asyncio.create_task(keep_sending(w)) for w in range(3)]
        try:
            await wait_for(lambda: len(since(0, "accepted")) >= 8, 60)
            # The replicas stop reading; 16 MB fill the socket buffers towards them, so what
            # the master writes next stays in its own memory, lost when it is killed.
            for replica in sentinels.replicas:
                replica.pause()
            lagging_from = time.monotonic()
            filler = master.client(10)
            try:
                await asyncio.to_thread(filler.set, "filler", "x" * (16 << 20))
            finally:
                filler.close()
            await wait_for(lambda: len(since(lagging_from)) >= 6, 60)
            await asyncio.to_thread(master.kill)
            killed_at = time.monotonic()
            for replica in sentinels.replicas:
                replica.resume()

            async def promoted() -> bool:
                found = await asyncio.to_thread(sentinels.master_address)
                return found != (old_host, old_port)

            await wait_for(promoted, 60)
            failed_over_at = time.monotonic()
            await wait_for(lambda: len(since(failed_over_at, "accepted")) >= 1, 60)
            await wait_for(lambda: len(since(failed_over_at, "over_limit")) >= 1, 60)
        finally:
            stop.set()
            await asyncio.gather(*workers)
    finally:
        await asyncio.to_thread(relay.stop)

    accepted = len(since(0, "accepted"))
    # While no replica could acknowledge, and while there was no master, the relay answered
    # 4xx: never a 250 for a send a failover could lose.
    assert since(lagging_from, "temporary")
    lagging = [a for a in since(lagging_from) if a.started < killed_at]
    assert lagging and not [a for a in lagging if a.outcome == "accepted"], lagging
    assert since(killed_at, "temporary")
    # Every 250 is a delivery, and no more than the limit were delivered.
    assert sum(len(m.rcpt_tos) for m in upstream.messages) == accepted
    assert accepted <= limit
    # The new master counts every delivered recipient: none was lost in the failover.
    usage = await QuotaStore(sentinel_client).usage(user.id, datetime.now(UTC).strftime("%Y-%m"))
    assert accepted <= usage.used <= limit
    events = log_events(relay.log)
    assert not [e for e in events if e["event"] == "session.exception"]
    assert any(e["event"] == "quota.unreplicated" for e in events)
    assert relay.process.returncode == 0, relay.log


# -- WAIT without a replica to answer -------------------------------------------------------------
@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[RedisProcess, RedisProcess]]:
    """A master and one replica (no sentinels)."""
    sync = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")
    master = RedisProcess(tmp_path, "master", args=sync)
    master.start()
    replica = RedisProcess(tmp_path, "replica", args=(
        *sync, "--replicaof", "127.0.0.1", str(master.port)))
    try:
        replica.start()
        yield master, replica
    finally:
        replica.kill()
        master.kill()


async def test_wait_replicas_refuses_and_refunds_what_no_replica_acknowledged(
        replicated: tuple[RedisProcess, RedisProcess], make_relay: RelayFactory,
        upstream: CapturingUpstream) -> None:
    """WAIT 1 with the only replica gone: the recipient gets a 451 and its unit is given
    back (logged as quota.unreplicated); with the replica back, mail flows again."""
    master, replica = replicated
    # Generous: on a loaded machine a replica can take a while to acknowledge (WAIT: 2 s).
    client = connect_redis(f"redis://{master.address}/0", timeout=4, wait_replicas=1)
    try:
        user = await add_user(AccountStore(client), SENDER, limit=5)
        relay = await make_relay(upstream=upstream, redis=client)
        quota = QuotaStore(client)
        period = "2026-11"  # the make_relay clock

        async def in_sync() -> bool:
            info = await client.info("replication")
            return bool(info.get("connected_slaves") == 1)

        await wait_for(in_sync, 20)
        async with smtp_client(relay) as smtp:
            errors, _ = await smtp.sendmail(SENDER, ["a@example.test"], message())
        assert errors == {}
        assert (await quota.usage(user.id, period)).used == 1

        await asyncio.to_thread(replica.kill)
        with capture_logs() as logs:
            async with smtp_client(relay) as smtp:
                with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
                    await smtp.sendmail(SENDER, ["b@example.test"], message())
        [(code, text)] = [(r.code, r.message) for r in refused.value.recipients]
        assert code == 451 and text.startswith("4.3.0")
        assert (await quota.usage(user.id, period)).used == 1
        assert [e for e in logs if e["event"] == "quota.unreplicated"]
        assert len(upstream.messages) == 1

        await asyncio.to_thread(replica.start)
        await wait_for(in_sync, 20)
        async with smtp_client(relay) as smtp:
            errors, _ = await smtp.sendmail(SENDER, ["c@example.test"], message())
        assert errors == {}
        usage = await quota.usage(user.id, period)
        assert (usage.used, usage.delivered) == (2, 2)
    finally:
        await close_redis(client)
