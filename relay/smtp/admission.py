"""Connection admission: open connections in this process, in total and per client.

Per process on purpose: it protects this process's memory and file descriptors and needs no
cleanup when a process dies; with ``serve --workers N`` each worker has its own. A client is
keyed by ``relay.identity.throttle.client_key`` (IPv4 address, IPv6 /64).
"""

from __future__ import annotations

from collections import Counter

from relay.errors import TooManyConnectionsError


class ConnectionLimiter:
    """Open connections in this process, in total and per client key. A limit of 0 is off."""

    def __init__(self, *, total: int, per_client: int) -> None:
        self.total_limit = total
        self.per_client_limit = per_client
        self._open: Counter[str] = Counter()
        self.total = 0

    def acquire(self, client: str) -> None:
        """Count one more connection from ``client`` (a ``client_key``).

        Raises TooManyConnectionsError (nothing counted) when a limit would be exceeded.
        """
        if self.total_limit and self.total >= self.total_limit:
            raise TooManyConnectionsError("total", self.total_limit)
        if self.per_client_limit and self._open[client] >= self.per_client_limit:
            raise TooManyConnectionsError("ip", self.per_client_limit)
        self._open[client] += 1
        self.total += 1

    def release(self, client: str) -> None:
        """Forget one connection counted by ``acquire``."""
        self._open[client] -= 1
        if self._open[client] <= 0:
            del self._open[client]
        self.total -= 1

