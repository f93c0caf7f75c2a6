"""The notifier end to end: events from the Redis stream reach a real HTTP receiver (signed,
with the event id as the idempotency key) and the user's inbox through a real SMTP upstream;
failures are retried with capped exponential backoff, then dead-lettered and re-queued;
several notifiers share the work and take over from one that died; nothing is lost and no
channel that succeeded is repeated."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from relay.config.endpoints import UpstreamTarget
from relay.config.policies import Notifications, load_policies
from relay.delivery.pool import SmtpUpstream
from relay.events.channels import Channel, EmailChannel, WebhookChannel, sign
from relay.events.notifier import GROUP, Notifier
from relay.events.stream import (
    PLAN_CHANGED,
    REACHED,
    REJECTED,
    THRESHOLD,
    Event,
    EventLog,
    new_event,
)
from relay.store import keys
from tests.conftest import (
    POLICIES,
    CapturingUpstream,
    add_user,
    free_port,
    message,
    smtp_client,
    wait_for,
)
from tests.webhooks import WEBHOOK_SECRET as SECRET
from tests.webhooks import Receiver

NOTICE_FROM = "Command Email <no-reply@command-email.example>"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def mail_upstream(upstream: CapturingUpstream) -> AsyncIterator[SmtpUpstream]:
    """The notifier's own pool to the capturing upstream, as ``run_notifier`` builds it."""
    pool = SmtpUpstream(UpstreamTarget("127.0.0.1", upstream.port, "none"), size=2, timeout=5,
                        local_hostname="relay.test")
    yield pool
    await pool.close()


# -- helpers ----------------------------------------------------------------------------------
def fast_policy(**changes: Any) -> Notifications:
    """The shipped policy with retries fast enough for tests."""
    policy = dataclasses.replace(load_policies(POLICIES).notifications, backoff_base=0.01,
                                 backoff_max=0.05, reclaim_idle=0.2, max_attempts=3)
    return dataclasses.replace(policy, **changes)


def webhook(receiver: Receiver, http: aiohttp.ClientSession, path: str = "/notify",
            secret: str = SECRET) -> WebhookChannel:
    return WebhookChannel(receiver.url(path), secret, timeout=5, session=http)


def email_channel(pool: SmtpUpstream) -> EmailChannel:
    return EmailChannel(pool, sender=NOTICE_FROM, hostname="relay.test")


def threshold_event(kind: str = THRESHOLD, user_id: str = "u-1", **changes: Any) -> Event:
    data: dict[str, Any] = {
        "email": "agent@kw.test", "app": "direct", "sender": "agent@kw.test",
        "txn_id": "txn-1", "period": "2026-11", "used": 4000, "limit": 5000, "percent": 80,
        "resets_at": "2026-12-01T00:00:00+00:00", "resets_on": "December 1, 2026"}
    data.update(changes)
    return new_event(kind, user_id, **data)


def notifier(redis: aioredis.Redis, channels: Mapping[str, Channel],
             policy: Notifications | None = None, consumer: str = "n1",
             sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> Notifier:
    return Notifier(redis, channels, policy or fast_policy(), consumer=consumer, sleep=sleep,
                    jitter=lambda: 1.0)


@asynccontextmanager
async def running(worker: Notifier) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``worker`` as a task; stop it (letting deliveries in progress finish) on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield task
    finally:
        stop.set()
        if not task.done():
            await task


async def pending_count(redis: aioredis.Redis) -> int:
    return int((await redis.xpending(keys.events(), GROUP))["pending"])


async def settled(redis: aioredis.Redis) -> bool:
    """Every entry read by the group has been acknowledged."""
    return await pending_count(redis) == 0


def notices(upstream: CapturingUpstream) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(m.content, policy=email.policy.default)
            for m in upstream.messages]


# -- the webhook channel ----------------------------------------------------------------------
async def test_notify_webhook_delivers_signed_event_with_idempotency_key(
        redis_client, receiver, http):
    """The POST body is the event as JSON; Idempotency-Key is the event id; the signature
    verifies with the shared secret over "<timestamp>.<body>" and not with another one."""
    event = threshold_event()
    await EventLog(redis_client).publish(event)
    async with running(notifier(redis_client, {"in_app": webhook(receiver, http)})):
        await wait_for(lambda: receiver.delivered())
        await wait_for(lambda: settled(redis_client))
    [request] = receiver.requests
    assert json.loads(request.body) == json.loads(event.to_json())
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Idempotency-Key"] == event.id
    assert request.headers["X-Relay-Event"] == "quota.threshold"
    timestamp = request.headers["X-Relay-Timestamp"]
    assert timestamp.isdigit()
    signature = request.headers["X-Relay-Signature"]
    assert signature == sign(SECRET.encode(), timestamp, request.body)
    assert signature != sign(b"some-other-secret-0123456789", timestamp, request.body)
    assert signature != sign(SECRET.encode(), str(int(timestamp) + 1), request.body)


async def test_notify_webhook_retries_503_then_delivers_once(redis_client, receiver, http):
    """503, 503, then 200: the event is delivered on the third attempt, once, and acked."""
    receiver.statuses = [503, 503]
    event = threshold_event()
    await EventLog(redis_client).publish(event)
    async with running(notifier(redis_client, {"in_app": webhook(receiver, http)})):
        await wait_for(lambda: receiver.delivered())
        await wait_for(lambda: settled(redis_client))
    assert [r.status for r in receiver.requests] == [503, 503, 200]
    assert {r.event_id for r in receiver.requests} == {event.id}
    assert await EventLog(redis_client).dead() == []


@pytest.mark.parametrize("jitter", [1.0, 0.5])
async def test_notify_backoff_grows_exponentially_and_is_capped(redis_client, receiver, http,
                                                               jitter):
    """Delays between attempts are base * 2^(n-1), capped at backoff_max, times the jitter
    factor (full jitter: random in [0, 1) in production)."""
    receiver.statuses = [503] * 5
    delays: list[float] = []

    async def record(seconds: float) -> None:
        delays.append(seconds)
        await asyncio.sleep(0)

    policy = fast_policy(backoff_base=1.0, backoff_max=4.0, max_attempts=8, reclaim_idle=60.0)
    worker = Notifier(redis_client, {"in_app": webhook(receiver, http)}, policy,
                      consumer="n1", sleep=record, jitter=lambda: jitter)
    await EventLog(redis_client).publish(threshold_event())
    async with running(worker):
        await wait_for(lambda: receiver.delivered())
        await wait_for(lambda: settled(redis_client))
    assert len(receiver.requests) == 6
    assert delays == [d * jitter for d in (1.0, 2.0, 4.0, 4.0, 4.0)]


async def test_notify_webhook_429_is_retried(redis_client, receiver, http):
    """429 Too Many Requests is temporary: retried, then delivered, no dead letter."""
    receiver.statuses = [429]
    await EventLog(redis_client).publish(threshold_event())
    async with running(notifier(redis_client, {"in_app": webhook(receiver, http)})):
        await wait_for(lambda: receiver.delivered())
        await wait_for(lambda: settled(redis_client))
    assert [r.status for r in receiver.requests] == [429, 200]
    assert await EventLog(redis_client).dead() == []


async def test_notify_webhook_400_is_dead_lettered_at_once(redis_client, receiver, http):
    """A 400 cannot get better by retrying: one attempt, then the dead-letter stream; the
    entry is acknowledged."""
    receiver.statuses = [400]
    event = threshold_event()
    events = EventLog(redis_client)
    await events.publish(event)
    async with running(notifier(redis_client, {"in_app": webhook(receiver, http)})):
        await wait_for(events.dead)
        await wait_for(lambda: settled(redis_client))
    [letter] = await events.dead()
    assert (letter.event.id, letter.channel, letter.error, letter.attempts) == \
        (event.id, "in_app", "HTTP 400", 1)
    assert [r.status for r in receiver.requests] == [400]


async def test_notify_webhook_dead_letters_after_max_attempts(redis_client, receiver, http):
    """503 on every one of max_attempts (3) tries: the event goes to the dead-letter stream
    with the channel, the error and the attempts, and leaves the group's pending list."""
    receiver.statuses = [503] * 10
    event = threshold_event()
    events = EventLog(redis_client)
    await events.publish(event)
    with capture_logs() as logs:
        async with running(notifier(redis_client, {"in_app": webhook(receiver, http)})):
            await wait_for(events.dead)
            await wait_for(lambda: settled(redis_client))
    [letter] = await events.dead()
    assert letter.event == event
    assert (letter.channel, letter.error, letter.attempts) == ("in_app", "HTTP 503", 3)
    assert len(receiver.requests) == 3
    assert (await redis_client.xpending(keys.events(), GROUP))["pending"] == 0
    assert [e["attempts"] for e in logs if e["event"] == "notify.dead_lettered"] == [3]


async def test_notify_webhook_unreachable_is_retried_then_dead_lettered(redis_client, http):
    """Nothing listening (connection refused) is a network error: retried, then buried."""
    channel = WebhookChannel(f"http://127.0.0.1:{free_port()}/x", SECRET, timeout=2,
                             session=http)
    events = EventLog(redis_client)
    await events.publish(threshold_event())
    async with running(notifier(redis_client, {"in_app": channel})):
        await wait_for(events.dead)
    [letter] = await events.dead()
    assert letter.attempts == 3 and "Connect" in letter.error


# -- dead letters re-queued, and exactly once per channel ---------------------------------------
async def test_notify_retry_requeues_only_the_failed_channel_with_the_same_id(
        redis_client, receiver, http, upstream, mail_upstream):
    """A dead letter re-queued with EventLog.retry(None) is delivered once more with the same
    event id (idempotency key), only to the channel that failed: the email that already went
    out is not sent again."""
    receiver.statuses = [400]
    event = threshold_event()
    events = EventLog(redis_client)
    await events.publish(event)
    channels = {"email": email_channel(mail_upstream), "in_app": webhook(receiver, http)}
    async with running(notifier(redis_client, channels)):
        await wait_for(events.dead)
        await wait_for(lambda: settled(redis_client))
        assert len(upstream.messages) == 1
        assert await events.retry(None) == 1
        assert await events.dead() == []
        await wait_for(lambda: receiver.delivered())
        await wait_for(lambda: settled(redis_client))
    assert [(r.status, r.event_id) for r in receiver.requests] == \
        [(400, event.id), (200, event.id)]
    assert json.loads(receiver.requests[1].body)["id"] == event.id
    assert len(upstream.messages) == 1
    assert await events.dead() == []


async def test_notify_email_sent_once_when_in_app_fails_once(
        redis_client, receiver, http, upstream, mail_upstream):
    """Email succeeds, the webhook fails once and is retried: one email in total."""
    receiver.statuses = [503]
    await EventLog(redis_client).publish(threshold_event())
    channels = {"email": email_channel(mail_upstream), "in_app": webhook(receiver, http)}
    async with running(notifier(redis_client, channels)):
        await wait_for(lambda: receiver.delivered())
        await wait_for(lambda: settled(redis_client))
    assert [r.status for r in receiver.requests] == [503, 200]
    assert len(upstream.messages) == 1


async def test_notify_takeover_after_cancel_does_not_repeat_the_email(
        redis_client, receiver, http, upstream, mail_upstream):
    """A notifier cancelled (killed) while the CRM hangs, after the email went out: its
    request is abandoned, a second notifier takes the entry over after reclaim_idle and
    delivers the webhook with the same id; the email is not sent twice."""
    receiver.hold = 1
    event = threshold_event()
    await EventLog(redis_client).publish(event)
    channels = {"email": email_channel(mail_upstream), "in_app": webhook(receiver, http)}
    first = asyncio.create_task(notifier(redis_client, channels, consumer="first").run(
        asyncio.Event()))
    await wait_for(lambda: receiver.requests and upstream.messages)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await wait_for(lambda: receiver.aborted == 1)  # the dead notifier's request went away
    assert await pending_count(redis_client) == 1
    async with running(notifier(redis_client, channels, consumer="second")):
        await wait_for(lambda: receiver.delivered())
        await wait_for(lambda: settled(redis_client))
    assert [(r.status, r.event_id) for r in receiver.requests] == \
        [(None, event.id), (200, event.id)]
    assert len(upstream.messages) == 1


# -- several notifiers, takeover, restarts -------------------------------------------------------
async def test_notify_two_notifiers_share_the_work_without_duplicates(redis_client, receiver,
                                                                     http):
    """Two notifiers (different consumers) on one stream: 30 events are each delivered exactly
    once in total, and both notifiers delivered some."""
    policy = fast_policy(reclaim_idle=60.0)  # no takeover between two live notifiers
    first = notifier(redis_client, {"in_app": webhook(receiver, http, "/a")}, policy, "a")
    second = notifier(redis_client, {"in_app": webhook(receiver, http, "/b")}, policy, "b")
    events = EventLog(redis_client)
    published = []
    async with running(first), running(second):
        await first.ensure_group()
        for i in range(30):
            event = threshold_event(txn_id=f"txn-{i}")
            published.append(event.id)
            await events.publish(event)
            # One at a time: each blocked reader gets its turn.
            await wait_for(lambda: len(receiver.delivered()) >= len(published))
        await wait_for(lambda: settled(redis_client))
    counts = Counter(r.event_id for r in receiver.requests)
    assert counts == Counter(published)
    assert receiver.delivered("/a") and receiver.delivered("/b")


async def test_notify_takes_over_entries_of_a_dead_consumer(redis_client, receiver, http):
    """Entries read by a consumer that died without acknowledging them are delivered by
    another notifier once idle for reclaim_idle; none is lost or repeated."""
    events = EventLog(redis_client)
    published = [threshold_event(txn_id=f"txn-{i}") for i in range(5)]
    for event in published:
        await events.publish(event)
    worker = notifier(redis_client, {"in_app": webhook(receiver, http)})
    await worker.ensure_group()
    taken = await redis_client.xreadgroup(GROUP, "dead-one", {keys.events(): ">"}, count=10)
    assert len(taken[0][1]) == 5
    assert await pending_count(redis_client) == 5
    async with running(worker):
        await wait_for(lambda: len(receiver.delivered()) == 5)
        await wait_for(lambda: settled(redis_client))
    assert Counter(r.event_id for r in receiver.requests) == Counter(e.id for e in published)


async def test_notify_delivers_events_published_before_it_first_ran(redis_client, receiver,
                                                                    http):
    """The group starts at the beginning of the stream: events appended before any notifier
    existed are delivered."""
    events = EventLog(redis_client)
    early = [threshold_event(txn_id=f"txn-{i}") for i in range(3)]
    for event in early:
        await events.publish(event)
    async with running(notifier(redis_client, {"in_app": webhook(receiver, http)})):
        await wait_for(lambda: len(receiver.delivered()) == 3)
    # Delivered concurrently, so in any order; each once.
    assert Counter(r.event_id for r in receiver.requests) == Counter(e.id for e in early)


async def test_notify_restart_does_not_redeliver_acknowledged_events(redis_client, receiver,
                                                                    http):
    """A notifier started after another one finished delivers only new events."""
    events = EventLog(redis_client)
    first = threshold_event(txn_id="txn-1")
    await events.publish(first)
    async with running(notifier(redis_client, {"in_app": webhook(receiver, http)},
                                consumer="before")):
        await wait_for(lambda: receiver.delivered())
        await wait_for(lambda: settled(redis_client))
    later = threshold_event(txn_id="txn-2")
    await events.publish(later)
    async with running(notifier(redis_client, {"in_app": webhook(receiver, http)},
                                consumer="after")):
        await wait_for(lambda: len(receiver.delivered()) == 2)
        await wait_for(lambda: settled(redis_client))
    assert [r.event_id for r in receiver.requests] == [first.id, later.id]


async def test_notify_acks_an_entry_deleted_while_pending(redis_client, receiver, http):
    """An entry trimmed or XDEL'd while pending (a dead consumer held it) is acknowledged
    without an error on Redis 6.2 (XAUTOCLAIM answers nil for it) and 7.0 (it reports its
    id apart); the other entries are delivered."""
    events = EventLog(redis_client)
    gone = await events.publish(threshold_event(txn_id="gone"))
    kept = threshold_event(txn_id="kept")
    await events.publish(kept)
    await redis_client.xadd(keys.events(), {"junk": "no event field"})
    with capture_logs() as logs:
        worker = notifier(redis_client, {"in_app": webhook(receiver, http)})
        await worker.ensure_group()
        await redis_client.xreadgroup(GROUP, "dead-one", {keys.events(): ">"}, count=10)
        assert await redis_client.xdel(keys.events(), gone) == 1
        async with running(worker):
            await wait_for(lambda: receiver.delivered())
            await wait_for(lambda: settled(redis_client))
    assert [r.event_id for r in receiver.requests] == [kept.id]
    trouble = [e for e in logs if e["event"] in {"notifier.exception",
                                                 "notifier.redis_unavailable"}]
    assert trouble == []


# -- the email channel -----------------------------------------------------------------------
async def test_notify_email_threshold_notice_text(redis_client, upstream, mail_upstream,
                                                  accounts):
    """quota.threshold sends the user "You have used 4,000 of 5,000 …; they reset on
    December 1." from the configured sender; the notice is not counted against the user."""
    user = await add_user(accounts)
    event = threshold_event(user_id=user.id)
    await EventLog(redis_client).publish(event)
    async with running(notifier(redis_client, {"email": email_channel(mail_upstream)})):
        await wait_for(lambda: upstream.messages)
        await wait_for(lambda: settled(redis_client))
    [sent] = upstream.messages
    assert sent.rcpt_tos == ["agent@kw.test"]
    assert sent.mail_from == "no-reply@command-email.example"
    [notice] = notices(upstream)
    assert notice["To"] == "agent@kw.test"
    assert notice["From"] == NOTICE_FROM
    assert notice["Auto-Submitted"] == "auto-generated"
    assert event.id in notice["Message-ID"]
    assert notice.get_content().startswith(
        "You have used 4,000 of 5,000 Command Email sends this month; they reset on "
        "December 1.")
    assert await redis_client.keys(keys.usage(user.id, "*")) == []


async def test_notify_email_reached_notice_text(redis_client, upstream, mail_upstream):
    """quota.reached sends the limit-reached notice."""
    await EventLog(redis_client).publish(threshold_event(REACHED, used=5000, percent=100))
    async with running(notifier(redis_client, {"email": email_channel(mail_upstream)})):
        await wait_for(lambda: upstream.messages)
    [notice] = notices(upstream)
    assert notice["Subject"] == "You have reached your Command Email limit for this month"
    assert notice.get_content().startswith(
        "You have used all 5,000 of your Command Email sends this month; they reset on "
        "December 1.")


async def test_notify_email_not_sent_for_rejections_and_plan_changes(
        redis_client, receiver, http, upstream, mail_upstream):
    """quota.rejected and plan.changed go in-app only: the webhook gets both, no email goes
    out, and the email channel itself composes nothing for them."""
    events = EventLog(redis_client)
    rejected = threshold_event(REJECTED, recipient="c@example.test", smtp_code=550)
    changed = new_event(PLAN_CHANGED, "u-1", email="agent@kw.test", outcome="upgrade",
                        old_plan="free", new_plan="plus")
    await events.publish(rejected)
    await events.publish(changed)
    channels = {"email": email_channel(mail_upstream), "in_app": webhook(receiver, http)}
    async with running(notifier(redis_client, channels)):
        await wait_for(lambda: len(receiver.delivered()) == 2)
        await wait_for(lambda: settled(redis_client))
    assert sorted(r.headers["X-Relay-Event"] for r in receiver.requests) == \
        ["plan.changed", "quota.rejected"]
    channel = email_channel(mail_upstream)
    assert channel.compose(rejected) is None and channel.compose(changed) is None
    await channel.deliver(rejected)
    await channel.deliver(changed)
    assert upstream.messages == [] and upstream.handler.rcpt_seen == []


async def test_notify_email_upstream_5xx_is_dead_lettered_at_once(redis_client, upstream,
                                                                  mail_upstream):
    """The upstream refusing the user's address (550) is permanent: one attempt, buried."""
    upstream.behaviour.rcpt_replies["agent@kw.test"] = "550 5.1.1 No such mailbox"
    events = EventLog(redis_client)
    await events.publish(threshold_event())
    async with running(notifier(redis_client, {"email": email_channel(mail_upstream)})):
        await wait_for(events.dead)
        await wait_for(lambda: settled(redis_client))
    [letter] = await events.dead()
    assert (letter.channel, letter.attempts) == ("email", 1)
    assert letter.error.startswith("550 5.1.1")
    assert upstream.messages == []


async def test_notify_email_upstream_4xx_is_retried(redis_client, upstream, mail_upstream):
    """A 451 from the upstream is temporary: the notice is retried and then delivered."""
    upstream.behaviour.rcpt_replies["agent@kw.test"] = "451 4.3.0 Try again later"

    async def recover(seconds: float) -> None:  # the upstream recovers during the backoff
        upstream.behaviour.rcpt_replies.clear()
        await asyncio.sleep(0)

    events = EventLog(redis_client)
    await events.publish(threshold_event())
    worker = notifier(redis_client, {"email": email_channel(mail_upstream)}, sleep=recover)
    async with running(worker):
        await wait_for(lambda: upstream.messages)
        await wait_for(lambda: settled(redis_client))
    assert upstream.handler.rcpt_seen == ["agent@kw.test", "agent@kw.test"]
    assert len(upstream.messages) == 1
    assert await events.dead() == []


# -- the whole loop -----------------------------------------------------------------------------
async def test_notify_sends_through_the_relay_reach_the_crm_and_the_inbox(
        relay, upstream, accounts, redis_client, receiver, http, mail_upstream):
    """SMTP sends through the relay that cross 80 % of the limit produce one signed
    quota.threshold POST and one email notice; the notice does not count as a send."""
    user = await add_user(accounts, limit=10)
    channels = {"in_app": webhook(receiver, http), "email": email_channel(mail_upstream)}
    async with running(notifier(redis_client, channels)):
        async with smtp_client(relay) as client:
            recipients = [f"r{i}@example.test" for i in range(8)]
            errors, _ = await client.sendmail("agent@kw.test", recipients, message())
        assert errors == {}
        await wait_for(lambda: receiver.delivered())
        await wait_for(lambda: len(upstream.messages) == 2)
        await wait_for(lambda: settled(redis_client))
    [request] = receiver.requests
    body = json.loads(request.body)
    assert request.headers["X-Relay-Event"] == "quota.threshold"
    assert (body["user_id"], body["percent"], body["used"], body["limit"]) == \
        (user.id, 80, 8, 10)
    assert request.headers["X-Relay-Signature"] == sign(
        SECRET.encode(), request.headers["X-Relay-Timestamp"], request.body)
    [notice] = [n for n in notices(upstream) if n["To"] == "agent@kw.test"]
    assert notice.get_content().startswith(
        "You have used 8 of 10 Command Email sends this month; they reset on December 1.")
    usage = await redis_client.hgetall(keys.usage(user.id, "2026-11"))
    assert int(usage["used"]) == 8
