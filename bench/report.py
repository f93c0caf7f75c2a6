"""Turning runs into figures: medians, percentiles, the table, the JSON and Markdown files."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MB = 1024 * 1024


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range of the end-to-end rate over the runs, CPU per 1,000 messages (from
    the runs' totals), the highest peak RSS, and transaction latency over all runs."""
    rates = [r["rate"] for r in runs]
    delivered = sum(r["delivered"] for r in runs)
    latencies = [x for r in runs for x in r.pop("_latencies", [])]
    setups = [x for r in runs for x in r.pop("_setups", [])]

    def per_1000(key: str) -> float | None:
        if delivered == 0 or any(r.get(key) is None for r in runs):
            return None
        return 1000 * sum(r[key] for r in runs) / delivered

    return {
        "rate_median": statistics.median(rates) if rates else 0.0,
        "rate_min": min(rates, default=0.0),
        "rate_max": max(rates, default=0.0),
        "e2e_median_s": statistics.median([r["e2e_s"] for r in runs]) if runs else 0.0,
        "delivered": delivered,
        "failed": sum(r["failed"] for r in runs),
        "relay_cpu_s_per_1000": per_1000("relay_cpu_s"),
        "redis_cpu_s_per_1000": per_1000("redis_cpu_s"),
        "redis_commands_per_msg": (sum(r["redis_commands"] for r in runs) / delivered)
        if delivered else None,
        "generator_cpu_s_per_1000": per_1000("generator_cpu_s"),
        "machine_busy_pct": statistics.median([r["machine_busy_pct"] for r in runs])
        if runs else 0.0,
        "relay_peak_rss_mb": max((r["relay_peak_rss"] for r in runs
                                  if r.get("relay_peak_rss")), default=0) / MB or None,
        "txn_ms": {f"p{q}": 1000 * percentile(latencies, q / 100) for q in (50, 95, 99)},
        "setup_ms": {f"p{q}": 1000 * percentile(setups, q / 100) for q in (50, 99)},
        "resumed_fraction": resumed_fraction(runs),
    }


def resumed_fraction(runs: list[dict[str, Any]]) -> float | None:
    """Of the connections that offered a previous TLS session, the share that resumed it
    (None for runs that offer none)."""
    offered = sum(r.get("tls_offered", 0) for r in runs)
    return sum(r.get("tls_resumed", 0) for r in runs) / offered if offered else None


def resumption_lines(by_key: dict[str, dict[str, Any]]) -> list[str]:
    """The resumed-TLS rows against Postfix's, like for like (a new connection per message,
    STARTTLS + AUTH, every returning client offering its previous session), and against the
    same shape without resumption."""
    lines = []
    for kb in ("2k", "100k"):
        relay = by_key.get(f"relay-{kb}-c20-pc1-tls-resume")
        if relay is None:
            continue
        m = relay["summary"]
        fraction = m.get("resumed_fraction") or 0.0
        line = (f"{kb.upper()}B, 20 sessions, 1 msg/conn, STARTTLS resumed + AUTH: relay "
                f"{m['rate_median']:,.0f} msg/s ({100 * fraction:.0f}% resumed)")
        full = by_key.get(f"relay-{kb}-c20-pc1-tls")
        if full and full["summary"]["rate_median"]:
            line += f", {m['rate_median'] / full['summary']['rate_median']:.2f}x full handshakes"
        twin = by_key.get(f"postfix-{kb}-c20-pc1-tls-auth-resume")
        if twin and twin["summary"]["rate_median"]:
            t = twin["summary"]
            line += (f"; vs Postfix submission {t['rate_median']:,.0f} msg/s "
                     f"({100 * (t.get('resumed_fraction') or 0.0):.0f}% resumed) = "
                     f"{m['rate_median'] / t['rate_median']:.2f}x")
        lines.append(line)
    return lines


def _size(size: int) -> str:
    return f"{size // MB} MB" if size >= MB else f"{size // 1024} KB"


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


HEADER = ("scenario", "size", "sess", "msg/conn", "msg/s median (min-max)", "e2e s",
          "relay CPU s/1k", "redis CPU s/1k", "redis cmds/msg (in Lua too)", "gen CPU s/1k",
          "busy %", "relay peak RSS MB", "txn p50/p99 ms")


def rows(scenarios: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    out = []
    for s in scenarios:
        m = s["summary"]
        flag = f" ! {m['failed']} failed" if m["failed"] else ""
        if m.get("resumed_fraction") is not None:
            flag += f" ({100 * m['resumed_fraction']:.0f}% resumed)"
        out.append((
            s["label"] + flag, _size(s["size"]), str(s["concurrency"]),
            str(s["per_connection"]),
            f"{m['rate_median']:,.0f} ({m['rate_min']:,.0f}-{m['rate_max']:,.0f})",
            f"{m['e2e_median_s']:.2f}",
            _num(m["relay_cpu_s_per_1000"], 2), _num(m["redis_cpu_s_per_1000"], 2),
            _num(m["redis_commands_per_msg"], 1),
            _num(m["generator_cpu_s_per_1000"], 2), f"{m['machine_busy_pct']:.0f}",
            _num(m["relay_peak_rss_mb"], 0),
            f"{m['txn_ms']['p50']:.1f}/{m['txn_ms']['p99']:.1f}",
        ))
    return out


def text_table(header: Sequence[str], body: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(lines)


def md_table(header: Sequence[str], body: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    return "\n".join(lines)


LATENCY_HEADER = ("shape", "rate msg/s", "relay p50/p95/p99 ms", "baseline p50/p95/p99 ms",
                  "added p50/p95/p99 ms", "relay p99 over the runs ms")


def latency_rows(latency: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    out = []
    for item in latency:
        r, b, a = item["relay_ms"], item["baseline_ms"], item["added_ms"]
        out.append((item["label"], f"{item['rate']:,.0f}",
                    f"{r['p50']:.2f} / {r['p95']:.2f} / {r['p99']:.2f}",
                    f"{b['p50']:.2f} / {b['p95']:.2f} / {b['p99']:.2f}",
                    f"{a['p50']:.2f} / {a['p95']:.2f} / {a['p99']:.2f}",
                    ", ".join(f"{r['p99']:.1f}" for r in item.get("relay_runs_ms", []))))
    return out


def render(result: dict[str, Any], markdown: bool) -> str:
    table = md_table if markdown else text_table
    parts = []
    head = result["header_lines"]
    parts.append("\n".join(("- " + line) if markdown else line for line in head))
    parts.append(table(HEADER, rows(result["scenarios"])))
    if result.get("latency"):
        parts.append(("**Added latency per transaction** " if markdown
                      else "Added latency per transaction ")
                     + "(MAIL FROM .. reply to the end of DATA; relay minus bare sink at the "
                       "same paced rate, Poisson arrivals; median of each percentile over the "
                       "runs):")
        parts.append(table(LATENCY_HEADER, latency_rows(result["latency"])))
        for item in result["latency"]:
            # Rendered by bench/latency_profile.py (which builds on this module's tables).
            rendered = item.get("profile_md" if markdown else "profile_text")
            if rendered:
                parts.append(("**Where the time goes**, " if markdown else "Where the time "
                              "goes, ") + item["label"] + " (bench/latency_profile.py):")
                parts.append(rendered)
    if result.get("redis_breakdown"):
        parts.append(("**Redis commands** " if markdown else "Redis commands: ")
                     + result["redis_breakdown"])
    if result.get("shadow"):
        parts.append(("**Shadow trial** " if markdown else "Shadow trial: ")
                     + result["shadow"]["text"])
    if result.get("features"):
        parts.append("**What the features cost**" if markdown else "What the features cost:")
        parts.append("\n".join(("- " if markdown else "  ") + t
                               for t in result["features"]["lines"]))
    if result.get("memory"):
        m = result["memory"]
        parts.append(("**Memory** " if markdown else "Memory: ") + m["text"])
    if result.get("idle_connections"):
        parts.append(("**Idle connections** " if markdown else "Idle connections: ")
                     + result["idle_connections"]["text"])
    for name, title in (("sessions", "Concurrent sessions"), ("scale", "Users in Redis")):
        if result.get(name):
            parts.append((f"**{title}** " if markdown else f"{title}: ") + result[name]["text"])
            parts.append(table(result[name]["header"], [tuple(r) for r in result[name]["rows"]]))
    if result.get("targets"):
        parts.append("**Against the targets**" if markdown
                      else "Against the targets:")
        parts.append("\n".join(("- " if markdown else "  ") + t for t in result["targets"]))
    if result.get("notes"):
        parts.append("**Notes**" if markdown else "Notes:")
        parts.append("\n".join(("- " if markdown else "  ") + n for n in result["notes"]))
    return "\n\n".join(parts) + "\n"


def write(result: dict[str, Any], directory: Path, stamp: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / f"{stamp}.json", directory / f"{stamp}.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path.write_text(f"# Benchmark {stamp}\n\n" + render(result, markdown=True))
    return json_path, md_path
