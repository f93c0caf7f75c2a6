"""The hot path's Redis calls (relay/store/hot.py) against a real redis-server of each test's
own: the right reply for every call, also after a timeout, a cancellation, a restart and a
flushed script cache; the pool's bookkeeping whole after each; redis-py's way for what the
hot path does not take. Lower bounds only where time is involved: a stopped server answers
nothing, so a call to it times out whatever the machine's speed."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from relay.store import hot
from relay.store.client import connect_redis
from tests.conftest import RedisServer

ECHO = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    own = RedisServer(tmp_path / "redis")
    own.start()
    yield own
    own.stop()


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    found = connect_redis(server.url, timeout=0.5)
    assert isinstance(found, aioredis.Redis)
    yield found
    await found.aclose()


def _pool(client: aioredis.Redis) -> hot.HotPathPool:
    pool = client.connection_pool
    assert isinstance(pool, hot.HotPathPool)
    return pool


def _settled(client: aioredis.Redis) -> None:
    """Every connection back in the pool: none left marked in use."""
    assert _pool(client)._in_use_connections == set()


async def test_a_relay_client_takes_the_hot_path(client: aioredis.Redis) -> None:
    assert hot.hot_path(client) is not None
    script = hot.register_script(client, ECHO)
    for n in range(1, 4):
        assert await script(keys=["k"], args=["v"]) == ["k", "v", n]
    await client.hset("h", "f", "x")
    assert await hot.hget(client, "h", "f") == "x"
    assert await hot.hget(client, "h", "missing") is None
    _settled(client)
    # One call at a time needs one connection, reused.
    assert len(_pool(client)._available_connections) == 1


async def test_a_flushed_script_cache_is_loaded_again(client: aioredis.Redis) -> None:
    script = hot.register_script(client, ECHO)
    assert await script(keys=["k"], args=["a"]) == ["k", "a", 1]
    await client.script_flush()
    assert await script(keys=["k"], args=["b"]) == ["k", "b", 2]
    _settled(client)


async def test_an_error_reply_is_raised_and_the_connection_kept(
        client: aioredis.Redis) -> None:
    failing = hot.register_script(client, "return redis.error_reply('BROKEN on purpose')")
    with pytest.raises(redis.exceptions.ResponseError, match="BROKEN on purpose"):
        await failing()
    _settled(client)
    assert await hot.hget(client, "h", "f") is None  # the same connection, still in step


async def test_a_stopped_server_times_out_and_no_late_reply_is_misread(
        server: RedisServer, client: aioredis.Redis) -> None:
    await client.set("first", "1")
    await client.set("second", "2")
    script = hot.register_script(client, "return redis.call('GET', KEYS[1])")
    assert await script(keys=["first"]) == "1"
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(redis.exceptions.TimeoutError):
            await script(keys=["first"])
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    _settled(client)
    # The server answers the first GET once it runs again, on a connection now closed: the
    # next call reads its own reply.
    assert await script(keys=["second"]) == "2"
    _settled(client)


async def test_a_cancelled_call_leaves_no_reply_behind(
        server: RedisServer, client: aioredis.Redis) -> None:
    await client.set("first", "1")
    await client.set("second", "2")
    assert await hot.hget(client, "nothing", "f") is None
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        call = asyncio.ensure_future(client.get("first"))  # redis-py's way, to start one
        hung = asyncio.ensure_future(hot.hget(client, "nothing", "f"))
        await asyncio.sleep(0.05)
        hung.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hung
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    _settled(client)
    script = hot.register_script(client, "return redis.call('GET', KEYS[1])")
    assert await script(keys=["second"]) == "2"
    assert await client.get("first") == "1"


async def test_a_restarted_server_is_reached_again_at_once(
        server: RedisServer, client: aioredis.Redis) -> None:
    script = hot.register_script(client, ECHO)
    assert await script(keys=["k"], args=["a"]) == ["k", "a", 1]
    server.stop()
    with pytest.raises(redis.exceptions.ConnectionError):
        await script(keys=["k"], args=["b"])
    _settled(client)
    server.start()  # same port, empty, no scripts: the broken connection is tried again
    assert await script(keys=["k"], args=["c"]) == ["k", "c", 1]
    _settled(client)


async def test_a_full_pool_waits_for_a_connection(server: RedisServer) -> None:
    small = aioredis.Redis.from_pool(hot.HotPathPool.from_url(
        server.url, max_connections=3, timeout=2, decode_responses=True, socket_timeout=2))
    try:
        script = hot.register_script(small, "return ARGV[1]")
        results = await asyncio.gather(*(script(args=[str(n)]) for n in range(200)))
        assert results == [str(n) for n in range(200)]
        _settled(small)
        assert len(_pool(small)._available_connections) <= 3
    finally:
        await small.aclose()


async def test_other_clients_and_pipelines_take_redis_pys_way(server: RedisServer,
                                                              client: aioredis.Redis) -> None:
    plain = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        assert hot.hot_path(plain) is None
        script = hot.register_script(plain, ECHO)
        assert await script(keys=["p"], args=["x"]) == ["p", "x", 1]
    finally:
        await plain.aclose()
    script = hot.register_script(client, ECHO)
    async with client.pipeline(transaction=False) as pipe:
        await script(keys=["q"], args=["y"], client=pipe)
        assert await pipe.execute() == [["q", "y", 1]]


async def _reads(client: aioredis.Redis) -> list[object]:
    reads = hot.HotReads(client)
    reads.get("count:a")
    reads.get("count:none")
    reads.hgetall("app:crm")
    reads.hgetall("app:none")
    return await reads.execute()


async def test_the_auth_reads_in_one_write_as_a_pipeline_gives_them(
        server: RedisServer, client: aioredis.Redis) -> None:
    await client.set("count:a", "3")
    await client.hset("app:crm", mapping={"password": "hash", "status": "active"})
    want = ["3", None, {"password": "hash", "status": "active"}, {}]
    assert await _reads(client) == want
    _settled(client)
    plain = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        assert await _reads(plain) == want  # redis-py's pipeline, for a client without one
    finally:
        await plain.aclose()
    resp2 = aioredis.Redis.from_pool(hot.HotPathPool.from_url(
        server.url, max_connections=4, timeout=2, decode_responses=True, protocol=2))
    try:
        assert hot.hot_path(resp2) is not None
        assert await _reads(resp2) == want  # HGETALL as RESP2's flat list, made a dict
    finally:
        await resp2.aclose()


async def test_an_error_reply_mid_way_leaves_no_reply_behind(client: aioredis.Redis) -> None:
    await client.hset("app:crm", mapping={"password": "hash"})
    await client.set("count:a", "7")
    reads = hot.HotReads(client)
    reads.get("app:crm")  # WRONGTYPE: a hash read as a string, replies still to come after it
    reads.get("count:a")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        await reads.execute()
    _settled(client)
    assert await hot.hget(client, "app:crm", "password") == "hash"
    again = hot.HotReads(client)
    again.get("count:a")
    assert await again.execute() == ["7"]
