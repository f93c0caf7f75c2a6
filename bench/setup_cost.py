"""The CPU cost of setting up one SMTP connection object, aiosmtpd's own ``SMTP.__init__``
against the relay's lean set-up (relay/smtp/setup.py), measured in the same run.

    .venv/bin/python -m bench.setup_cost [--count N]

No socket and no Redis round trip: only the object a listener builds for each accepted
connection, which a client sending one message per connection pays every time.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiosmtpd.smtp import SMTP

from relay.config.endpoints import Endpoint
from relay.config.settings import Settings
from relay.process.wiring import RelayApp
from relay.smtp import connection
from relay.smtp.listeners import make_factory

REPO = Path(__file__).resolve().parent.parent


def _per_object(factory: Any, count: int) -> float:
    for _ in range(min(count, 200)):
        factory()  # warm the caches (and the lean tables)
    began = time.process_time()
    for _ in range(count):
        factory()
    return (time.process_time() - began) / count


async def measure(count: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as state:
        settings = Settings(listen=Endpoint("127.0.0.1", 0), state_dir=Path(state),
                            policies_dir=REPO / "policies", hostname="relay.bench.invalid")
        # Never connected: building protocol objects asks nothing of Redis.
        app = RelayApp(settings, aioredis.Redis(host="127.0.0.1", port=1))
        factory = make_factory(app.handler, hostname="relay.bench.invalid",
                               data_size_limit=1 << 20, idle_timeout=30, tls_context=None,
                               allow_plaintext_auth=True, implicit_tls=False)
        lean = _per_object(factory, count)
        original = connection.init_smtp
        connection.init_smtp = (  # type: ignore[assignment]
            lambda self, handler, **kwargs: SMTP.__init__(self, handler, **kwargs))
        try:
            stock = _per_object(factory, count)
        finally:
            connection.init_smtp = original
        return stock, lean


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    args = parser.parse_args()
    stock, lean = asyncio.run(measure(args.count))
    print(f"connection object set-up, CPU per connection ({args.count:,} each): "
          f"aiosmtpd's __init__ {stock * 1e6:.1f} us, lean {lean * 1e6:.1f} us "
          f"= {stock / lean:.1f}x less")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
