"""``command-relay shadow report`` (from the Redis counts, or ``--log`` from JSON log lines)
and check-config's line for the shadow folder, run as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from relay.decisions.shadow_counts import Counted, ShadowCounts
from tests.conftest import POLICIES, RedisServer
from tests.policy_files import shadow_plans
from tests.serving import clean_env


def run(args: list[str], env: dict[str, str], *, stdin: str = "",
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=40, cwd=cwd)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def line(kind: str, app: str, at: datetime, **fields: Any) -> str:
    return json.dumps({"kind": kind, "live": "command (counted)",
                       "candidate": "mailchimp (not counted)", "app": app, "txn_id": "t1",
                       "user_id": "u-1", **fields, "event": "shadow.differs",
                       "level": "info", "timestamp": at.isoformat()})


async def test_shadow_report_reads_the_redis_counts(
        redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """Counts by kind and by app over the last days, and the latest examples of each kind,
    as JSON and as text."""
    today = datetime.now(UTC).date()
    counts = ShadowCounts(redis_client)
    for n, (kind, app) in enumerate([("route", "campaigns")] * 3 + [("refusal", "direct")]):
        counts.add(Counted(today.isoformat(), kind, app,
                           {"kind": kind, "app": app, "live": "accepted", "n": n,
                            "candidate": "refused 550 5.7.1", "txn_id": f"t{n}"}))
    counts.add(Counted((today - timedelta(days=30)).isoformat(), "notice", "smartplans",
                       {"kind": "notice"}))
    await counts.idle()
    env = clean_env(RELAY_REDIS_URL=redis_server.url, RELAY_POLICIES_DIR=str(POLICIES),
                    RELAY_STATE_DIR=str(tmp_path / "state"))
    report = json.loads(ok(run(["shadow", "report", "--json", "--examples", "2"], env)))
    assert report["source"] == "redis" and len(report["days"]) == 7
    assert report["total"] == 4
    assert report["by_kind"] == {"route": 3, "refusal": 1, "notice": 0}
    assert report["by_app"] == {"campaigns": {"route": 3}, "direct": {"refusal": 1}}
    assert [e["n"] for e in report["examples"]["route"]] == [2, 1]
    assert report["examples"]["notice"] == []
    wide = json.loads(ok(run(["shadow", "report", "--json", "--days", "31"], env)))
    assert wide["by_kind"]["notice"] == 1 and wide["total"] == 5
    text = ok(run(["shadow", "report"], env))
    assert "4 differences" in text
    assert "campaigns" in text and "refused 550 5.7.1" in text and "txn_id=t2" in text


def test_shadow_report_reads_a_json_log_without_redis(tmp_path: Path) -> None:
    """--log FILE (or - for stdin): only shadow.differs lines count, a collector's prefix
    before the JSON is skipped, other lines are ignored, and no Redis is started."""
    now = datetime.now(UTC)
    log = tmp_path / "relay.log"
    log.write_text("\n".join([
        line("route", "campaigns", now),
        "2026-11-15T12:00:00Z relay[42]: " + line("refusal", "direct", now, used=4),
        json.dumps({"event": "delivery.finished", "kind": "route"}),
        "not json at all, shadow.differs",
        line("route", "campaigns", now - timedelta(days=40)),
        line("notice", "smartplans", now, worker=1),
    ]) + "\n", encoding="utf-8")
    env = clean_env(RELAY_POLICIES_DIR=str(POLICIES), RELAY_STATE_DIR=str(tmp_path / "state"))
    report = json.loads(ok(run(["shadow", "report", "--log", str(log), "--json"], env)))
    assert report["source"] == str(log)
    assert report["by_kind"] == {"route": 2, "refusal": 1, "notice": 1}
    assert report["by_app"] == {"campaigns": {"route": 2}, "direct": {"refusal": 1},
                                "smartplans": {"notice": 1}}
    [refusal] = report["examples"]["refusal"]
    assert refusal["used"] == 4 and refusal["at"] == now.isoformat()
    assert "worker" not in report["examples"]["notice"][0]
    recent = json.loads(ok(run(["shadow", "report", "--log", "-", "--days", "2", "--json"],
                               env, stdin=log.read_text(encoding="utf-8"))))
    assert recent["source"] == "stdin" and recent["by_kind"]["route"] == 1
    assert not (tmp_path / "state").exists()
    text = ok(run(["shadow", "report", "--log", str(log)], env))
    assert "4 differences" in text and "smartplans" in text
    empty = tmp_path / "empty.log"
    empty.write_text("", encoding="utf-8")
    assert "no differences" in ok(run(["shadow", "report", "--log", str(empty)], env))
    missing = run(["shadow", "report", "--log", str(tmp_path / "absent.log")], env)
    assert missing.returncode == 1
    assert "command-relay: error: cannot read" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_check_config_names_the_shadow_folder(tmp_path: Path) -> None:
    """check-config says what the shadow folder trials, and exits 1 naming a bad file (the
    relay would serve with the trial off)."""
    env = clean_env(RELAY_POLICIES_DIR=str(POLICIES), RELAY_STATE_DIR=str(tmp_path / "state"))
    assert "shadow policies: off" in ok(run(["check-config"], env, cwd=tmp_path))
    shadow = tmp_path / "shadow"
    shadow_plans(shadow, 4)
    env["RELAY_SHADOW_POLICIES_DIR"] = str(shadow)
    out = ok(run(["check-config"], env, cwd=tmp_path))
    assert f"shadow policies OK: {shadow}: plans.toml" in out
    (shadow / "routing.toml").write_text("[routes]\n", encoding="utf-8")
    result = run(["check-config"], env, cwd=tmp_path)
    assert result.returncode == 1
    assert f"command-relay: error: {shadow / 'routing.toml'}" in result.stderr
