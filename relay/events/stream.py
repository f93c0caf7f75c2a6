"""Events: what the relay tells the CRM and the user, as one durable Redis stream
(STYLE §1 step 8).

The SMTP path only appends (one XADD; no network call to anything else, and no SMTP reply
waits on a notification). ``relay/events/notifier.py`` consumes the stream with a consumer group.

Each entry has one field, ``event``: a JSON object with at least ``id`` (also the
idempotency key the CRM dedupes on; kept when a dead letter is re-queued), ``kind``, ``at``
(ISO 8601 UTC) and ``user_id``.

Kinds: ``quota.threshold`` (80/85/90/95 %), ``quota.reached`` (100 %), ``quota.rejected``
(an over-limit recipient refused), ``plan.changed``, ``timeline.email_failed`` (a SmartPlan
email refused for the quota or permanently upstream, or a suppressed contact dropped from
it, for the Contact Timeline).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import structlog

from relay.errors import StoreUnavailableError
from relay.observe.metrics import RelayMetrics, detached
from relay.store import keys
from relay.store.client import RedisClient, store_errors

log = structlog.get_logger()

THRESHOLD = "quota.threshold"
REACHED = "quota.reached"
REJECTED = "quota.rejected"
PLAN_CHANGED = "plan.changed"
TIMELINE_EMAIL_FAILED = "timeline.email_failed"

# The stream is a delivery buffer, not an archive: trimmed (approximately, which is cheap)
# to this many entries. The audit trail of plan changes lives in its own untrimmed streams.
STREAM_MAXLEN = 100_000


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    kind: str
    at: str
    user_id: str
    data: Mapping[str, Any]

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "kind": self.kind, "at": self.at,
                           "user_id": self.user_id, **self.data}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Event:
        body = json.loads(text)
        return cls(id=body.pop("id"), kind=body.pop("kind"), at=body.pop("at"),
                   user_id=body.pop("user_id"), data=body)


def format_event(event: Event) -> str:
    """One readable line for operators (``events tail`` without --json)."""
    d = event.data
    detail = {
        THRESHOLD: lambda: f"{d.get('percent')}% ({d.get('used')}/{d.get('limit')})",
        REACHED: lambda: f"limit reached ({d.get('used')}/{d.get('limit')})",
        REJECTED: lambda: f"refused {d.get('recipient')} ({d.get('used')}/{d.get('limit')}) "
                          f"app={d.get('app')}",
        PLAN_CHANGED: lambda: f"{d.get('outcome')} {d.get('old_plan')} -> {d.get('new_plan')} "
                              f"from {d.get('effective_from')} by {d.get('by')}",
        TIMELINE_EMAIL_FAILED: lambda: f"{d.get('reason')} {d.get('recipient')} "
                                       f"contact={d.get('contact_id')} "
                                       f"smartplan={d.get('smartplan_id')}"
                                       f"/{d.get('smartplan_step')} code={d.get('smtp_code')}",
    }.get(event.kind, lambda: json.dumps(dict(d)))()
    return f"{event.at}  {event.kind:<21} {event.user_id:<14} {d.get('email', '')}  {detail}"


def new_event(kind: str, user_id: str, **data: Any) -> Event:
    return Event(id=secrets.token_hex(12), kind=kind,
                 at=datetime.now(UTC).isoformat(timespec="milliseconds"),
                 user_id=user_id, data=data)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    stream_id: str
    event: Event
    channel: str
    error: str
    attempts: int


class EventLog:
    def __init__(self, redis: RedisClient, metrics: RelayMetrics | None = None) -> None:
        self._redis = redis
        self._metrics = metrics or detached()

    async def publish(self, event: Event) -> str:
        """Append ``event``; returns its stream id. Raises StoreUnavailableError."""
        with store_errors():
            stream_id = await self._redis.xadd(keys.events(), {"event": event.to_json()},
                                               maxlen=STREAM_MAXLEN, approximate=True)
        return str(stream_id)

    async def publish_quietly(self, event: Event,
                              session_log: structlog.typing.FilteringBoundLogger) -> None:
        """Publish from the SMTP path: a failure is logged with the whole event (so it can be
        replayed) and never changes the reply the client gets."""
        metrics = self._metrics
        started = time.perf_counter()
        try:
            await self.publish(event)
        except StoreUnavailableError:
            metrics.redis_errors("publish").inc()
            metrics.events(event.kind, "failed").inc()
            session_log.error("event.publish_failed", event_kind=event.kind,
                              event_json=event.to_json())
            return
        metrics.redis_seconds("publish").observe(time.perf_counter() - started)
        metrics.events(event.kind, "published").inc()
        session_log.info("event.published", event_kind=event.kind, event_id=event.id)

    async def recent(self, count: int, kinds: frozenset[str] | None = None,
                     after: str | None = None) -> list[tuple[str, Event]]:
        """The newest ``count`` events (oldest first), or those after stream id ``after``."""
        if after is not None:
            with store_errors():
                entries = _entries(await self._redis.xrange(keys.events(), min=f"({after}",
                                                            count=count))
            found = [(i, Event.from_json(f["event"])) for i, f in entries]
            return [(i, e) for i, e in found if kinds is None or e.kind in kinds]
        # Newest first, page by page, until ``count`` events of the wanted kinds are found
        # (a filter applied to one page alone could miss older matches).
        chosen: list[tuple[str, Event]] = []
        upper = "+"
        with store_errors():
            while len(chosen) < count:
                page = _entries(await self._redis.xrevrange(keys.events(), max=upper,
                                                            count=max(count, 100)))
                for stream_id, fields in page:
                    event = Event.from_json(fields["event"])
                    if kinds is None or event.kind in kinds:
                        chosen.append((stream_id, event))
                        if len(chosen) == count:
                            break
                if len(page) < max(count, 100):
                    break
                upper = f"({page[-1][0]}"
        return list(reversed(chosen))

    async def last_id(self) -> str:
        """The stream id of the newest event ("0-0" when there is none): where a follower
        starts, so nothing published between two of its reads is missed (as "$" would)."""
        with store_errors():
            newest = _entries(await self._redis.xrevrange(keys.events(), count=1))
        return newest[0][0] if newest else "0-0"

    async def wait_after(self, after: str, block_ms: int) -> list[tuple[str, Event]]:
        """Events newer than ``after`` ("$" for only new ones), waiting up to ``block_ms``."""
        with store_errors():
            raw = await self._redis.xread({keys.events(): after}, block=block_ms, count=100)
        out: list[tuple[str, Event]] = []
        for _stream, entries in cast(list[tuple[str, list[tuple[str, dict[str, str]]]]],
                                     raw or []):
            out.extend((i, Event.from_json(f["event"])) for i, f in entries)
        return out

    # -- dead letters -------------------------------------------------------------------------
    async def bury(self, event: Event, channel: str, error: str, attempts: int) -> None:
        with store_errors():
            await self._redis.xadd(keys.dead_letters(), {
                "event": event.to_json(), "channel": channel, "error": error[:500],
                "attempts": str(attempts)})

    async def dead(self, count: int = 100) -> list[DeadLetter]:
        with store_errors():
            entries = _entries(await self._redis.xrange(keys.dead_letters(), count=count))
        return [DeadLetter(i, Event.from_json(f["event"]), f["channel"], f["error"],
                           int(f["attempts"])) for i, f in entries]

    async def retry(self, stream_ids: list[str] | None) -> int:
        """Re-queue dead letters (all when ``stream_ids`` is None) for the notifier, keeping
        each event's id so the receiver can still deduplicate. Returns how many."""
        letters = await self.dead(count=10_000)
        chosen = [d for d in letters if stream_ids is None or d.stream_id in stream_ids]
        with store_errors():
            for letter in chosen:
                # A fresh start for the channel that failed: forget its attempts and the
                # "done" mark the dead-lettering left.
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.hdel(keys.attempts(letter.event.id), letter.channel)
                    pipe.srem(keys.notified(letter.event.id), letter.channel)
                    pipe.xadd(keys.events(), {"event": letter.event.to_json(),
                                              "only": letter.channel},
                              maxlen=STREAM_MAXLEN, approximate=True)
                    pipe.xdel(keys.dead_letters(), letter.stream_id)
                    await pipe.execute()
        return len(chosen)


def _entries(raw: object) -> list[tuple[str, dict[str, str]]]:
    return cast(list[tuple[str, dict[str, str]]], raw)  # decode_responses=True
