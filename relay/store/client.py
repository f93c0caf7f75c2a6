"""The Redis client of every store, and the one boundary where redis-py errors become relay
errors (STYLE §4).

``connect_redis`` builds redis-py's own client for the topology ``RELAY_REDIS_URL`` names
(``relay/store/urls.py``): one server, a Sentinel-managed master (``redis.asyncio.sentinel``, which
asks the sentinels for the master and follows a failover), or a Redis Cluster
(``redis.asyncio.cluster.RedisCluster``, which routes each command to the node owning its
key's slot). Every store takes either client (``RedisClient``). All of one user's keys share
one hash tag (``relay/store/keys.py``), so each Lua script touches one slot; commands that
span users (pipelines of index updates) are never transactions, which Cluster would refuse.

Any Redis failure on the SMTP path fails closed with a temporary reply: nothing is relayed
uncounted, and the client retries once Redis is back (redis-py reconnects by itself, and
rediscovers the master or the slot map after a failover).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript

from relay.errors import StoreUnavailableError
from relay.store.hot import HotPathPool, HotScript
from relay.store.urls import CLUSTER, SENTINEL, RedisTarget, parse_redis_url

RedisClient: TypeAlias = aioredis.Redis | RedisCluster

# What a Redis call can raise when Redis is unreachable or mid-failover. redis-py's cluster
# client raises RedisClusterException (not a RedisError) when no node answers at all.
REDIS_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)

# Connections one client may open to one server: one per command in flight, so the SMTP
# sessions of a busy process (each waits on at most one command) rarely need more; Redis's
# own maxclients (10,000) leaves room for many relay processes at this size.
MAX_CONNECTIONS = 512


@contextmanager
def store_errors() -> Iterator[None]:
    """Translate redis-py's errors (and socket errors under them) to StoreUnavailableError."""
    try:
        yield
    except REDIS_ERRORS as exc:
        raise StoreUnavailableError() from exc


@dataclass(frozen=True, slots=True)
class Durability:
    """How many replicas must acknowledge a quota reservation (Redis WAIT), and for how
    long to wait, in milliseconds."""

    replicas: int
    timeout_ms: int


# The durability a client was built with (connect_redis), read by the stores that need it:
# it belongs to the connection, like the timeout, so every store built on the client
# applies it without the wiring passing it around.
_DURABILITY: weakref.WeakKeyDictionary[Any, Durability] = weakref.WeakKeyDictionary()


def durability(client: RedisClient) -> Durability:
    return _DURABILITY.get(client, Durability(0, 0))


def connect_redis(url: str, *, timeout: float, wait_replicas: int = 0) -> RedisClient:
    """A client for ``url`` that fails fast: one quick retry covers a pooled connection that a
    Redis restart or failover broke; anything longer must become a 451, not a client waiting
    seconds. ``wait_replicas`` > 0: quota reservations wait (up to half of ``timeout``) for
    that many replicas to acknowledge them (single server and Sentinel only).

    Raises RedisUrlError for a URL settings.py would have refused."""
    target = parse_redis_url(url)
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": _fail_fast(),
        "decode_responses": True,
    }
    client: RedisClient
    if target.kind == SENTINEL:
        client = _sentinel_master(target, common)
    elif target.kind == CLUSTER:
        if wait_replicas:
            raise ValueError("wait_replicas is not supported with Redis Cluster")
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            username=target.username, password=target.password, **_tls(target), **common)
    else:
        # A blocking pool: a burst of more concurrent commands than connections waits (up
        # to the timeout) for one to come free, where redis-py's default pool raises
        # MaxConnectionsError past 100 and 150 simultaneous logins would get 454.
        # from_pool: the client owns the pool, so aclose() closes its connections too.
        client = aioredis.Redis.from_pool(HotPathPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=timeout, **common))
    if wait_replicas:
        _DURABILITY[client] = Durability(wait_replicas, max(1, int(timeout * 500)))
    return client


def _fail_fast() -> Retry:
    # Retried once: a broken connection (ConnectionError), which a Redis restart or a
    # failover leaves in the pool, and which a fresh one replaces at once. Not a timeout:
    # Redis took the command and did not answer in time (paused, overloaded), and asking
    # again would hold the SMTP client twice the timeout for the same answer.
    return Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1,
                 supported_errors=(redis.exceptions.ConnectionError,))


def _sentinel_master(target: RedisTarget, common: dict[str, Any]) -> aioredis.Redis:
    assert target.service is not None
    tls = _tls(target)
    # redis-py before 8.2 leaves Sentinel's constructor unannotated (the ignore serves both).
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(target.nodes),
        # The sentinels fail as fast as the master: redis-py's default retry would spend
        # seconds on each unreachable sentinel while an SMTP client waits.
        sentinel_kwargs={"socket_timeout": common["socket_timeout"],
                         "socket_connect_timeout": common["socket_connect_timeout"],
                         "retry": _fail_fast(),
                         "username": target.sentinel_username,
                         "password": target.sentinel_password,
                         "decode_responses": True, **tls})
    master: aioredis.Redis = sentinel.master_for(
        target.service, db=target.db, username=target.username, password=target.password,
        max_connections=MAX_CONNECTIONS, **tls, **common)
    return master


def _tls(target: RedisTarget) -> dict[str, Any]:
    return {"ssl": True, **target.tls_options} if target.tls else {}


async def close_redis(client: RedisClient) -> None:
    """Close ``client`` and, for a Sentinel-managed master, its connections to the
    sentinels."""
    await client.aclose()
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, SentinelConnectionPool):
        await pool.sentinel_manager.aclose()


async def eval_replicated(client: RedisClient, script: AsyncScript | HotScript,
                          keys: Sequence[str],
                          args: Sequence[str | int], wanted: Durability) -> tuple[Any, bool]:
    """Run ``script``, then WAIT for ``wanted.replicas`` replicas on the same connection (a
    pipeline is one connection), so the acknowledgement covers this script's writes and
    everything written on that connection before. Returns the script's result and whether
    enough replicas acknowledged in time; if not, the writes are on the master only and a
    failover now could lose them."""
    assert isinstance(client, aioredis.Redis), "WAIT needs one connection: not with Cluster"
    async with client.pipeline(transaction=False) as pipe:
        # Queued on the pipeline, which loads the script first if the server lacks it.
        await script(keys=keys, args=args, client=pipe)
        pipe.wait(wanted.replicas, wanted.timeout_ms)
        result, acknowledged = await pipe.execute()
    return result, int(acknowledged) >= wanted.replicas
