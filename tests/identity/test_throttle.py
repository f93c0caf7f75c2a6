"""relay/identity/throttle.py on its own: the client key (an IPv6 client by its /64), the
login digest, and the AUTH failure counters in a real redis-server. The throttling of real
clients is in tests/flows/test_limits.py."""

from __future__ import annotations

import pytest

from relay.errors import AuthThrottledError
from relay.identity.throttle import AuthThrottle, client_key, login_digest
from tests.conftest import wait_for


def test_client_key_ipv4_as_is_ipv6_by_64() -> None:
    """An IPv4 client is its address; an IPv6 client is its /64; a mapped IPv4 is IPv4."""
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"



def test_login_digest_ignores_case_and_spaces() -> None:
    """One login is one counter however the client spells its case."""
    assert login_digest(b"Agent@KW.test ") == login_digest(b"agent@kw.test")
    assert len(login_digest(b"x" * 10_000)) == 32



async def test_auth_throttle_counts_in_a_window(redis_client) -> None:
    """Failures count per client and per login; at the limit check() raises; the counters
    carry a TTL (never a permanent lock) and expire with the window."""
    # A window long enough that a stalled machine does not expire the counters mid-test.
    throttle = AuthThrottle(redis_client, per_client=5, per_login=2, window=3)
    assert await throttle.check("192.0.2.1", b"a@x.test") == 0
    assert await throttle.record_failure("192.0.2.1", b"a@x.test") == (1, 1)
    assert await throttle.record_failure("192.0.2.2", b"A@x.test") == (1, 2)
    with pytest.raises(AuthThrottledError) as throttled:
        await throttle.check("192.0.2.3", b"a@x.test")
    assert (throttled.value.scope, throttled.value.failures) == ("login", 2)
    assert await throttle.check("192.0.2.3", b"b@x.test") == 0
    keys = [key async for key in redis_client.scan_iter("relay:authfail:*")]
    assert len(keys) == 3
    for key in keys:
        assert 0 < await redis_client.pttl(key) <= 3000

    async def expired() -> bool:
        try:
            await throttle.check("192.0.2.3", b"a@x.test")
        except AuthThrottledError:
            return False
        return True
    await wait_for(expired, 10)
