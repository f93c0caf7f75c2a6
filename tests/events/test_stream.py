"""relay/events/stream.py against a real redis-server: events as JSON, appended to one
stream, read back newest or after a given id, the dead letters buried and re-queued with
their id, and a publish from the SMTP path that never fails the reply."""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis
import structlog
from structlog.testing import capture_logs

from relay.errors import StoreUnavailableError
from relay.events.stream import (
    PLAN_CHANGED,
    REACHED,
    REJECTED,
    THRESHOLD,
    TIMELINE_EMAIL_FAILED,
    Event,
    EventLog,
    format_event,
    new_event,
)
from relay.store import keys
from relay.store.client import connect_redis
from tests.conftest import free_port


def event(kind: str = THRESHOLD, user_id: str = "u-1", **data: object) -> Event:
    return new_event(kind, user_id, email="agent@kw.test", **data)


def test_an_event_is_one_json_object_and_reads_back_equal() -> None:
    """id, kind, at and user_id at the top, the data beside them; from_json undoes to_json."""
    original = event(percent=80, used=4000, limit=5000)
    body = json.loads(original.to_json())
    assert body == {"id": original.id, "kind": THRESHOLD, "at": original.at, "user_id": "u-1",
                    "email": "agent@kw.test", "percent": 80, "used": 4000, "limit": 5000}
    assert len(original.id) == 24 and original.id != event().id
    assert original.at.endswith("+00:00")
    assert Event.from_json(original.to_json()) == original


async def test_publish_appends_one_entry_holding_the_event(
        redis_client: aioredis.Redis) -> None:
    log = EventLog(redis_client)
    published = event()
    stream_id = await log.publish(published)
    assert await redis_client.xrange(keys.events()) == [
        (stream_id, {"event": published.to_json()})]


async def test_recent_is_oldest_first_and_finds_a_kind_beyond_the_first_page(
        redis_client: aioredis.Redis) -> None:
    """The newest ``count`` events in order; a kind filter keeps reading older pages, so an
    event 250 entries back is still found; ``after`` gives only what followed an id."""
    log = EventLog(redis_client)
    old = event(PLAN_CHANGED, outcome="upgraded")
    old_id = await log.publish(old)
    ids = [await log.publish(event(percent=n)) for n in range(250)]
    newest = await log.recent(3)
    assert [stream_id for stream_id, _ in newest] == ids[-3:]
    assert [e.data["percent"] for _, e in newest] == [247, 248, 249]
    assert await log.recent(5, kinds=frozenset({PLAN_CHANGED})) == [(old_id, old)]
    after = await log.recent(10, after=ids[-3])
    assert [stream_id for stream_id, _ in after] == ids[-2:]
    assert await log.recent(10, kinds=frozenset({PLAN_CHANGED}), after=ids[0]) == []


async def test_last_id_is_where_a_follower_starts(redis_client: aioredis.Redis) -> None:
    """"0-0" on an empty stream, then the newest id; wait_after that id returns exactly the
    events published since (nothing published in between is missed)."""
    log = EventLog(redis_client)
    assert await log.last_id() == "0-0"
    first = await log.publish(event())
    start = await log.last_id()
    assert start == first
    later = [event(REACHED), event(REJECTED, recipient="b@example.test")]
    later_ids = [await log.publish(e) for e in later]
    assert await log.wait_after(start, block_ms=1) == list(zip(later_ids, later, strict=True))
    assert await log.wait_after(later_ids[-1], block_ms=1) == []


async def test_dead_letters_are_requeued_with_their_id_for_the_failed_channel_only(
        redis_client: aioredis.Redis) -> None:
    """retry(None) moves every dead letter back to the stream, marked ``only`` for the
    channel that failed, with the same event id (the receiver's idempotency key); that
    channel's attempts and done mark are forgotten, the other channel's are kept."""
    log = EventLog(redis_client)
    failed = event()
    await redis_client.hset(keys.attempts(failed.id), mapping={"in_app": 6, "email": 1})
    await redis_client.sadd(keys.notified(failed.id), "in_app", "email")
    await log.bury(failed, "in_app", "HTTP 503 from the CRM", 6)
    [letter] = await log.dead()
    assert (letter.event, letter.channel, letter.error, letter.attempts) == (
        failed, "in_app", "HTTP 503 from the CRM", 6)

    assert await log.retry(None) == 1
    assert await log.dead() == []
    [(_, fields)] = await redis_client.xrange(keys.events())
    assert fields == {"event": failed.to_json(), "only": "in_app"}
    assert await redis_client.hgetall(keys.attempts(failed.id)) == {"email": "1"}
    assert await redis_client.smembers(keys.notified(failed.id)) == {"email"}


async def test_retry_by_id_requeues_only_the_letters_named(
        redis_client: aioredis.Redis) -> None:
    log = EventLog(redis_client)
    first, second = event(user_id="u-1"), event(user_id="u-2")
    await log.bury(first, "in_app", "HTTP 500", 6)
    await log.bury(second, "email", "550 5.1.1 no such user", 1)
    letters = await log.dead()
    assert await log.retry([letters[1].stream_id]) == 1
    assert [d.event for d in await log.dead()] == [first]
    assert [e for _, e in await log.recent(10)] == [second]


async def test_publish_quietly_logs_the_whole_event_when_redis_is_away() -> None:
    """publish raises StoreUnavailableError; publish_quietly (the SMTP path's) never raises
    and logs the event's JSON at error level, so it can be replayed."""
    client = connect_redis(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    log = EventLog(client)
    lost = event(REACHED, used=5000, limit=5000)
    try:
        with pytest.raises(StoreUnavailableError):
            await log.publish(lost)
        with capture_logs() as logs:
            await log.publish_quietly(lost, structlog.get_logger())
    finally:
        await client.aclose()
    [line] = [e for e in logs if e["event"] == "event.publish_failed"]
    assert line["log_level"] == "error"
    assert (line["event_kind"], line["event_json"]) == (REACHED, lost.to_json())


async def test_publish_quietly_logs_the_published_id(redis_client: aioredis.Redis) -> None:
    published = event()
    with capture_logs() as logs:
        await EventLog(redis_client).publish_quietly(published, structlog.get_logger())
    assert [(e["event"], e["event_id"]) for e in logs] == [("event.published", published.id)]
    assert len(await redis_client.xrange(keys.events())) == 1


@pytest.mark.parametrize(("kind", "data", "detail"), [
    (THRESHOLD, {"percent": 80, "used": 4000, "limit": 5000}, "80% (4000/5000)"),
    (REACHED, {"used": 5000, "limit": 5000}, "limit reached (5000/5000)"),
    (REJECTED, {"recipient": "b@example.test", "used": 5000, "limit": 5000,
                "app": "campaigns"}, "refused b@example.test (5000/5000) app=campaigns"),
    (PLAN_CHANGED, {"outcome": "upgraded", "old_plan": "free", "new_plan": "pro",
                    "effective_from": "2026-11", "by": "billing"},
     "upgraded free -> pro from 2026-11 by billing"),
    (TIMELINE_EMAIL_FAILED, {"reason": "quota", "recipient": "c@example.test",
                             "contact_id": "c-42", "smartplan_id": "sp-1",
                             "smartplan_step": 3, "smtp_code": 550},
     "quota c@example.test contact=c-42 smartplan=sp-1/3 code=550"),
    ("some.new_kind", {"x": 1}, '{"email": "agent@kw.test", "x": 1}'),
])
def test_format_event_is_one_readable_line_per_kind(kind: str, data: dict[str, object],
                                                    detail: str) -> None:
    """Time, kind and user id in columns, the user's email, then what happened."""
    shown = event(kind, "u-7", **data)
    assert format_event(shown) == f"{shown.at}  {kind:<21} {'u-7':<14} agent@kw.test  {detail}"
