"""relay.redisconf: RELAY_REDIS_URL forms for one server, Sentinel and Cluster, and the clear
errors for the ones that cannot work (never echoing a password)."""

from __future__ import annotations

import re
import socket

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from relay.decisions.quota import QuotaStore
from relay.errors import StartupError, StoreUnavailableError
from relay.process.redis import wait_for_redis
from relay.store.client import close_redis, connect_redis, durability
from relay.store.urls import CLUSTER, SENTINEL, SERVER, RedisUrlError, parse_redis_url

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://r.example:6380/2",
                                 "unix:///run/redis.sock?db=1", "REDIS://127.0.0.1"])
def test_redisconf_single_server_urls_are_left_to_redis_py(url: str) -> None:
    """redis://, rediss:// and unix:// are one server, read by redis-py itself."""
    target = parse_redis_url(url)
    assert target.kind == SERVER
    assert target.url == url


def test_redisconf_sentinel_url_in_full() -> None:
    """Hosts (default port 26379, IPv6 in brackets), service, db, the master's credentials,
    the sentinels' own credentials."""
    target = parse_redis_url(
        f"redis+sentinel://relay:{SECRET}@10.0.0.1:26379,sentinel-b,[::1]:26380/mymaster/2"
        f"?sentinel_username=watcher&sentinel_password={SECRET}")
    assert target.kind == SENTINEL and not target.tls
    assert target.nodes == (("10.0.0.1", 26379), ("sentinel-b", 26379), ("::1", 26380))
    assert (target.service, target.db) == ("mymaster", 2)
    assert (target.username, target.password) == ("relay", SECRET)
    assert (target.sentinel_username, target.sentinel_password) == ("watcher", SECRET)
    assert SECRET not in repr(target)


def test_redisconf_cluster_url_with_tls_options() -> None:
    """rediss+cluster: TLS with the CA file and hostname check given as options."""
    target = parse_redis_url(f"rediss+cluster://:{SECRET}@node1:7000,node2"
                             "?ssl_ca_certs=/etc/ca.pem&ssl_check_hostname=false")
    assert target.kind == CLUSTER and target.tls
    assert target.nodes == (("node1", 7000), ("node2", 6379))
    assert (target.username, target.password) == (None, SECRET)
    assert dict(target.tls_options) == {"ssl_ca_certs": "/etc/ca.pem",
                                        "ssl_check_hostname": False}


@pytest.mark.parametrize(("url", "message"), [
    ("memcached://127.0.0.1", "scheme must be one of"),
    ("127.0.0.1:6379", "not a URL"),
    ("redis+sentinel://127.0.0.1:26379", "service name"),
    ("redis+sentinel://127.0.0.1:26379/", "service name"),
    ("redis+sentinel://127.0.0.1:26379/my master", "service name may hold only"),
    ("redis+sentinel://127.0.0.1:26379/mymaster/zero", "database must be a number"),
    ("redis+cluster://127.0.0.1:7000/3", "only database 0"),
    ("redis+cluster://127.0.0.1:7000,,127.0.0.1:7001", "host 2 of the host list"),
    ("redis+cluster://127.0.0.1:99999", "port must be a number"),
    ("redis+cluster://[::1:7000", "IPv6"),
    ("redis+cluster://127.0.0.1:7000?db=1", "unknown option 'db'"),
    ("redis+cluster://127.0.0.1:7000?sentinel_password=x", "unknown option"),
    ("redis+sentinel://h/m?ssl_ca_certs=/ca.pem", "needs TLS: use rediss+sentinel"),
    ("rediss+cluster://h?ssl_cert_reqs=maybe", "ssl_cert_reqs must be"),
    (f"redis+cluster://{SECRET}@127.0.0.1:7000", "user:password@"),
])
def test_redisconf_bad_urls_say_why(url: str, message: str) -> None:
    """Each unusable URL is refused with a reason an operator can act on."""
    with pytest.raises(RedisUrlError, match=re.escape(message)) as info:
        parse_redis_url(url)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("url", [
    f"redis+cluster://u:{SECRET}@127.0.0.1:7000,{SECRET}!:1",
    f"redis+cluster://{SECRET}@127.0.0.1:7000",
    f"redis+sentinel://h:26379/{SECRET} x",
])
def test_redisconf_errors_never_echo_the_url(url: str) -> None:
    """A mistyped URL can put a secret anywhere: errors name positions, not contents."""
    with pytest.raises(RedisUrlError) as info:
        parse_redis_url(url)
    assert SECRET not in str(info.value)


async def test_redisconf_connect_builds_redis_pys_own_clients() -> None:
    """connect_redis returns RedisCluster for a Cluster URL and a Sentinel-managed client for
    a Sentinel URL (nothing is contacted until the first command)."""
    cluster = connect_redis("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", timeout=1)
    assert isinstance(cluster, RedisCluster)
    await close_redis(cluster)
    master = connect_redis("redis+sentinel://127.0.0.1:26379/mymaster", timeout=1,
                           wait_replicas=1)
    pool = getattr(master, "connection_pool", None)
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert durability(master).replicas == 1 and durability(master).timeout_ms == 500
    await close_redis(master)
    with pytest.raises(ValueError, match="Cluster"):
        connect_redis("redis+cluster://127.0.0.1:7000", timeout=1, wait_replicas=1)


@pytest.mark.parametrize("form", ["redis+cluster://127.0.0.1:{port}",
                                  "redis+sentinel://127.0.0.1:{port}/mymaster"])
async def test_redisconf_unreachable_cluster_or_sentinel_fails_closed(form: str) -> None:
    """With no node (or no sentinel) answering, a reservation is StoreUnavailableError (451)
    and start-up's wait ends in StartupError, never a traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        client = connect_redis(form.format(port=holder.getsockname()[1]), timeout=1)
        try:
            with pytest.raises(StoreUnavailableError):
                await QuotaStore(client).reserve("u-1", "2026-11", "t", 1, ["free", 5])
            with pytest.raises(StartupError, match="Redis not reachable"):
                await wait_for_redis(client, 0.1)
        finally:
            await close_redis(client)
