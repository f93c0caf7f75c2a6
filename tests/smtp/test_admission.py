"""relay/smtp/admission.py, the connection limiter on its own: open connections counted in
total and per client, a refusal never counted, a closed connection's slot given back. The
limits with real clients, and the PROXY header, are in tests/flows/test_limits.py and
tests/smtp/test_proxy.py."""

from __future__ import annotations

import pytest

from relay.errors import TooManyConnectionsError
from relay.smtp.admission import ConnectionLimiter


def test_connection_limiter_counts_and_releases() -> None:
    """acquire refuses past either limit without counting; release frees the slot, in the
    total and for its client."""
    limiter = ConnectionLimiter(total=3, per_client=2)
    limiter.acquire("a")
    limiter.acquire("a")
    with pytest.raises(TooManyConnectionsError) as per_client:
        limiter.acquire("a")
    assert per_client.value.scope == "ip" and per_client.value.code == 421
    limiter.acquire("b")
    with pytest.raises(TooManyConnectionsError) as total:
        limiter.acquire("c")
    assert total.value.scope == "total"
    assert limiter.total == 3  # neither refusal was counted
    limiter.release("a")
    limiter.acquire("c")  # the slot "a" freed
    assert limiter.total == 3
    limiter.release("b")
    limiter.release("c")
    limiter.acquire("a")  # "a" is down to one: one more is within its limit of two
    with pytest.raises(TooManyConnectionsError) as again:
        limiter.acquire("a")
    assert again.value.scope == "ip" and limiter.total == 2



def test_connection_limiter_zero_is_off() -> None:
    """Limits of 0 never refuse."""
    limiter = ConnectionLimiter(total=0, per_client=0)
    for _ in range(1000):
        limiter.acquire("a")
    assert limiter.total == 1000
