"""The Redis a running relay uses: the configured one, or the embedded development server
shared by whoever needs it (serve, the supervisor, the CLI), and the start-up wait for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog

from relay.config.settings import Settings
from relay.errors import StartupError
from relay.store.client import REDIS_ERRORS, RedisClient, close_redis, connect_redis
from relay.store.embedded import EmbeddedRedis

log = structlog.get_logger()


@asynccontextmanager
async def redis_url_for(settings: Settings) -> AsyncIterator[str]:
    """The configured Redis URL, or the embedded development server's: used while inside,
    started by whoever needs it first and stopped by the last user (``relay/store/embedded.py``).
    The worker supervisor uses this too: its workers share its use."""
    if settings.redis_url:
        yield settings.redis_url
        return
    embedded = EmbeddedRedis(settings.state_dir)
    await embedded.start()
    if embedded.started:
        log.warning("dev.embedded_redis", url=embedded.url, directory=str(embedded.directory),
                    note="development default: set RELAY_REDIS_URL in production")
    try:
        yield embedded.url
    finally:
        await embedded.stop()


@asynccontextmanager
async def redis_for(settings: Settings) -> AsyncIterator[RedisClient]:
    """The configured Redis (one server, a Sentinel-managed master or a Cluster: see
    redisconf.py), or the embedded development one (shared, see ``redis_url_for``)."""
    async with redis_url_for(settings) as url:
        client = connect_redis(url, timeout=settings.redis_timeout,
                               wait_replicas=settings.redis_wait_replicas)
        try:
            yield client
        finally:
            await close_redis(client)


async def wait_for_redis(client: RedisClient, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            await client.ping()
            return
        except REDIS_ERRORS as exc:
            if time.monotonic() > deadline:
                raise StartupError(f"Redis not reachable: {exc}") from None
            await asyncio.sleep(0.2)

