"""The one boundary where redis-py errors become relay errors (STYLE §4).

Any Redis failure on the SMTP path fails closed with a temporary reply: nothing is relayed
uncounted, and the client retries once Redis is back (redis-py reconnects by itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from relay.errors import StoreUnavailableError


@contextmanager
def store_errors() -> Iterator[None]:
    """Translate ``redis.RedisError`` (and socket errors under it) to StoreUnavailableError."""
    try:
        yield
    except (redis.exceptions.RedisError, OSError) as exc:
        raise StoreUnavailableError() from exc


def connect_redis(url: str, *, timeout: float) -> aioredis.Redis:
    """A client for ``url`` that fails fast: one quick retry covers a pooled connection that a
    Redis restart broke; anything longer must become a 451, not a client waiting seconds."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1),
        decode_responses=True,
    )
