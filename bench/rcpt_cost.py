"""What the newer checks add to one recipient's Redis work, measured in the same run against
a fresh redis-server on loopback (issues 13 and 15):

    .venv/bin/python -m bench.rcpt_cost [--count N]

Each row runs ``count`` recipients one after another (as one SMTP session does), every one
through the real scripts: the reservation alone (the RCPT path before the suppression list),
with the global suppression lookup before it (the RCPT path now: one HGET, then reserve.lua,
which also reads the user's own list). Wall time per recipient on an idle machine; the ratio is
what to compare between machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from bench.procs import HOST, start_redis
from relay.config.policies import load_policies
from relay.decisions.quota import QuotaStore
from relay.decisions.suppression import SuppressionReason, SuppressionStore
from relay.store.client import connect_redis

REPO = Path(__file__).resolve().parent.parent
PERIOD = "2026-12"


async def _measure(port: int, count: int) -> dict[str, float]:
    redis = connect_redis(f"redis://{HOST}:{port}/0", timeout=10)
    quota = QuotaStore(redis)
    suppressions = SuppressionStore(redis)
    limits = load_policies(REPO / "policies").plan_limits()
    await redis.hset("relay:user:{u-bench}", mapping={"status": "active", "plan": "free",
                                                     "limit": str(10 * count)})
    # Lists of a realistic size, so the lookups are not of empty hashes.
    for n in range(2000):
        await suppressions.add(f"gone{n}@example.test", user_id=None,
                               reason=SuppressionReason.BOUNCE, source="bench")
        await suppressions.add(f"left{n}@example.test", user_id="u-bench",
                               reason=SuppressionReason.UNSUBSCRIBE, source="bench")

    async def reserve_only(i: int) -> None:
        await quota.reserve("u-bench", PERIOD, f"a{i}", 1, limits)

    async def with_suppression(i: int) -> None:
        recipient = f"rcpt{i}@example.test"
        await suppressions.check_global(recipient)
        await quota.reserve("u-bench", PERIOD, f"b{i}", 1, limits, recipient=recipient)

    rows: dict[str, float] = {}
    for name, step in (("reserve", reserve_only), ("suppression+reserve", with_suppression)):
        for i in range(min(200, count)):
            await step(count + i)  # warm: scripts loaded, connection open
        began = time.perf_counter()
        for i in range(count):
            await step(i)
        rows[name] = (time.perf_counter() - began) / count
    await redis.aclose()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--json", action="store_true",
                        help="print the figures as JSON (python -m bench reads them)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        service, port = start_redis(Path(work))
        try:
            rows = asyncio.run(_measure(port, args.count))
        finally:
            service.stop()
    base = rows["reserve"]
    if args.json:
        print(json.dumps({"count": args.count,
                          "us_per_recipient": {k: v * 1e6 for k, v in rows.items()}}))
        return 0
    for name, seconds in rows.items():
        print(f"{name:<22} {seconds * 1e6:8.1f} us per recipient  ({seconds / base:.2f}x)")
    print(f"added by the suppression check: {(rows['suppression+reserve'] - base) * 1e6:.1f} us "
          "per RCPT (one round trip)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
