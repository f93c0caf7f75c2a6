"""The main path end to end: forwarding intact, the quota exact at the limit (also under
concurrency and across relay instances), months and time zones, and the upstream pool."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aiosmtplib
import pytest
from structlog.testing import capture_logs

from relay.config.endpoints import UpstreamTarget
from relay.store import keys
from tests.conftest import (
    PASSWORD,
    CapturingUpstream,
    MutableClock,
    RelayFactory,
    UpstreamBehaviour,
    add_app,
    add_user,
    message,
    smtp_client,
)


def _after_received(content: bytes) -> bytes:
    """The forwarded bytes without the one Received: header the relay adds."""
    assert content.startswith(b"Received: from ")
    end = content.index(b"\r\n", content.index(b"\r\n\t", content.index(b" id ")) + 1)
    return content[end + 2:]


async def test_relay_forwards_bytes_unchanged_but_for_received_and_control_headers(
        relay, upstream, accounts):
    """Body and headers arrive byte for byte; one Received: is added; X-KW-* are stripped."""
    await add_user(accounts)
    original = (b"From: agent@kw.test\r\nTo: a@example.test\r\nSubject: =?utf-8?q?Caf=C3=A9?=\r\n"
                b"X-KW-SmartPlan-Id: sp-123\r\nX-Custom: kept\r\n\tfolded\r\n\r\n"
                b"..leading dots survive\r\n.\r\nlines with  trailing spaces  \r\n"
                b"8bit: caf\xc3\xa9\r\n")
    async with smtp_client(relay) as client:
        await client.sendmail("agent@kw.test", ["a@example.test"], original,
                              mail_options=["BODY=8BITMIME"])
    forwarded = upstream.messages[0].content
    assert _after_received(forwarded) == original.replace(b"X-KW-SmartPlan-Id: sp-123\r\n", b"")
    assert forwarded.count(b"Received:") == 1
    assert b"\tby relay.test (Command Email Relay) with ESMTPA id " in forwarded
    assert upstream.messages[0].rcpt_tos == ["a@example.test"]


async def test_relay_counts_one_send_per_accepted_recipient(relay, upstream, accounts):
    """A message to three recipients is three sends, and usage reads 3."""
    user = await add_user(accounts)
    async with smtp_client(relay) as client:
        errors, reply = await client.sendmail(
            "agent@kw.test", ["a@example.test", "b@example.test", "c@example.test"], message())
    assert errors == {}
    assert reply.startswith("2.0.0 Message accepted")
    usage = await relay.quota.usage(user.id, "2026-11")
    assert (usage.used, usage.delivered, usage.in_flight) == (3, 3, 0)


async def test_relay_partial_acceptance_at_the_limit(relay, upstream, accounts):
    """Limit 3, five recipients: three accepted and delivered, two refused with the policy
    reply naming the count and the reset date."""
    user = await add_user(accounts, limit=3)
    rcpts = [f"r{i}@example.test" for i in range(5)]
    with capture_logs() as logs:
        async with smtp_client(relay) as client:
            errors, _ = await client.sendmail("agent@kw.test", rcpts, message())
    assert sorted(errors) == rcpts[3:]
    for refusal in errors.values():
        assert refusal.code == 550
        assert refusal.message.startswith("5.7.1 Monthly Command Email limit reached")
        assert "(3 of 3 sends used)" in refusal.message
        assert "December 1, 2026" in refusal.message
    assert upstream.messages[0].rcpt_tos == rcpts[:3]
    assert (await relay.quota.usage(user.id, "2026-11")).used == 3
    refused = [e for e in logs if e["event"] == "rcpt.refused"]
    assert [e["reason"] for e in refused] == ["QuotaExceededError"] * 2
    assert all(e["rcpt_domain"] == "example.test" for e in refused)
    assert "r3@example.test" not in repr(logs)  # recipients are logged as domains only


async def test_relay_over_limit_reply_follows_policy(make_relay: RelayFactory,
                                                     upstream: CapturingUpstream, accounts,
                                                     tmp_path):
    """An operator can make the over-limit reply temporary in plans.toml."""
    import shutil

    policies = tmp_path / "policies"
    shutil.copytree("policies", policies)
    text = (policies / "plans.toml").read_text()
    (policies / "plans.toml").write_text(
        text.replace("code = 550", "code = 452").replace('status = "5.7.1"', 'status = "4.5.3"'))
    await add_user(accounts, limit=1)
    app = await make_relay(upstream=upstream, policies_dir=policies)
    async with smtp_client(app) as client:
        errors, _ = await client.sendmail("agent@kw.test", ["a@example.test", "b@example.test"],
                                          message())
    assert errors["b@example.test"].code == 452
    assert errors["b@example.test"].message.startswith("4.5.3 ")


async def test_relay_exact_limit_under_concurrency(relay, upstream, accounts):
    """Limit 20, 50 concurrent clients: exactly 20 recipients reach the upstream; count 20."""
    user = await add_user(accounts, limit=20)

    async def one(i: int) -> bool:
        async with smtp_client(relay) as client:
            errors, _ = await client.sendmail("agent@kw.test", [f"r{i}@example.test"],
                                              message())
        return not errors

    async def attempt(i: int) -> bool:
        try:
            return await one(i)
        except aiosmtplib.SMTPRecipientsRefused:
            return False

    results = await asyncio.gather(*(attempt(i) for i in range(50)))
    assert sum(results) == 20
    assert sum(len(m.rcpt_tos) for m in upstream.messages) == 20
    usage = await relay.quota.usage(user.id, "2026-11")
    assert (usage.used, usage.delivered) == (20, 20)


async def test_relay_exact_limit_across_two_relay_instances(make_relay: RelayFactory,
                                                            upstream: CapturingUpstream,
                                                            accounts, redis_server):
    """Two relay instances with their own Redis connections share one exact count."""
    from relay.store.client import connect_redis

    user = await add_user(accounts, limit=15)
    await add_app(accounts, "command")  # decided at RCPT: per-recipient replies
    other_redis = connect_redis(redis_server.url, timeout=2)
    try:
        first = await make_relay(upstream=upstream)
        second = await make_relay(upstream=upstream, redis=other_redis)

        async def send(app, i: int) -> int:
            async with smtp_client(app, login="command") as client:
                errors, _ = await client.sendmail(
                    "agent@kw.test", [f"a{i}@example.test", f"b{i}@example.test"], message())
            return 2 - len(errors)

        accepted = await asyncio.gather(
            *(send(first if i % 2 else second, i) for i in range(20)),
            return_exceptions=True)
        delivered = sum(a for a in accepted if isinstance(a, int))
        assert delivered == 15
        assert sum(len(m.rcpt_tos) for m in upstream.messages) == 15
        assert (await first.quota.usage(user.id, "2026-11")).used == 15
    finally:
        await other_redis.aclose()


async def test_relay_month_rollover_starts_at_zero(relay, upstream, accounts,
                                                   clock: MutableClock):
    """Blocked at the end of November, sending again at 00:00 on December 1 (no job runs)."""
    user = await add_user(accounts, limit=2)
    clock.current = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
    async with smtp_client(relay) as client:
        errors, _ = await client.sendmail(
            "agent@kw.test", ["a@example.test", "b@example.test", "c@example.test"], message())
        assert list(errors) == ["c@example.test"]
        clock.current = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
        errors, _ = await client.sendmail("agent@kw.test", ["c@example.test"], message())
        assert errors == {}
    assert (await relay.quota.usage(user.id, "2026-11")).used == 2
    assert (await relay.quota.usage(user.id, "2026-12")).used == 1


async def test_relay_month_follows_user_time_zone(relay, upstream, accounts,
                                                  clock: MutableClock):
    """At 05:00 UTC on December 1 it is still November in Los Angeles, December in Auckland."""
    west = await add_user(accounts, "west@kw.test", tz="America/Los_Angeles")
    east = await add_user(accounts, "east@kw.test", tz="Pacific/Auckland")
    clock.current = datetime(2026, 12, 1, 5, 0, tzinfo=UTC)
    for login in ("west@kw.test", "east@kw.test"):
        async with smtp_client(relay, login=login) as client:
            await client.sendmail(login, ["a@example.test"], message())
    assert (await relay.quota.usage(west.id, "2026-11")).used == 1
    assert (await relay.quota.usage(east.id, "2026-12")).used == 1
    assert (await relay.quota.usage(east.id, "2026-11")).used == 0


async def test_relay_raised_limit_applies_to_the_next_recipient(relay, upstream, accounts,
                                                                redis_client):
    """A blocked user whose limit is raised mid-session can send at once, on the same
    connection; the refused recipient is not retried by the relay."""
    user = await add_user(accounts, limit=1)
    async with smtp_client(relay) as client:
        errors, _ = await client.sendmail("agent@kw.test", ["a@example.test", "b@example.test"],
                                          message())
        assert list(errors) == ["b@example.test"]
        await redis_client.hset(keys.user(user.id), "limit", 10)
        errors, _ = await client.sendmail("agent@kw.test", ["c@example.test"], message())
        assert errors == {}
    assert [m.rcpt_tos for m in upstream.messages] == [["a@example.test"], ["c@example.test"]]
    assert (await relay.quota.usage(user.id, "2026-11")).used == 2


async def test_relay_too_many_recipients_gets_452(make_relay: RelayFactory,
                                                  upstream: CapturingUpstream, accounts):
    """Past max_recipients the client is told 452 4.5.3 and nothing extra is counted."""
    user = await add_user(accounts)
    app = await make_relay(upstream=upstream, max_recipients=2)
    async with smtp_client(app) as client:
        errors, _ = await client.sendmail(
            "agent@kw.test", ["a@example.test", "b@example.test", "c@example.test"], message())
    assert errors["c@example.test"].code == 452
    assert (await app.quota.usage(user.id, "2026-11")).used == 2


async def test_relay_size_limit_advertised_and_enforced(make_relay: RelayFactory,
                                                        upstream: CapturingUpstream, accounts):
    """SIZE is advertised; a declared or actual oversize message gets 552 and is not counted."""
    user = await add_user(accounts)
    app = await make_relay(upstream=upstream, max_message_size=2000)
    async with smtp_client(app) as client:
        assert client.esmtp_extensions["size"] == "2000"
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.mail("agent@kw.test", options=["SIZE=5000"])
        assert refused.value.code == 552
        await client.rset()
        await client.mail("agent@kw.test")  # no SIZE declared: caught while reading DATA
        await client.rcpt("a@example.test")
        with pytest.raises(aiosmtplib.SMTPDataError) as too_big:
            await client.data(message(body="x" * 70 + "\r\n") * 40)
        assert too_big.value.code == 552
    assert upstream.messages == []
    await app.handler.drain()
    assert (await app.quota.usage(user.id, "2026-11")).used == 0


async def test_relay_smtputf8_is_forwarded(relay, upstream, accounts):
    """An internationalized recipient with SMTPUTF8 reaches an upstream that supports it."""
    await add_user(accounts)
    async with smtp_client(relay) as client:
        assert "smtputf8" in client.esmtp_extensions
        await client.mail("agent@kw.test", options=["SMTPUTF8"])
        await client.rcpt("josé@example.test", encoding="utf-8")
        await client.data(message())
    assert upstream.messages[0].rcpt_tos == ["josé@example.test"]
    assert "SMTPUTF8" in upstream.messages[0].mail_options


async def test_relay_reuses_pooled_upstream_connections(relay, upstream, accounts):
    """Sequential messages travel over one persistent upstream connection (after an accepted
    DATA the upstream transaction is over: no RSET round trip is needed)."""
    await add_user(accounts)
    for _ in range(3):
        async with smtp_client(relay) as client:
            await client.sendmail("agent@kw.test", ["a@example.test"], message())
    assert len(upstream.messages) == 3
    assert upstream.handler.connections == 1


async def test_relay_upstream_starttls_and_auth(make_relay: RelayFactory, accounts, tls_files):
    """smtp+starttls://user:pass@… upgrades to TLS (certificate verified) and logs in once."""
    from relay.smtp.tls import server_context

    cert, key = tls_files
    secure = CapturingUpstream(UpstreamBehaviour(credentials=("relay-user", "s3cret")),
                               tls=server_context(cert, key))
    await secure.start()
    try:
        await add_user(accounts)
        app = await make_relay(
            upstream_ca_file=cert,
            target=UpstreamTarget("127.0.0.1", secure.port, "starttls", "relay-user", "s3cret"))
        for _ in range(2):
            async with smtp_client(app) as client:
                await client.sendmail("agent@kw.test", ["a@example.test"], message())
        assert len(secure.messages) == 2
        assert secure.handler.auth_logins == ["relay-user"]
    finally:
        await secure.stop()


async def test_relay_upstream_certificate_is_verified(make_relay: RelayFactory, accounts,
                                                      tls_files):
    """An upstream whose certificate is not trusted is treated as unreachable (451 4.4.1)."""
    from relay.smtp.tls import server_context

    cert, key = tls_files
    secure = CapturingUpstream(UpstreamBehaviour(), tls=server_context(cert, key))
    await secure.start()
    try:
        await add_user(accounts)
        app = await make_relay(target=UpstreamTarget("127.0.0.1", secure.port, "starttls"))
        async with smtp_client(app) as client:
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await client.mail("agent@kw.test")
        assert (refused.value.code, refused.value.message[:5]) == (451, "4.4.1")
    finally:
        await secure.stop()


async def test_relay_logs_one_canonical_line_per_transaction(relay, upstream, accounts):
    """delivery.finished carries the stable operator fields, and no body or password."""
    await add_user(accounts)
    with capture_logs() as logs:
        async with smtp_client(relay) as client:
            await client.sendmail("agent@kw.test", ["a@example.test"],
                                  message(body="secret body text\r\n"))
    finished = [e for e in logs if e["event"] == "delivery.finished"]
    assert len(finished) == 1
    line = finished[0]
    for field in ("session_id", "peer", "login", "app", "user_id", "plan", "txn_id",
                  "sender_domain", "rcpt_accepted", "rcpt_refused", "size", "upstream",
                  "smtp_code", "used", "limit", "outcome", "duration_ms"):
        assert field in line, field
    assert line["outcome"] == "delivered" and line["smtp_code"] == 250
    assert "secret body text" not in repr(logs) and PASSWORD not in repr(logs)
