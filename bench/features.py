"""What the newer features cost per message, as rows of their own (issue 15):

* **suppression lists**: every relay of the run screens against lists of a production-like
  size, imported at start-up through the operator's CLI (``command-relay suppress import``):
  ``GLOBAL_ENTRIES`` on the global list and ``USER_ENTRIES`` on each bench user's own list
  (the load's recipient is on neither). The check cannot be turned off, so its price per
  recipient comes from ``python -m bench.rcpt_cost`` (the reservation alone against the
  reservation with the global lookup, in one process against a redis-server of its own);
* **deduplication** (docs/resubmission.md): one more relay, identical to the shadow
  scenario's trial-off relay but for ``RELAY_DEDUP_WINDOW=0``, takes the same load in the
  same run (every bench message has a Message-ID, so the other relays claim and conclude
  each one): the difference is what the claims cost, end to end;
* **the shadow trial**: bench/shadow.py's rows (trial off, nothing differs, every message
  differs).

The comparison base is the shadow scenario's ``shadow-off`` relay (same configuration, same
history: the warm-up, then only its own scenario); with ``--no-shadow`` it is the main
relay's row of the same shape.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import KB, Scenario
from bench.procs import REPO, run_cli
from bench.shadow import figures

GLOBAL_ENTRIES = 100_000
USER_ENTRIES = 1_000
# Extra relays: scenario target -> the settings that differ from the main relay's.
RELAYS: dict[str, dict[str, str]] = {"feature-dedup-off": {"RELAY_DEDUP_WINDOW": "0"}}
_KEY = "feature-2k-c20-pc{pc}-dedup-off"


def seed_suppressions(workdir: Path, env: dict[str, str], senders: tuple[str, ...]
                      ) -> dict[str, Any]:
    """Import the lists through the CLI; what it took."""
    path = workdir / "suppressions.csv"
    at = "2026-11-01T00:00:00+00:00"
    with path.open("w", newline="", encoding="utf-8") as out:
        rows = csv.writer(out, lineterminator="\n")
        rows.writerow(("address", "scope", "reason", "source", "time"))
        for n in range(GLOBAL_ENTRIES):
            rows.writerow((f"gone{n}@bounced.example", "*", "bounce", "bench", at))
        for sender in senders:
            for n in range(USER_ENTRIES):
                rows.writerow((f"left{n}@clients.example", sender, "unsubscribe", "bench", at))
    began = time.perf_counter()
    summary = json.loads(run_cli(["suppress", "import", str(path), "--json"], env))
    seconds = time.perf_counter() - began
    entries = GLOBAL_ENTRIES + USER_ENTRIES * len(senders)
    return {"global": GLOBAL_ENTRIES, "per_user": USER_ENTRIES, "entries": entries,
            "seconds": seconds, "summary": summary,
            "text": f"{GLOBAL_ENTRIES:,} global entries and {USER_ENTRIES:,} on each of the "
                    f"{len(senders)} users' lists imported with `command-relay suppress "
                    f"import` in {seconds:.1f} s ({entries / seconds:,.0f} entries/s)"}


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    pc = args.per_connection
    return [Scenario(_KEY.format(pc=pc), "relay -> sink, deduplication off "
                     "(RELAY_DEDUP_WINDOW=0)", "feature-dedup-off", 2 * KB, 20, pc, False,
                     True, args.messages_2k)]


def rcpt_cost(count: int = 3000) -> dict[str, Any] | None:
    """``python -m bench.rcpt_cost --json`` in a process of its own."""
    try:
        done = subprocess.run([sys.executable, "-m", "bench.rcpt_cost", "--json", "--count",
                               str(count)], capture_output=True, text=True, timeout=300,
                              cwd=REPO, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def cost(result: dict[str, Any], per_connection: int, seeded: dict[str, Any] | None,
         rcpt: dict[str, Any] | None) -> dict[str, Any] | None:
    """The rows: what deduplication adds end to end, what the suppression lookup adds per
    recipient."""
    found = {s["key"]: s["summary"] for s in result["scenarios"]}
    base_key = f"shadow-2k-c20-pc{per_connection}-off"
    base = found.get(base_key) or found.get(f"relay-2k-c20-pc{per_connection}-plain")
    off = found.get(_KEY.format(pc=per_connection))
    lines: list[str] = []
    out: dict[str, Any] = {"suppression_lists": seeded, "rcpt_cost": rcpt}
    if base and off and base["relay_cpu_s_per_1000"] and off["relay_cpu_s_per_1000"]:
        added = 1000 * (base["relay_cpu_s_per_1000"] - off["relay_cpu_s_per_1000"])
        cmds = (base["redis_commands_per_msg"] or 0) - (off["redis_commands_per_msg"] or 0)
        out["dedup"] = {
            "on": figures(base), "off": figures(off), "added_relay_cpu_us_per_msg": added,
            "added_redis_commands_per_msg": cmds,
            "rate_ratio": base["rate_median"] / off["rate_median"] if off["rate_median"] else None,
        }
        lines.append(
            f"deduplication (2 KB, 20 sessions, {per_connection} msg/conn, plaintext; on = "
            f"{'the shadow trial-off relay' if base_key in found else 'the main relay'}): "
            f"relay CPU {added:+.0f} us per message "
            f"({100 * added / (1000 * off['relay_cpu_s_per_1000']):+.1f}%), "
            f"{cmds:+.2f} Redis commands per message, msg/s {base['rate_median']:,.0f} on vs "
            f"{off['rate_median']:,.0f} off, txn p50/p99 {base['txn_ms']['p50']:.1f}/"
            f"{base['txn_ms']['p99']:.1f} ms on vs {off['txn_ms']['p50']:.1f}/"
            f"{off['txn_ms']['p99']:.1f} ms off")
    if rcpt:
        us = rcpt["us_per_recipient"]
        lines.append(f"suppression lookup per RCPT (bench.rcpt_cost, {rcpt['count']:,} "
                     f"recipients one after another): reservation alone {us['reserve']:.1f} us, "
                     f"with the global lookup {us['suppression+reserve']:.1f} us "
                     f"(+{us['suppression+reserve'] - us['reserve']:.1f} us wall time)")
    if seeded:
        lines.append("suppression lists of every relay in this run: " + seeded["text"])
    if not lines:
        return None
    out["lines"] = lines
    return out

