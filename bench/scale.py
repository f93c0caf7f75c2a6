"""Users in Redis (issue 15): throughput as the population grows from 1,000 to 1,000,000
users, and what a user and a month of a user's history cost in Redis memory.

The scenario has a redis-server and a relay of its own (configured as the bench's main
relay, the same sink): the million users it leaves behind would otherwise sit under every
other scenario, and a fresh Redis makes memory differences about these users only.
It grows the population in steps (``--scale-users``) through the real bulk import, as an
operator onboards agents: one CSV per step holding only the new users (``email,id,limit``,
a custom limit of a billion, so the load never meets the quota), imported with
``command-relay users import`` (bench/imports.py times the same CLI).

After each step, the standard load (2 KB, 20 sessions, ``--per-connection`` messages per
connection, plaintext AUTH as the app ``command``, which resolves the user from MAIL FROM)
sends from ``SAMPLE`` senders drawn at random (seeded by the step) from the whole population
imported so far, so Redis reads keys spread over all of it:

1. a **first-touch** run, one message per sender: every sender's first send of the month
   (its usage hash is created), and a relay that has not seen the address (its sender hint
   misses: one more round trip). It is the step's warm-up too;
2. ``--reps`` timed runs of ``--messages-2k`` messages from the same senders: the step's
   msg/s is their median.

Memory:

- **per user**: the growth of ``used_memory`` less the client buffers (everything else,
  the key tables' buckets included) over the step's import / the users it added (the user hash, the
  senders set, one sender-index string per address, the member of the users index);
  ``MEMORY USAGE`` of a few new users' own keys is reported beside it;
- **per message** and **per user-month**, over a few thousand keys only, from
  ``dataset.bytes`` (MEMORY STATS: the keys and values; the relay's pool connections opening
  and a key table doubling would swamp the difference in ``used_memory``);
- **per message**: the growth over the timed runs / their messages: the only keys a repeat
  send creates are the resubmission claims (``relay:dedup:{id}:<digest>``, one per
  Message-ID, kept ``RELAY_DEDUP_WINDOW``, 24 h);
- **per user-month**: the growth over the first-touch run, less its messages' claims, / the
  senders that had no usage hash for the month: the month's ``relay:usage:{id}:YYYY-MM``
  hash (used, delivered, the month's plan and limits, a count per route, the threshold
  marks), the only per-month key. ``MEMORY USAGE`` of the senders' hashes is beside it.
  The summary pools both over the steps (a few thousand keys each). A
  past month's hash is the same hash, no longer written; every write sets its TTL to
  ``USAGE_TTL_SECONDS`` (400 days), so a user sending every month holds up to 14.

``python -m bench.scale --users N`` runs one import step alone (a fresh redis-server, N new
users) and prints its time and bytes per user.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis as redis_client

from bench import report
from bench.harness import APP, APP_PASSWORD, KB, LIMIT, MB, Bench, Scenario
from bench.imports import run_import
from bench.procs import HOST, REPO, Meter, clean_env, run_cli, start_redis, start_relay

TARGET = "scale"  # the scale relay's key in Bench.trials
SAMPLE = 2000  # senders per step (all the users when fewer)
KEY_SAMPLE = 100  # users whose keys MEMORY USAGE reads, per step
FLAT = 1.10  # the target: max / min msg/s across the steps within 10 %
DOMAIN = "scale.example"
WARM = f"warm-up@{DOMAIN}"  # the warm-up's sender, created before the first step


def user_id(n: int) -> str:
    return f"s{n:07d}"


def email(n: int) -> str:
    return f"{user_id(n)}@{DOMAIN}"


def write_users(path: Path, first: int, stop: int) -> None:
    """Users ``first``..``stop - 1`` as an import file: their email (also their only sender
    address), their id and a custom limit the load never reaches."""
    with path.open("w") as out:
        out.write("email,id,limit\n")
        out.writelines(f"{email(n)},{user_id(n)},{LIMIT}\n" for n in range(first, stop))


SETTLE_S = 10.0


def settled(client: redis_client.Redis) -> dict[str, Any]:
    """MEMORY STATS once ``used_memory`` has stopped moving: right after a load Redis still
    holds several hundred KB (buffers of the commands just run) that it frees within a
    second or two, which would otherwise land in the difference of a few thousand keys."""
    stats = client.memory_stats()
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        time.sleep(1.0)
        again = client.memory_stats()
        if again["total.allocated"] == stats["total.allocated"]:
            break
        stats = again
    return dict(stats)


def held(client: redis_client.Redis) -> int:
    """Redis's ``used_memory`` less its client buffers (MEMORY STATS ``clients.normal``), once
    settled: the relay's pool connections come and go with the load, not with the users."""
    stats = settled(client)
    return int(stats["total.allocated"]) - int(stats["clients.normal"])


def _memory_usage(client: redis_client.Redis, names: list[str]) -> list[int]:
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.memory_usage(name, samples=0)
    return [int(v) for v in pipe.execute() if v is not None]


def dataset(client: redis_client.Redis) -> tuple[int, int]:
    """Redis's ``dataset.bytes`` and ``keys.count`` (MEMORY STATS): the keys and values,
    without the client buffers, the Lua caches and the key tables' buckets, which move in
    steps (a table doubles) and would swamp a difference over a few thousand keys."""
    stats = settled(client)
    return int(stats["dataset.bytes"]), int(stats["keys.count"])


def _existing(client: redis_client.Redis, names: list[str]) -> list[bool]:
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.exists(name)
    return [bool(found) for found in pipe.execute()]


def import_step(env: dict[str, str], client: redis_client.Redis, workdir: Path,
                have: int, target: int) -> dict[str, Any]:
    """Import users ``have``..``target - 1`` with the CLI; its figures and the memory."""
    path = workdir / f"users-{target}.csv"
    write_users(path, have, target)
    before = held(client)
    found = run_import(env, path)
    path.unlink()
    after = held(client)
    new = target - have
    picks = random.Random(target).sample(range(have, target), min(KEY_SAMPLE, new))
    names = [k for n in picks for k in (f"relay:user:{{{user_id(n)}}}",
                                        f"relay:senders:{{{user_id(n)}}}",
                                        f"relay:sender:{email(n)}")]
    keys_bytes = sum(_memory_usage(client, names)) / max(1, len(picks))
    return {"users": target, "added": new, "created": found["created"],
            "users_per_second": found["users_per_second"], "import_s": found["wall_s"],
            "cli_cpu_s": found["cli_cpu_s"], "used_before": before, "used_after": after,
            "bytes_per_user": (after - before) / new if new else 0.0,
            "key_bytes_per_user": keys_bytes}


@contextlib.contextmanager
def _own_relay(bench: Bench) -> Iterator[tuple[redis_client.Redis, dict[str, str], Path]]:
    """A redis-server and a relay (as the main one) for this scenario; while it runs,
    Bench.measure reads this Redis's CPU and commands and drives this relay (TARGET)."""
    workdir = bench.workdir / "scale"
    workdir.mkdir()
    redis, port = start_redis(workdir)
    saved = bench.redis, bench.redis_meter
    try:
        client = redis_client.Redis(host=HOST, port=port, socket_timeout=60)
        env = clean_env(**{**bench.relay_env, "RELAY_REDIS_URL": f"redis://{HOST}:{port}/0",
                           "RELAY_STATE_DIR": str(workdir / "relay-state")})
        run_cli(["apps", "add", APP, "--password-stdin"], env, APP_PASSWORD + "\n")
        relay, relay_port = start_relay(env, workdir / "relay.log", workdir / "relay.err")
        try:
            bench.redis, bench.redis_meter = client, Meter(redis.pid)
            bench.trials[TARGET] = (relay_port, Meter(relay.pid))
            bench.say(f"scale: redis-server on {HOST}:{port}, relay (pid {relay.pid}) on "
                      f"{HOST}:{relay_port}")
            _warm_up(bench, env)
            yield client, env, workdir
        finally:
            bench.redis, bench.redis_meter = saved
            bench.trials.pop(TARGET, None)
            relay.stop(signal.SIGTERM, 30)
            client.close()
    finally:
        redis.stop()


def _warm_up(bench: Bench, env: dict[str, str]) -> None:
    """A few hundred messages from a user of its own first, so that the first step's
    first-touch run does not also pay each worker's first AUTH (the slow hash) and its
    Redis and upstream connections."""
    run_cli(["users", "add", WARM, "--password-stdin", "--limit", str(LIMIT)], env,
            "scale-warm-up-password\n")
    sc = Scenario("scale-warm", "warm", TARGET, 2 * KB, 20, 20, False, True, 400)
    bench.measure(sc, bench.load_for(sc, senders=(WARM,)))


def measure_scale(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    clock = time.perf_counter()
    steps: list[dict[str, Any]] = []
    have = 0
    period = datetime.now(UTC).strftime("%Y-%m")  # the users' month: RELAY_DEFAULT_TZ, UTC
    with _own_relay(bench) as (client, env, workdir):
        for target in sorted(set(args.scale_users)):
            bench.say(f"scale: importing users {have:,}..{target - 1:,}")
            step = import_step(env, client, workdir, have, target)
            have = target
            bench.say(f"scale: {target:,} users, {step['users_per_second']:,} users/s, "
                      f"{step['bytes_per_user']:,.0f} bytes per user")
            step.update(_load(bench, args, client, target, period))
            steps.append(step)
    duration = time.perf_counter() - clock
    return _summary(steps, args, duration)


def _load(bench: Bench, args: argparse.Namespace, client: redis_client.Redis,
          population: int, period: str) -> dict[str, Any]:
    picks = random.Random(population).sample(range(population), min(SAMPLE, population))
    senders = tuple(email(n) for n in picks)
    usage_keys = [f"relay:usage:{{{user_id(n)}}}:{period}" for n in picks]
    had = _existing(client, usage_keys)
    pc = args.per_connection
    first = Scenario(f"scale-{population}-first", "first touch", TARGET, 2 * KB, 20, pc,
                     False, True, len(senders))
    before = dataset(client)
    # Not cut short by the time cap: every sender is to send its one message.
    first_run, _ = bench.measure(first, bench.load_for(first, senders=senders,
                                                       time_cap=max(60.0, args.time_cap)))
    touched = dataset(client)
    # The senders whose month began in this run (not the ones a previous step's sample had).
    fresh = sum(1 for old, new in zip(had, _existing(client, usage_keys), strict=True)
                if new and not old)
    sc = Scenario(f"scale-{population}", f"{population:,} users", TARGET, 2 * KB, 20, pc,
                  False, True, args.messages_2k)
    runs = []
    for rep in range(args.reps):
        bench.say(f"scale: {population:,} users, rep {rep + 1}/{args.reps}")
        run, _ = bench.measure(sc, bench.load_for(sc, senders=senders))
        runs.append(run)
    after = dataset(client)
    delivered = sum(r["delivered"] for r in runs)
    per_message = (after[0] - touched[0]) / delivered if delivered else 0.0
    month = ((touched[0] - before[0] - first_run["delivered"] * per_message) / fresh
             if fresh else None)
    hashes = _memory_usage(client, usage_keys[:KEY_SAMPLE])
    claims = []
    for name in client.scan_iter(match="relay:dedup:*", count=1000):
        claims.append(name)
        if len(claims) >= KEY_SAMPLE:
            break
    summary = report.summarise(runs)
    first_summary = report.summarise([first_run])
    return {"senders": len(senders), "fresh_senders": fresh, "summary": summary,
            "first_touch_rate": first_summary["rate_median"],
            "first_touch_failed": first_summary["failed"],
            "bytes_per_message": per_message, "bytes_per_user_month": month,
            "usage_hash_bytes": statistics.mean(hashes) if hashes else None,
            "claim_bytes": statistics.mean(_memory_usage(client, claims)) if claims else None,
            # The raw differences, pooled over the steps in the summary.
            "first_growth": touched[0] - before[0], "first_delivered": first_run["delivered"],
            "timed_growth": after[0] - touched[0], "timed_delivered": delivered,
            "dataset_end": after[0], "keys_end": after[1],
            "keys_per_message": (after[1] - touched[1]) / delivered if delivered else None,
            "errors": {k: v for r in [first_run, *runs] for k, v in r["errors"].items()}}


HEADER = ("users", "import users/s", "import s", "Redis MB before/after import", "bytes/user",
          "msg/s median (min-max)", "first-touch msg/s", "relay CPU s/1k", "redis CPU s/1k",
          "txn p50/p99 ms", "bytes/user-month", "bytes/msg", "failed")


def _row(s: dict[str, Any]) -> tuple[str, ...]:
    m = s["summary"]

    def num(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    return (f"{s['users']:,}", f"{s['users_per_second']:,}", f"{s['import_s']:.1f}",
            f"{s['used_before'] / MB:,.1f} / {s['used_after'] / MB:,.1f}",
            f"{s['bytes_per_user']:,.0f}",
            f"{m['rate_median']:,.0f} ({m['rate_min']:,.0f}-{m['rate_max']:,.0f})",
            f"{s['first_touch_rate']:,.0f}", num(m["relay_cpu_s_per_1000"], 2),
            num(m["redis_cpu_s_per_1000"], 2),
            f"{m['txn_ms']['p50']:.1f}/{m['txn_ms']['p99']:.1f}",
            num(s["bytes_per_user_month"]), num(s["bytes_per_message"]),
            str(m["failed"] + s["first_touch_failed"]))


def _summary(steps: list[dict[str, Any]], args: argparse.Namespace,
             duration: float) -> dict[str, Any]:
    rates = [s["summary"]["rate_median"] for s in steps]
    ratio = max(rates) / min(rates) if rates and min(rates) > 0 else None
    per_user = statistics.median(s["bytes_per_user"] for s in steps)
    # Pooled over every step: a few thousand keys a step, so the differences are small.
    timed = sum(s["timed_delivered"] for s in steps)
    per_msg = sum(s["timed_growth"] for s in steps) / timed if timed else 0.0
    fresh = sum(s["fresh_senders"] for s in steps)
    month = (sum(s["first_growth"] - s["first_delivered"] * per_msg for s in steps) / fresh
             if fresh else None)
    hashes = [s["usage_hash_bytes"] for s in steps if s["usage_hash_bytes"]]
    hash_bytes = statistics.median(hashes) if hashes else None
    claims = [s["claim_bytes"] for s in steps if s["claim_bytes"]]
    claim_bytes = statistics.median(claims) if claims else None
    keys = statistics.median(s["key_bytes_per_user"] for s in steps)
    imports = sum(s["import_s"] for s in steps)
    text = (f"{len(steps)} steps to {steps[-1]['users']:,} users, imported with `command-relay "
            f"users import` (one file of the new users per step, {imports:.0f} s in all; the "
            f"whole scenario {duration:.0f} s). Load per step: 2 KB, 20 sessions, "
            f"{args.per_connection} msg/conn, plaintext AUTH as the app, from {SAMPLE:,} "
            "senders drawn at random from every user imported so far: one first-touch run "
            f"(each sender once: the month's usage hash created), then {args.reps} timed runs "
            "(msg/s: their median). bytes/user = growth of used_memory less client buffers "
            "over the import / users added (MEMORY USAGE of one user's keys: "
            f"{keys:,.0f}); bytes/user-month = dataset.bytes (MEMORY STATS) growth over the "
            "first-touch run, less its claims, / senders new to the month; bytes/msg = "
            "dataset.bytes growth over the timed runs / their messages (the resubmission "
            "claims, kept RELAY_DEDUP_WINDOW, 24 h); both pooled over the steps in the "
            "summary: "
            + (f"{month:,.0f}" if month is not None else "-")
            + f" per user-month, {per_msg:,.0f} per message. MEMORY USAGE of a usage hash "
            + (f"{hash_bytes:,.0f}" if hash_bytes else "-") + ", of a claim "
            + (f"{claim_bytes:,.0f}" if claim_bytes else "-")
            + " (each also has an entry in the expiry table).")
    targets = [
        f"users {steps[0]['users']:,} -> {steps[-1]['users']:,}: msg/s {rates[0]:,.0f} -> "
        f"{rates[-1]:,.0f} (max/min "
        + (f"{ratio:.2f}, target within 10 %: {'meets' if ratio <= FLAT else 'misses'})"
           if ratio else "-)"),
        f"bytes per user: {per_user:,.0f} (Redis used_memory less client buffers over the "
        f"import; {keys:,.0f} by "
        "MEMORY USAGE of the user's own keys)",
        "bytes per user-month: " + (f"{month:,.0f}" if month is not None else "-")
        + " measured, " + (f"{hash_bytes:,.0f}" if hash_bytes else "-")
        + " by MEMORY USAGE (the month's usage hash, kept 400 days: up to 14 per user "
          f"sending every month); plus {per_msg:,.0f} per message while its claim is kept "
          "(24 h)",
    ]
    return {"steps": steps, "duration_s": duration, "import_s": imports, "sample": SAMPLE,
            "flat_ratio": ratio, "bytes_per_user": per_user, "bytes_per_user_month": month,
            "bytes_per_message": per_msg, "usage_hash_bytes": hash_bytes,
            "claim_bytes": claim_bytes, "header": HEADER, "rows": [_row(s) for s in steps],
            "text": text, "targets": targets}


def _main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=(
        "one import step alone: N new users into a fresh redis-server"))
    parser.add_argument("--users", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relay-bench-scale-") as tmp:
        workdir = Path(tmp)
        redis, port = start_redis(workdir)
        try:
            client = redis_client.Redis(host=HOST, port=port, socket_timeout=60)
            env = clean_env(RELAY_REDIS_URL=f"redis://{HOST}:{port}/0",
                            RELAY_POLICIES_DIR=str(REPO / "policies"),
                            RELAY_STATE_DIR=str(workdir / "state"))
            began = time.perf_counter()
            step = import_step(env, client, workdir, 0, args.users)
            took = time.perf_counter() - began
            client.close()
        finally:
            redis.stop()
    print(f"{args.users:,} users: {step['users_per_second']:,} users/s, import "
          f"{step['import_s']:.1f} s (CLI CPU {step['cli_cpu_s']:.1f} s), with writing the "
          f"file {took:.1f} s; "
          f"Redis {step['used_before'] / MB:.1f} -> {step['used_after'] / MB:.1f} MB"
          f" = {step['bytes_per_user']:,.0f} bytes per user (MEMORY USAGE of the user's keys "
          f"{step['key_bytes_per_user']:,.0f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
