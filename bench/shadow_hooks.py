"""``python -m bench.shadow_hooks``: the shadow trial's hooks alone, in one process, as the
SMTP path calls them for one message (the route, one reservation, the commit), with the
relay's JSON logging to /dev/null: CPU microseconds per message with the trial off, with a
candidate that decides as the live policies do, and with one that differs on every message
(then one ``shadow.differs`` line, a metric and a queued count per message).

Unlike the end-to-end scenarios this figure hardly depends on what else the machine runs.
The queued counts are not written here (their cost, one pipeline a second per process, is
in the end-to-end runs' Redis commands).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from bench.procs import REPO
from bench.shadow import write_candidates
from relay.config.policies import Policies, load_policies
from relay.config.shadow import load_candidate
from relay.config.zones import zone
from relay.decisions.months import SystemClock, period_at
from relay.decisions.quota import Reservation, ReserveStatus, Settlement
from relay.decisions.routing import choose_route
from relay.decisions.shadow_counts import ShadowCounts
from relay.decisions.shadow_trial import OFF, Recorder, ShadowTrial
from relay.identity.accounts import User
from relay.observe.logs import configure_logging
from relay.observe.metrics import RelayMetrics
from relay.store.client import connect_redis

LIMIT = 1_000_000_000  # the bench users' custom limit


def _trials(live: Policies, recorder: Recorder) -> dict[str, ShadowTrial]:
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_candidates(Path(tmp))
        found = {}
        for target, folder in folders.items():
            if folder is None:
                continue
            candidate = load_candidate(folder, live)
            assert candidate is not None
            found[target.removeprefix("shadow-")] = ShadowTrial(live, candidate, recorder)
    return {"off": OFF, **found}


async def measure(messages: int) -> dict[str, Any]:
    live = load_policies(REPO / "policies")
    metrics = RelayMetrics()
    # Never connected: with no room in the queue nothing is written (only counted as
    # uncounted), so the figure is the hooks' own.
    redis = connect_redis("redis://127.0.0.1:9/0", timeout=1)
    recorder = Recorder(metrics, ShadowCounts(redis, metrics, max_pending=0), SystemClock())
    user = User("u-bench", "agent00@bench.example", "free", LIMIT, "UTC", "active",
                frozenset({"agent00@bench.example"}), "2026-11-01T00:00:00+00:00")
    period = period_at(SystemClock().now(), zone("UTC"))
    log = structlog.get_logger().bind(
        session_id="0123456789ab", login="command", app="command", txn_id="0123456789abcdef",
        user_id=user.id, plan=user.plan, sender_domain="bench.example", period=period.label,
        route="command")
    decision = choose_route(live.routing, app="command", preference=None, header="")
    results: dict[str, Any] = {}
    for name, trial in _trials(live, recorder).items():
        for rounds in (messages // 10, messages):  # the first round warms up
            started = time.process_time()
            for n in range(rounds):
                trial.route(decision, user=user, app="command", header="", log=log)
                watch = trial.watch(user=user, period=period, app="command", log=log)
                watch.reserved(Reservation(ReserveStatus.RESERVED, n + 1, LIMIT), 1)
                watch.committed(Settlement(1, n + 1, n + 1, LIMIT, 0))
            spent = time.process_time() - started
        results[name] = 1e6 * spent / messages
    await redis.aclose()
    differences = metrics.registry.get_sample_value("relay_shadow_differences_total",
                                                    {"kind": "route"})
    return {"messages": messages, "us_per_message": results,
            "differences": differences}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shadow_hooks")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with open(os.devnull, "w", encoding="utf-8") as devnull:
        configure_logging("json", "info", stream=devnull)
        found = asyncio.run(measure(args.messages))
    if args.json:
        print(json.dumps(found))
    else:
        us = found["us_per_message"]
        print(f"shadow hooks, {found['messages']:,} messages: off {us['off']:.1f} us, "
              f"same {us['same']:.1f} us, differs {us['differs']:.1f} us per message")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
