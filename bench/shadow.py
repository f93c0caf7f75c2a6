"""The shadow trial's cost per message (docs/shadow.md): the same load through three more
relays, identical but for ``RELAY_SHADOW_POLICIES_DIR`` (and with the same history: the
warm-up, then only their own scenario), in the same run, repetitions interleaved:

* **off**: no trial;
* **same**: a candidate of all three files deciding exactly as the live policies: every
  route, reservation and commit is evaluated beside the live one, and nothing differs (the
  cost of the evaluation alone);
* **differs**: the worst case. Its routing sends the load's app (``command``) to MailChimp,
  so every message is a ``shadow.differs`` (one more log line, a metric, a queued Redis
  count), and its plans and thresholds differ too (the bench users' huge custom limits make
  neither differ, but both are evaluated).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.harness import KB, Scenario
from bench.procs import REPO

VARIANTS = ("same", "differs")
_KEY = "shadow-2k-c20-pc{pc}-{variant}"
_LABELS = {"off": "relay -> sink, shadow trial off",
           "same": "relay -> sink, shadow trial on, nothing differs",
           "differs": "relay -> sink, shadow trial on, every message differs"}
_RULE = '[[rules]]\nname = "bench-trial"\napps = ["command"]\nroute = "mailchimp"\n\n'


def write_candidates(directory: Path) -> dict[str, Path | None]:
    """The candidate folders, by scenario target (``shadow-off`` has none)."""
    policies = REPO / "policies"
    same, differs = directory / "same", directory / "differs"
    for folder in (same, differs):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("plans.toml", "routing.toml", "notifications.toml"):
            shutil.copy(policies / name, folder / name)
    routing = (policies / "routing.toml").read_text(encoding="utf-8")
    first = routing.index("[[rules]]")
    (differs / "routing.toml").write_text(routing[:first] + _RULE + routing[first:],
                                          encoding="utf-8")
    plans = (policies / "plans.toml").read_text(encoding="utf-8")
    (differs / "plans.toml").write_text(
        plans.replace("monthly_limit = 5000", "monthly_limit = 2500", 1), encoding="utf-8")
    notices = (policies / "notifications.toml").read_text(encoding="utf-8")
    (differs / "notifications.toml").write_text(
        notices.replace("percent = [80, 85, 90, 95]", "percent = [50, 80, 85, 90, 95]"),
        encoding="utf-8")
    return {"shadow-off": None, "shadow-same": same, "shadow-differs": differs}


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    """Off, same, differs: 2 KB, 20 sessions, persistent connections, plaintext AUTH."""
    pc = args.per_connection
    return [Scenario(_KEY.format(pc=pc, variant=variant), _LABELS[variant],
                     f"shadow-{variant}", 2 * KB, 20, pc, False, True, args.messages_2k)
            for variant in ("off", *VARIANTS)]


def hooks(messages: int = 20_000) -> dict[str, Any] | None:
    """``python -m bench.shadow_hooks`` in a process of its own: the hooks' CPU alone."""
    try:
        done = subprocess.run([sys.executable, "-m", "bench.shadow_hooks", "--json",
                               "--messages", str(messages)], capture_output=True, text=True,
                              timeout=300, cwd=REPO, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def cost(result: dict[str, Any], per_connection: int,
         hooks: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """What the trial adds per message, against the trial off: relay CPU, throughput,
    transaction latency, Redis commands; and the hooks' own CPU (``hooks``)."""
    found = {s["key"]: s["summary"] for s in result["scenarios"]}
    off = found.get(_KEY.format(pc=per_connection, variant="off"))
    if off is None or not off["rate_median"] or off["relay_cpu_s_per_1000"] is None:
        return None
    summary: dict[str, Any] = {"off": figures(off), "hooks": hooks}
    texts = []
    for variant in VARIANTS:
        on = found.get(_KEY.format(pc=per_connection, variant=variant))
        if on is None or on["relay_cpu_s_per_1000"] is None:
            continue
        trial = summary[variant] = figures(on)
        added = trial["added_relay_cpu_us_per_msg"] = \
            1000 * (on["relay_cpu_s_per_1000"] - off["relay_cpu_s_per_1000"])
        trial["added_relay_cpu_pct"] = 100 * added / (1000 * off["relay_cpu_s_per_1000"])
        trial["rate_ratio"] = on["rate_median"] / off["rate_median"]
        texts.append(
            f"{variant}: relay CPU {added:+.0f} us per message "
            f"({trial['added_relay_cpu_pct']:+.1f}%), {trial['rate_ratio']:.2f}x the "
            f"msg/s, txn p50/p99 {trial['txn_ms'][0]:.1f}/{trial['txn_ms'][1]:.1f} ms, "
            f"{trial['redis_cmds_per_msg']:.2f} Redis commands per message")
    if not texts:
        return None
    o = summary["off"]
    summary["text"] = (
        f"2 KB, 20 sessions, {per_connection} msg/conn; off: "
        f"{o['relay_cpu_ms_per_msg']:.3f} ms relay CPU per message, {o['rate']:,.0f} msg/s, "
        f"txn p50/p99 {o['txn_ms'][0]:.1f}/{o['txn_ms'][1]:.1f} ms, "
        f"{o['redis_cmds_per_msg']:.2f} Redis commands per message; " + "; ".join(texts))
    if hooks is not None:
        us = hooks["us_per_message"]
        summary["text"] += (f". The hooks alone (bench.shadow_hooks, {hooks['messages']:,} "
                            f"messages in one process): off {us['off']:.1f} us, same "
                            f"{us['same']:.1f} us, differs {us['differs']:.1f} us per message")
    return summary


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    """A scenario's summary reduced to what a comparison of twin relays quotes (also
    bench/features.py)."""
    return {"rate": summary["rate_median"],
            "relay_cpu_ms_per_msg": summary["relay_cpu_s_per_1000"],
            "txn_ms": (summary["txn_ms"]["p50"], summary["txn_ms"]["p99"]),
            "redis_cmds_per_msg": summary["redis_commands_per_msg"] or 0.0,
            "failed": summary["failed"]}
