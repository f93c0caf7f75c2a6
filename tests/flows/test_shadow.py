"""Policies trialled in shadow, end to end over SMTP (docs/shadow.md): candidate routing,
plans and thresholds evaluated beside the live ones on every decision, logged as
``shadow.differs``, counted in metrics and in Redis; live mail unchanged; a bad shadow file
turns the trial off without touching live mail; a reload takes the shadow folder along."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import aiosmtplib
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from relay.admin.shadow_report import from_log
from relay.decisions import shadow_trial
from relay.decisions.shadow_counts import ShadowCounts
from relay.events.stream import EventLog
from relay.identity.accounts import AccountStore
from relay.process.wiring import RelayApp
from relay.store import keys
from tests.conftest import (
    CapturingUpstream,
    RelayFactory,
    add_app,
    add_user,
    message,
    smtp_client,
)
from tests.policy_files import (
    policies_copy,
    shadow_notifications,
    shadow_plans,
    shadow_routing,
)

DAY, PERIOD = "2026-11-15", "2026-11"  # the conftest clock's day and month
TO_MAILCHIMP = '[[rules]]\nname = "trial"\napps = ["campaigns", "direct"]\nroute = "mailchimp"'


def metric(app: RelayApp, name: str, **labels: str) -> float:
    value = app.metrics.registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


def differences(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e["event"] == "shadow.differs"]


async def send(app: RelayApp, login: str = "agent@kw.test",
               to: tuple[str, ...] = ("client@example.test",)) -> dict:
    async with smtp_client(app, login=login) as client:
        refused, _ = await client.sendmail("agent@kw.test", list(to), message())
    return refused


async def sent_already(redis: aioredis.Redis, user_id: str, count: int) -> None:
    await redis.hset(keys.usage(user_id, PERIOD), mapping={"used": count, "delivered": count})


async def test_shadow_routes_campaigns_to_mailchimp_while_live_mail_goes_to_command(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """The candidate routes Campaigns (decided at the end of DATA) and direct logins
    (decided at MAIL FROM) to MailChimp: both messages still go to Command Email and are
    counted; each decision is logged as shadow.differs, counted in the metric and in the
    day's Redis counts, with an example naming the transaction."""
    user = await add_user(accounts)
    await add_app(accounts, "campaigns")
    shadow_routing(tmp_path / "shadow", TO_MAILCHIMP)
    app: RelayApp = await make_relay(upstream=upstream, shadow_policies_dir=tmp_path / "shadow")
    assert metric(app, "relay_shadow_enabled") == 1
    with capture_logs() as logs:
        assert await send(app, login="campaigns") == {}
        assert await send(app) == {}
    assert len(upstream.messages) == 2
    assert all(m.mail_from == "agent@kw.test" and m.rcpt_tos == ["client@example.test"]
               for m in upstream.messages)
    assert (await redis_client.hgetall(keys.usage(user.id, PERIOD)))["delivered"] == "2"

    found = differences(logs)
    assert sorted(e["app"] for e in found) == ["campaigns", "direct"]
    for entry in found:
        assert (entry["kind"], entry["live"], entry["candidate"]) == (
            "route", "command (counted)", "mailchimp (not counted)")
        assert (entry["live_rule"], entry["candidate_rule"]) == ("everything-else-command",
                                                                  "trial")
        assert entry["user_id"] == user.id and entry["txn_id"]
    finished = {e["txn_id"]: e for e in logs if e["event"] == "delivery.finished"}
    assert {e["txn_id"] for e in found} == set(finished)
    assert all(e["route"] == "command" and e["outcome"] == "delivered"
               for e in finished.values())

    assert metric(app, "relay_shadow_differences_total", kind="route") == 2
    assert metric(app, "relay_shadow_differences_total", kind="refusal") == 0
    await app.shadow_counts.idle()
    counts = await redis_client.hgetall(keys.shadow_counts(DAY))
    assert counts == {"kind:route": "2", "app:campaigns:route": "1", "app:direct:route": "1"}
    examples = [json.loads(e) for e in
                await redis_client.lrange(keys.shadow_examples(DAY, "route"), 0, -1)]
    assert {e["txn_id"] for e in examples} == set(finished)
    assert all(e["at"].startswith(DAY) and e["user_id"] == user.id for e in examples)
    # The log lines make the same report as the counts.
    report = from_log((json.dumps(e) for e in logs), examples=5)
    assert (report["total"], report["by_app"]) == (2, {"campaigns": {"route": 1},
                                                       "direct": {"route": 1}})


async def test_shadow_lower_plan_limit_names_the_refusal_it_would_have_made(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """Live free plan 5,000, candidate 4, four sends made: the fifth is delivered, and the
    shadow logs the 550 the candidate would have answered. At the live limit, a candidate
    with room would have accepted what live refused."""
    user = await add_user(accounts)
    shadow_plans(tmp_path / "shadow", 4)
    app: RelayApp = await make_relay(upstream=upstream, shadow_policies_dir=tmp_path / "shadow")
    await sent_already(redis_client, user.id, 4)
    with capture_logs() as logs:
        assert await send(app) == {}
    assert len(upstream.messages) == 1
    [found] = differences(logs)
    assert (found["kind"], found["live"], found["candidate"]) == ("refusal", "accepted",
                                                                  "refused 550 5.7.1")
    assert (found["used"], found["units"], found["live_limit"], found["candidate_limit"]) == \
        (4, 1, 5000, 4)
    assert "(4 of 4 sends used)" in found["candidate_reply"]
    assert metric(app, "relay_shadow_differences_total", kind="refusal") == 1

    # Over the live limit: the client hears the live 550; the candidate (4) refuses too.
    await sent_already(redis_client, user.id, 5000)
    with capture_logs() as logs, pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(app)
    assert differences(logs) == []
    assert len(upstream.messages) == 1


async def test_shadow_candidate_with_room_would_have_accepted(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, tmp_path: Path) -> None:
    user = await add_user(accounts)
    shadow_plans(tmp_path / "shadow", 6000)
    app: RelayApp = await make_relay(upstream=upstream, shadow_policies_dir=tmp_path / "shadow")
    await sent_already(redis_client, user.id, 5000)
    with capture_logs() as logs, pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await send(app)
    assert refused.value.recipients[0].code == 550
    [found] = differences(logs)
    assert (found["kind"], found["live"], found["candidate"]) == ("refusal",
                                                                  "refused 550 5.7.1",
                                                                  "accepted")
    assert upstream.messages == []


async def test_shadow_threshold_table_names_the_notice_it_would_have_sent(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """Candidate thresholds [50]: the 5th delivered send of a 10-send limit crosses 50 %.
    The live thresholds (80 %…) cross nothing, and no notice is sent."""
    user = await add_user(accounts, limit=10)
    shadow_notifications(tmp_path / "shadow", [50])
    app: RelayApp = await make_relay(upstream=upstream, shadow_policies_dir=tmp_path / "shadow")
    await sent_already(redis_client, user.id, 4)
    with capture_logs() as logs:
        assert await send(app) == {}
    [found] = differences(logs)
    assert (found["kind"], found["live"], found["candidate"]) == (
        "notice", "none", "50% (in_app, email)")
    assert (found["delivered"], found["live_limit"], found["candidate_limit"]) == (5, 10, 10)
    assert metric(app, "relay_shadow_differences_total", kind="notice") == 1
    kinds = [e.kind for _, e in await EventLog(redis_client).recent(100)]
    assert "quota.threshold" not in kinds


async def test_shadow_bad_file_leaves_live_mail_alone(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        tmp_path: Path) -> None:
    """A shadow plans.toml that does not parse: the relay starts, logs shadow.invalid naming
    the file, the trial is off, and mail is relayed and counted as always."""
    await add_user(accounts)
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "plans.toml").write_text("[plans.free]\nmonthly_limit = -1\n", encoding="utf-8")
    with capture_logs() as logs:
        app: RelayApp = await make_relay(upstream=upstream, shadow_policies_dir=shadow)
        assert await send(app) == {}
    [invalid] = [e for e in logs if e["event"] == "shadow.invalid"]
    assert str(shadow / "plans.toml") in invalid["error"]
    assert invalid["log_level"] == "error"
    assert not app.handler.services.shadow.enabled
    assert metric(app, "relay_shadow_enabled") == 0
    assert differences(logs) == []
    assert len(upstream.messages) == 1


async def test_shadow_reloads_with_the_live_policies(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        tmp_path: Path) -> None:
    """An empty shadow folder trials nothing; after a candidate is written and the policies
    reloaded it is evaluated; a shadow file broken before the next reload turns the trial
    off while the live policies are reloaded; a bad live file changes nothing, the shadow
    included."""
    await add_user(accounts)
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    live = policies_copy(tmp_path)
    with capture_logs() as logs:
        app: RelayApp = await make_relay(upstream=upstream, policies_dir=live,
                                         shadow_policies_dir=shadow)
        assert await send(app) == {}
    assert [e["reason"] for e in logs if e["event"] == "shadow.off"] == [
        "no policy file in the folder"]
    assert differences(logs) == []

    shadow_routing(shadow, TO_MAILCHIMP)
    with capture_logs() as logs:
        assert await app.reload_policies() is True
        assert await send(app) == {}
    [enabled] = [e for e in logs if e["event"] == "shadow.enabled"]
    assert enabled["files"] == ["routing.toml"]
    assert [e["candidate"] for e in differences(logs)] == ["mailchimp (not counted)"]
    trial = app.handler.services.shadow
    assert trial.enabled and trial.policies is not None
    assert trial.policies[0] is app.policies

    (shadow / "routing.toml").write_text("[routes]\n", encoding="utf-8")
    with capture_logs() as logs:
        assert await app.reload_policies() is True
        assert await send(app) == {}
    assert [e["event"] for e in logs if e["event"].startswith("shadow.")] == ["shadow.invalid"]
    assert not app.handler.services.shadow.enabled
    assert metric(app, "relay_shadow_enabled") == 0

    shadow_routing(shadow, TO_MAILCHIMP)
    assert await app.reload_policies() is True
    trial = app.handler.services.shadow
    assert trial.enabled
    (live / "plans.toml").write_text("broken", encoding="utf-8")
    assert await app.reload_policies() is False
    assert app.handler.services.shadow is trial
    assert len(upstream.messages) == 3


async def test_shadow_bug_never_reaches_the_client(
        make_relay: RelayFactory, upstream: CapturingUpstream, accounts: AccountStore,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluation that raises (a bug, injected here) is logged as shadow.failed and
    counted; the message is delivered as if there were no shadow."""
    await add_user(accounts)
    shadow_routing(tmp_path / "shadow", TO_MAILCHIMP)
    app: RelayApp = await make_relay(upstream=upstream, shadow_policies_dir=tmp_path / "shadow")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(shadow_trial, "route_difference", broken)
    with capture_logs() as logs:
        assert await send(app) == {}
    [failed] = [e for e in logs if e["event"] == "shadow.failed"]
    assert failed["step"] == "route" and failed["log_level"] == "error"
    assert metric(app, "relay_shadow_errors_total") == 1
    assert len(upstream.messages) == 1


def test_shadow_hooks_never_wait() -> None:
    """Every hook the SMTP path calls is synchronous: it cannot await Redis or anything
    else, so the shadow adds no round trip to a reply."""
    hooks = [shadow_trial.ShadowTrial.route, shadow_trial.ShadowTrial.watch,
             shadow_trial.Watch.route, shadow_trial.Watch.reserved,
             shadow_trial.Watch.committed, ShadowCounts.add]
    assert not any(inspect.iscoroutinefunction(hook) for hook in hooks)
