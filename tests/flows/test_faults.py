"""Fault scenarios (the standing suite): a bounded load on loopback against real
processes (``command-relay serve``, redis-server, the upstream of tests/upstream_proc.py), a
fault, and the ledger at the end (tests/ledger.py): nothing acknowledged is lost, nothing
counted that was not sent, nothing over the limit sent, and the relay still serves.

CI runs small loads; ``RELAY_TEST_SOAK=1 ./dev test tests/flows/test_faults.py -n 0 -s``
runs the full sizes and prints every scenario's ledger line (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from relay.identity.accounts import AccountStore
from relay.store.client import connect_redis
from tests.conftest import PersistentRedis, RedisServer, add_app, wait_for
from tests.faultkit import (
    LOOPS,
    SOAK,
    Relay,
    Scenario,
    UpstreamProcess,
    soak,
)
from tests.ledger import ClientTxn
from tests.loadclient import (
    Account,
    Conn,
    Load,
    Lost,
    make_message,
    new_ledger_id,
    plain_recipients,
    send_one,
    transact,
)
from tests.serving import Start

# A loaded CI machine makes a scenario of a few seconds take tens; the soak sizes take minutes.
pytestmark = pytest.mark.timeout(1800 if SOAK else 180)


@pytest.fixture
async def scenario(request: pytest.FixtureRequest, serve: Start, redis_server: RedisServer,
                   redis_client: aioredis.Redis, accounts: AccountStore,
                   tmp_path: Path) -> AsyncIterator[Scenario]:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name.removeprefix("test_")).strip("-")
    scenario = Scenario(name, serve, redis_server, redis_client, accounts, tmp_path)
    yield scenario
    await scenario.close()


# -- the upstream refuses ------------------------------------------------------------------
async def test_faults_upstream_refuses_per_recipient_and_at_data(scenario: Scenario) -> None:
    """An upstream answering 4xx and 5xx to some recipients and at DATA, under concurrent
    load, with two users on small limits (one sending directly, decided at RCPT; one through
    the SmartPlans app, decided at the end of DATA, all or nothing): every refusal reaches
    the client with its class, refused units are given back, the small limits hold exactly."""
    upstream = await scenario.upstream(
        "--rule", "t4:rcpt=450 4.2.1 Mailbox busy", "--rule", "p5:rcpt=550 5.1.1 No such user",
        "--rule", "d4:data=451 4.3.0 Try later", "--rule", "d5:data=554 5.6.0 Rejected")
    relay = await scenario.relay(upstream)
    big = await scenario.user("big@kw.test")
    small = await scenario.user("small@kw.test", limit=soak(25, 100))
    planned = await scenario.user("plan@kw.test", limit=soak(21, 81))
    await add_app(scenario.accounts, "smartplans")
    smartplans = Account("smartplans", planned.sender)
    kinds = ["ok", "t4", "p5", "d4", "d5"]
    # The app's kinds: every other message clean, so that its limit is reached on every run.
    app_kinds = ["ok", "t4", "ok", "p5", "ok", "d4", "ok", "d5"]

    def recipients(n: int) -> list[str]:
        return [f"{kinds[n % 5] if k == 0 else 'ok'}{n}-{k}@example.test" for k in range(3)]

    def app_recipients(n: int) -> list[str]:
        return [f"{app_kinds[n % 8] if k == 0 else 'ok'}{n}-{k}@example.test" for k in range(3)]

    load = Load({"relay": relay.port}, [big], transactions=soak(60, 1200), concurrency=4,
                recipients=recipients)
    # Each limited sender has a load of its own: its numbers, and so its kinds, are then the
    # same on every run (30 transactions give the small user 42 units for its 25).
    small_load = Load({"relay": relay.port}, [small], prefix="M",
                      transactions=soak(30, 600), concurrency=2, recipients=recipients)
    app_load = Load({"relay": relay.port}, [smartplans], prefix="S",
                    transactions=soak(30, 600), concurrency=2, recipients=app_recipients)
    await asyncio.gather(load.run(), small_load.run(), app_load.run())
    scenario.records += load.records + small_load.records + app_load.records
    report = await scenario.finish(big)
    expected = {"ok": ([250, 250, 250], 250), "t4": ([450, 250, 250], 250),
                "p5": ([550, 250, 250], 250), "d4": ([250, 250, 250], 451),
                "d5": ([250, 250, 250], 554)}
    for txn in load.records:
        if txn.sender == big.sender:
            codes, data = expected[txn.rcpts[0][0][:2]]
            assert ([c for _, c in txn.rcpts], txn.data_code) == (codes, data), txn
    counts = await scenario.counts()
    small_user, planned_user = scenario.users[1:]
    assert counts[small_user.id].delivered == small_user.limit
    # Whole messages of three up to the limit (a multiple of three), never past it (the
    # ledger checked the upstream too); the app's refused kinds were refused whole.
    assert counts[planned_user.id].delivered == planned_user.limit
    for txn in app_load.records:
        if txn.outcome == "acked":
            assert txn.rcpts[0][0].startswith("ok"), txn
    assert report.over_limit == 0


# -- clients vanishing at every step --------------------------------------------------------
async def _vanish(scenario: Scenario, loop: str, steps: tuple[str, ...]) -> None:
    """``soak(4, 150)`` clients for each step and each way of leaving (FIN, RST), 50 at a
    time, three recipients each; then the ledger: nothing they were told 250 for at DATA
    (none was), nothing counted, nothing left reserved."""
    upstream = await scenario.upstream()
    relay = await scenario.relay(upstream, loop=loop)
    account = await scenario.user("agent@kw.test")
    rcpts = [f"v{k}@example.test" for k in range(3)]
    per = soak(4, 150)
    plan = [(step, reset) for step in steps for reset in (False, True) for _ in range(per)]
    txns: list[ClientTxn] = []
    for start in range(0, len(plan), 50):  # 50 at a time: under the per-address limit
        txns += await asyncio.gather(*(
            send_one(relay.port, account, rcpts, relay=relay.name, prefix=f"{step}-{reset}",
                     vanish=step, reset=reset) for step, reset in plan[start:start + 50]))
    assert all(t.lost_at in steps for t in txns), [t for t in txns if t.lost_at not in steps]
    scenario.records += txns
    await scenario.finish(account)


@pytest.mark.parametrize("loop", LOOPS)
async def test_faults_clients_vanish_before_the_dot(scenario: Scenario, loop: str) -> None:
    """Clients gone mid-RCPT, right after 354 and in the middle of the body (FIN or RST):
    every unit they reserved is refunded, nothing reaches the upstream, no error line."""
    await _vanish(scenario, loop, ("rcpt", "data", "body"))


@pytest.mark.parametrize("loop", LOOPS)
async def test_faults_clients_vanish_right_after_the_dot(scenario: Scenario, loop: str) -> None:
    """Clients that send the final dot and leave at once (FIN or RST): the dot commits the
    message, so the relay finishes the upstream transaction anyway, and counts exactly what
    the upstream accepted (used == delivered == captured)."""
    await _vanish(scenario, loop, ("dot",))


# -- connection floods ----------------------------------------------------------------------
async def _connect_and_leave(port: int, n: int) -> None:
    """A TCP health check or a port scan: connect, maybe read the banner, FIN or RST."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    if n % 3 == 1:
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(reader.readline(), 10)
    if n % 2:
        reset(writer)
    else:
        writer.close()


def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.parametrize("loop", LOOPS)
async def test_faults_connect_and_close_storm(scenario: Scenario, loop: str) -> None:
    """soak(600, 5000) connect-and-close cycles (FIN or RST, with or without reading the
    banner), 30 at a time, while real clients send: every slot and descriptor is given back
    (the per-address limit of 50 would refuse the next client otherwise), the clients'
    mail is delivered and counted exactly."""
    upstream = await scenario.upstream()
    relay = await scenario.relay(upstream, loop=loop, RELAY_MAX_CONNECTIONS_PER_IP="50")
    account = await scenario.user("agent@kw.test")
    # Warm up with the same load, so the Redis and upstream pools have grown already.
    warm = Load({"relay": relay.port}, [account], transactions=12, concurrency=4)
    await warm.run()
    await relay.settled(0)
    baseline = relay.fds
    load = Load({"relay": relay.port}, [account], transactions=soak(60, 1000), concurrency=4,
                per_connection=10)
    cycles = soak(600, 5000)

    async def storm() -> None:
        for start in range(0, cycles, 30):
            await asyncio.gather(*(_connect_and_leave(relay.port, n)
                                   for n in range(start, min(start + 30, cycles))))

    await asyncio.gather(load.run(), storm())
    scenario.records += warm.records + load.records
    await relay.settled(0)
    scenario.extra.update(cycles=cycles, fds_before=baseline, fds_after=relay.fds)
    assert relay.smtp_sockets() == 0
    assert relay.fds <= baseline + 2, (baseline, relay.fds)  # +2: a pool's reconnection
    assert load.acked() == load.done
    await scenario.finish(account)


@pytest.mark.parametrize("loop", LOOPS)
async def test_faults_a_thousand_idle_connections(scenario: Scenario, loop: str) -> None:
    """1,000 connections that are greeted and then say nothing: the relay still serves a
    real client meanwhile, the gauge reads exactly 1,000 of them, and once they leave (half
    FIN, half RST) the gauge and the relay's descriptors are back where they were."""
    idle = soak(1000, 1000)
    upstream = await scenario.upstream()
    relay = await scenario.relay(upstream, loop=loop, RELAY_MAX_CONNECTIONS=str(idle + 50),
                                 RELAY_MAX_CONNECTIONS_PER_IP=str(idle + 50))
    account = await scenario.user("agent@kw.test")
    scenario.records.append(await send_one(relay.port, account, ["warm@example.test"]))
    await relay.settled(0)
    baseline = relay.fds
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for start in range(0, idle, 100):
        batch = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", relay.port)
                                       for _ in range(min(100, idle - start))))
        for reader, _ in batch:
            assert (await asyncio.wait_for(reader.readline(), 20)).startswith(b"220 ")
        held += batch
    await relay.settled(idle)
    assert relay.smtp_sockets() == idle
    scenario.extra.update(idle=idle, fds_before=baseline, fds_idle=relay.fds)
    scenario.records.append(await send_one(relay.port, account, ["busy@example.test"]))
    assert scenario.records[-1].outcome == "acked"
    for n, (_, writer) in enumerate(held):
        if n % 2:
            reset(writer)
        else:
            writer.close()
    await relay.settled(0)
    scenario.extra["fds_after"] = relay.fds
    assert relay.smtp_sockets() == 0
    assert relay.fds <= baseline + 2, (baseline, relay.fds)
    await scenario.finish(account)


# -- slow and big clients -------------------------------------------------------------------
async def _trickle(port: int, account: Account, pace: float, relay: str,
                  after: float) -> ClientTxn:
    """A transaction whose body arrives a few bytes at a time, every ``pace`` seconds, until
    the relay cuts it (its reply is recorded as the DATA reply); it starts ``after``
    seconds (a hundred logins at the same instant would test something else)."""
    await asyncio.sleep(after)
    message = make_message(new_ledger_id("slow"), account.sender, ["s0@example.test",
                                                                   "s1@example.test"])
    conn = await Conn.open(port, relay)
    assert (await conn.login(account))[0] == 235
    txn = ClientTxn(message.ledger_id, account.sender, relay=relay,
                    body_sha256=message.body_sha256)
    assert (await conn.command(f"MAIL FROM:<{account.sender}>", "mail"))[0] == 250
    for rcpt in ("s0@example.test", "s1@example.test"):
        txn.rcpts.append((rcpt, (await conn.command(f"RCPT TO:<{rcpt}>", "rcpt"))[0]))
    assert (await conn.command("DATA", "data"))[0] == 354
    reply = asyncio.ensure_future(conn.reply("dot"))
    try:
        for offset in range(0, len(message.content), 3):
            if reply.done():
                break
            with contextlib.suppress(Lost):
                await conn.write(message.content[offset:offset + 3])
            await asyncio.sleep(pace)
        txn.data_code, txn.data_reply = await reply
    except Lost:
        txn.lost_at = "body"
    conn.drop()
    return txn


@pytest.mark.parametrize("loop", LOOPS)
async def test_faults_slowloris_data(scenario: Scenario, loop: str) -> None:
    """soak(4, 50) bodies trickled 3 bytes every 0.25 s, within the idle timeout (2 s), are
    cut by the transaction timeout (4 s); as many trickled every 3 s, by the idle timeout.
    Each gets 421 4.4.2 and its units back, while a normal load through the same relay is
    served in full."""
    upstream = await scenario.upstream()
    relay = await scenario.relay(upstream, loop=loop, RELAY_IDLE_TIMEOUT="2",
                                 RELAY_TRANSACTION_TIMEOUT="4")
    account = await scenario.user("agent@kw.test")
    # One AUTH first: the scrypt check is then cached, and a hundred slow clients logging
    # in at once do not queue behind a hundred hashes.
    scenario.records.append(await send_one(relay.port, account, ["warm@example.test"]))
    slow = soak(4, 50)
    load = Load({"relay": relay.port}, [account], transactions=soak(40, 400), concurrency=2,
                per_connection=10)
    trickles = asyncio.gather(*(_trickle(relay.port, account, pace, relay.name, n * 0.05)
                                for pace in (0.25, 3.0) for n in range(slow)))
    await load.run()
    cut = await trickles
    assert {(t.data_code, t.data_reply) for t in cut} == {(421, "4.4.2 Timeout, closing "
                                                               "connection")}, cut
    timeouts = await relay.process.wait_event("session.timeout", 2 * slow)
    assert sorted(t["timeout"] for t in timeouts).count("transaction") == slow
    scenario.records += load.records + cut
    assert load.acked() == load.done
    await scenario.finish(account)


@pytest.mark.parametrize("loop", LOOPS)
async def test_faults_concurrent_big_messages(scenario: Scenario, loop: str) -> None:
    """soak(8, 50) clients each sending a soak(2, 20) MB message at once, with an idle
    timeout shorter than the relay's work on them (soak(3, 10) s): all delivered intact,
    acknowledged and counted; the relay's peak RSS is reported (sampled every 50 ms)."""
    count, megabytes = soak(8, 50), soak(2, 20)
    upstream = await scenario.upstream()
    # A pooled upstream connection per message: a message waiting for one would get 451.
    relay = await scenario.relay(upstream, loop=loop, RELAY_IDLE_TIMEOUT=str(soak(3, 10)),
                                 RELAY_UPSTREAM_POOL_SIZE=str(count))
    account = await scenario.user("agent@kw.test")
    scenario.records.append(await send_one(relay.port, account, ["warm@example.test"]))
    baseline = peak = relay.rss
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, relay.rss)
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    lines = megabytes * 1024 * 1024 // 1000
    txns = await asyncio.gather(*(send_one(relay.port, account, [f"big{n}@example.test"],
                                           relay=relay.name, prefix="big", lines=lines,
                                           line_length=998, seconds=300)
                                  for n in range(count)))
    done.set()
    await sampler
    scenario.records += txns
    assert [t.outcome for t in txns] == ["acked"] * count, [t for t in txns
                                                            if t.outcome != "acked"]
    in_flight = count * megabytes * 1024 * 1024
    scenario.extra.update(messages=count, megabytes=megabytes, rss_before_mb=baseline >> 20,
                          rss_peak_mb=peak >> 20,
                          rss_growth_per_byte=round((peak - baseline) / in_flight, 2))
    await scenario.finish(account)


@pytest.mark.parametrize("loop", LOOPS)
async def test_faults_ten_megabyte_header_line(scenario: Scenario, loop: str) -> None:
    """A message with one 10 MB header line gets 500 5.5.6 after its dot (no hang, no
    crash), nothing is forwarded or counted, and the same connection sends the next one."""
    upstream = await scenario.upstream()
    relay = await scenario.relay(upstream, loop=loop)
    account = await scenario.user("agent@kw.test")
    conn = await Conn.open(relay.port, relay.name, seconds=120)
    assert (await conn.login(account))[0] == 235
    rcpts = ["h0@example.test", "h1@example.test"]
    huge = make_message(new_ledger_id("header"), account.sender, rcpts,
                        header_line=10 * 1024 * 1024)
    txn = await transact(conn, account, rcpts, huge)
    assert (txn.data_code, txn.data_reply) == (500, "5.5.6 Line too long (see RFC 5321 "
                                                    "4.5.3.1.6)"), txn
    after = make_message(new_ledger_id("after"), account.sender, rcpts)
    scenario.records += [txn, await transact(conn, account, rcpts, after)]
    assert scenario.records[-1].outcome == "acked"
    await conn.quit()
    await relay.process.wait_event("data.refused", reason="line_too_long")
    await scenario.finish(account)


async def test_faults_ten_thousand_recipients(scenario: Scenario) -> None:
    """soak(1,000, 10,000) RCPTs pipelined into one transaction: the first
    RELAY_MAX_RECIPIENTS (500) get 250 and the rest 452 4.5.3; a user with 300 sends left
    gets 300 and over-limit 550s for the rest. Every RCPT answered, DATA delivered to
    exactly the accepted ones, counts exact."""
    upstream = await scenario.upstream()
    relay = await scenario.relay(upstream)
    plenty = await scenario.user("plenty@kw.test")
    few = await scenario.user("few@kw.test", limit=300)
    count = soak(1_000, 10_000)
    rcpts = [f"m{n}@example.test" for n in range(count)]
    many = await send_one(relay.port, plenty, rcpts, relay=relay.name, prefix="many",
                          pipeline=True, seconds=120)
    capped = await send_one(relay.port, few, rcpts, relay=relay.name, prefix="capped",
                            pipeline=True, seconds=120)
    assert Counter(c for _, c in many.rcpts) == {250: 500, 452: count - 500}
    assert Counter(c for _, c in capped.rcpts) == {250: 300, 550: count - 300}
    assert (many.outcome, capped.outcome) == ("acked", "acked")
    scenario.records += [many, capped]
    scenario.extra["rcpts_per_transaction"] = count
    report = await scenario.finish(plenty)
    assert report.upstream_rcpts == 800 + 1


# -- the upstream fails ---------------------------------------------------------------------
async def test_faults_upstream_refusing_connections(scenario: Scenario) -> None:
    """Nothing listens on the upstream's port: every MAIL FROM gets 451 4.4.1 and nothing is
    counted; once the upstream starts, the same relay delivers, without a restart."""
    upstream = UpstreamProcess(scenario.workdir)  # its port, not yet listening
    scenario.upstreams.append(upstream)
    relay = await scenario.relay(upstream)
    account = await scenario.user("agent@kw.test")
    load = Load({"relay": relay.port}, [account], transactions=10**6, concurrency=4,
                max_seconds=50)
    running = scenario.run(load)
    await load.more(done=soak(20, 300))
    assert load.acked() == 0
    assert {t.data_code for t in load.records} == {None}
    await upstream.start()
    await load.more(acked=soak(20, 300))
    load.stop()
    await running
    scenario.records += load.records
    unreachable = relay.process.events("mail.refused", reason="UpstreamUnavailableError")
    assert len(unreachable) >= soak(20, 300)
    await scenario.finish(account)


async def test_faults_upstream_killed_mid_load(scenario: Scenario) -> None:
    """The upstream is SIGKILLed under load and restarted on its port, soak(2, 10) times:
    what a client was told 250 for is on the upstream; a transaction cut inside DATA gets
    451 4.4.2 (the outcome is unknown, so its units stay counted: high by what was in
    flight, never low)."""
    upstream = await scenario.upstream()
    relay = await scenario.relay(upstream)
    account = await scenario.user("agent@kw.test")
    load = Load({"relay": relay.port}, [account], transactions=10**6, concurrency=8,
                max_seconds=50)
    running = scenario.run(load)
    for _ in range(soak(2, 10)):
        await load.more(acked=20)
        upstream.kill()
        await load.more(refused=10)
        await upstream.start()
    await load.more(acked=20)
    load.stop()
    await running
    scenario.records += load.records
    await scenario.finish(account, crash=True)


async def test_faults_upstream_takes_data_and_never_answers(scenario: Scenario) -> None:
    """An upstream that takes some messages and never answers their DATA: after
    RELAY_UPSTREAM_TIMEOUT (2 s) those clients get 451 4.4.2 (no hang), their units stay
    counted (the upstream may have them), the other messages go through the same pool."""
    upstream = await scenario.upstream("--rule", "hang:data=hang")
    relay = await scenario.relay(upstream, RELAY_UPSTREAM_TIMEOUT="2",
                                 # more connections than clients: a clean message never
                                 # waits for one that a hung message holds
                                 RELAY_UPSTREAM_POOL_SIZE="8")
    account = await scenario.user("agent@kw.test")

    def recipients(n: int) -> list[str]:
        return [f"{'hang' if n % 10 == 3 else 'ok'}{n}-{k}@example.test" for k in range(2)]

    load = Load({"relay": relay.port}, [account], transactions=soak(60, 600), concurrency=6,
                recipients=recipients)
    await load.run()
    scenario.records += load.records
    hung = [t for t in load.records if t.rcpts[0][0].startswith("hang")]
    assert hung and all(t.data_reply.startswith("4.4.2 Upstream connection lost")
                        for t in hung), hung
    assert all(t.outcome == "acked" for t in load.records if t not in hung)
    report = await scenario.finish(account, crash=True)  # undelivered <= in flight
    assert report.in_flight == 2 * len(hung)


# -- Redis fails ----------------------------------------------------------------------------
async def _commit_while_redis_is_away(upstream: UpstreamProcess, relay: Relay,
                                      account: Account,
                                      fault: Callable[[], Awaitable[None]]) -> ClientTxn:
    """Hold the upstream's DATA reply to one message, cut Redis off (``fault``) once the
    upstream has it, then let the upstream say 250: the relay's commit meets the fault.
    Returns that transaction (acknowledged). The load's own messages are not held."""
    upstream.hold("held")
    sent = asyncio.ensure_future(send_one(relay.port, account, ["held@example.test"],
                                          relay=relay.name, prefix="held"))
    await upstream.wait_event("data.received", ledger_prefix="held")
    await fault()
    upstream.release()
    txn = await sent
    assert txn.outcome == "acked", txn
    return txn


async def test_faults_redis_killed_and_restarted(
        serve: Start, persistent_redis: PersistentRedis, tmp_path: Path) -> None:
    """Redis SIGKILLed under load (one commit meets the outage for sure) and restarted on
    its port: meanwhile clients get 4xx (454 at AUTH, 451 at MAIL/RCPT/DATA), the relay
    resumes by itself, and once Redis is back the ledger is exact."""
    client = connect_redis(persistent_redis.url, timeout=2)
    scenario = Scenario("faults_redis_killed_and_restarted", serve, persistent_redis,
                        client, AccountStore(client), tmp_path)
    try:
        upstream = await scenario.upstream()
        relay = await scenario.relay(upstream, RELAY_REDIS_TIMEOUT="1")
        account = await scenario.user("agent@kw.test")
        load = Load({"relay": relay.port}, [account], transactions=10**6, concurrency=6,
                    max_seconds=50)
        running = scenario.run(load)
        await load.more(acked=20)

        async def kill() -> None:
            persistent_redis.stop()

        held = await _commit_while_redis_is_away(upstream, relay, account, kill)
        await load.more(refused=soak(20, 200))
        persistent_redis.start()
        await load.more(acked=soak(20, 300))
        load.stop()
        await running
        scenario.records += [*load.records, held]
        await scenario.finish(account, settle_seconds=6)
    finally:
        await scenario.close()
        await client.aclose()


async def test_faults_redis_paused(scenario: Scenario, redis_server: RedisServer) -> None:
    """Redis paused (CLIENT PAUSE ALL, 3 x RELAY_REDIS_TIMEOUT) under load: each SMTP step
    answers within about the timeout (never twice it), the commit that meets the pause is
    made good once Redis answers again, and the ledger is exact."""
    timeout = 2.0  # long enough that the machine's own delays stay well below the bound
    upstream = await scenario.upstream()
    relay = await scenario.relay(upstream, RELAY_REDIS_TIMEOUT=str(timeout))
    account = await scenario.user("agent@kw.test")
    load = Load({"relay": relay.port}, [account], transactions=10**6, concurrency=6,
                max_seconds=50)
    running = scenario.run(load)
    await load.more(acked=20)
    pauser = aioredis.Redis(port=redis_server.port)

    async def pause() -> None:
        await pauser.execute_command("CLIENT", "PAUSE", int(3 * timeout * 1000), "ALL")

    try:
        held = await _commit_while_redis_is_away(upstream, relay, account, pause)
    finally:
        await pauser.aclose()
    await load.more(acked=soak(20, 300))
    load.stop()
    await running
    scenario.records += [*load.records, held]
    slowest = {step: round(s, 2) for step, s in load.stats.slowest.items()}
    scenario.extra["slowest_step_s"] = slowest
    report = await scenario.finish(account, settle_seconds=6, check=False)
    problems = report.problems()
    for relay_ in scenario.relays:
        problems += relay_.log_problems()
    # A step may take the timeout once (plus the machine's own delays), never twice.
    problems += [f"{step} took {s} s" for step, s in slowest.items() if s > 1.5 * timeout]
    assert not problems, f"{report.summary()}\n" + "\n".join(problems)


# -- a relay dies ---------------------------------------------------------------------------
async def test_faults_one_of_two_relays_killed(scenario: Scenario) -> None:
    """Two relays on one Redis share the load, one user on a small limit; one relay is
    SIGKILLed mid-load: the other carries on, the small limit holds across both, and the
    count is high by at most what the dead relay had in flight."""
    upstream = await scenario.upstream()
    first = await scenario.relay(upstream, name="relay-a")
    second = await scenario.relay(upstream, name="relay-b")
    big = await scenario.user("big@kw.test")
    small = await scenario.user("small@kw.test", limit=soak(40, 200))
    load = Load({"relay-a": first.port, "relay-b": second.port}, [big, small],
                transactions=10**6, concurrency=8, max_seconds=50,
                recipients=plain_recipients(3))
    running = scenario.run(load)
    await load.more(acked=soak(20, 300))
    first.kill()
    await load.more(acked=soak(20, 300))
    small_user = scenario.users[1]

    async def small_at_its_limit() -> bool:  # its share of the load is the clients' race
        return (await scenario.counts())[small_user.id].used >= small_user.limit
    await wait_for(small_at_its_limit, 30)
    load.stop()
    await running
    scenario.records += load.records
    cut = [t for t in load.records if t.relay == "relay-a" and t.outcome in {"cut",
                                                                             "uncertain"}]
    scenario.extra["cut_on_the_dead_relay"] = len(cut)
    report = await scenario.finish(big, crash=True)
    assert report.over_limit == 0
    assert (await scenario.counts())[small_user.id].used == small_user.limit
