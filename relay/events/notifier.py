"""The notifier: consumes the event stream and delivers each event to its channels
(STYLE §1 step 8).

Several notifier processes share the work through one consumer group. An event stays
pending in the group until every channel it is meant for has delivered it or given up, so
nothing is lost when a notifier dies: another one takes over entries idle for longer than
``reclaim_idle_seconds`` (XAUTOCLAIM). While a notifier is still retrying an event it
refreshes the entry (XCLAIM to itself), so a live notifier's work is never taken over.

Per event and channel: a failure is retried with exponential backoff and full jitter up to
``max_attempts``; then the event goes to the dead-letter stream. Channels already done are
remembered in Redis, so a retry or a takeover never sends the same notice twice through a
channel that succeeded. (A crash between a delivery and that mark can repeat one delivery:
the CRM deduplicates on the event id, sent as the idempotency key.)
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import cast

import redis.exceptions
import structlog

from relay.config.policies import Notifications
from relay.errors import StoreUnavailableError
from relay.events.channels import Channel, DeliveryError
from relay.events.stream import Event, EventLog
from relay.observe.metrics import NotifierMetrics
from relay.store import keys
from relay.store.client import RedisClient, store_errors

log = structlog.get_logger()

GROUP = "notifiers"
# How long "done" marks and attempt counters of an acknowledged event are kept.
_MARK_TTL_SECONDS = 7 * 24 * 3600

Entry = tuple[str, dict[str, str] | None]


class EntryLostError(Exception):
    """The entry being retried is no longer this notifier's (another one took it over)."""


def consumer_name() -> str:
    """Unique per process: host, pid and a random suffix (pids repeat in containers)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Notifier:
    def __init__(self, redis: RedisClient, channels: Mapping[str, Channel],
                 policy: Notifications, *, consumer: str | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 jitter: Callable[[], float] = random.random,
                 metrics: NotifierMetrics | None = None) -> None:
        self._redis = redis
        self._events = EventLog(redis)
        self._channels = channels
        self._policy = policy
        self.consumer = consumer or consumer_name()
        self._sleep = sleep
        self._jitter = jitter
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self.log = log.bind(consumer=self.consumer)
        # A notifier run outside `command-relay notifier` (tests) gets metrics nobody scrapes.
        self.metrics = metrics or NotifierMetrics(channels)
        self.metrics.in_flight.set_function(lambda: len(self._in_flight))

    def channels_for(self, kind: str) -> list[str]:
        kinds = {"in_app": self._policy.in_app.kinds, "timeline": self._policy.timeline.kinds,
                 "email": self._policy.email.kinds}
        return [name for name in self._channels if kind in kinds.get(name, frozenset())]

    async def ensure_group(self) -> None:
        """Create the consumer group at the start of the stream (so events published before
        the first notifier ever ran are delivered too)."""
        try:
            with store_errors():
                await self._redis.xgroup_create(keys.events(), GROUP, id="0", mkstream=True)
        except StoreUnavailableError as exc:
            if isinstance(exc.__cause__, redis.exceptions.ResponseError) and \
                    "BUSYGROUP" in str(exc.__cause__):
                return
            raise

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set; then let deliveries in progress finish their current
        attempt (up to a few seconds) and leave the rest pending for another notifier."""
        await self.ensure_group()
        self.log.info("notifier.started", channels=sorted(self._channels))
        try:
            while not stop.is_set():
                free = self._policy.concurrency - len(self._in_flight)
                if free <= 0:
                    # Take no more than can start now: an entry read but waiting for a slot
                    # would idle towards reclaim_idle and be taken over by another notifier.
                    await asyncio.wait(list(self._in_flight.values()), timeout=0.5,
                                       return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    batch = await self._claim_stale(free)
                    if len(batch) < free:
                        batch += await self._read_new(free - len(batch), block_ms=500)
                except StoreUnavailableError:
                    self.metrics.redis_errors.inc()
                    self.log.warning("notifier.redis_unavailable")
                    await self._sleep(1.0)
                    continue
                for stream_id, fields in batch:
                    if stream_id in self._in_flight:
                        continue
                    task = asyncio.create_task(self._handle_entry(stream_id, fields))
                    self._in_flight[stream_id] = task
                    task.add_done_callback(functools.partial(self._done, stream_id))
        except asyncio.CancelledError:
            # Cancelled (the process is going down hard): abandon the deliveries in progress
            # rather than leave them running unsupervised; their entries stay pending and
            # another notifier takes them over after reclaim_idle.
            for task in list(self._in_flight.values()):
                task.cancel()
            raise
        pending = list(self._in_flight.values())
        if pending:
            _, unfinished = await asyncio.wait(pending, timeout=5)
            for task in unfinished:
                task.cancel()
        self.log.info("notifier.stopped")

    def _done(self, stream_id: str, _task: asyncio.Task[None]) -> None:
        self._in_flight.pop(stream_id, None)

    async def _read_new(self, count: int, block_ms: int) -> list[Entry]:
        with store_errors():
            raw = await self._redis.xreadgroup(GROUP, self.consumer, {keys.events(): ">"},
                                               count=count, block=block_ms)
        found: list[Entry] = []
        for _stream, entries in cast(list[tuple[str, list[Entry]]], raw or []):
            found.extend(entries)
        return found

    async def _claim_stale(self, count: int) -> list[Entry]:
        idle_ms = int(self._policy.reclaim_idle * 1000)
        with store_errors():
            # JUSTID, then the contents by id: for an entry deleted (trimmed) while pending,
            # Redis 6.2 answers a nil in place of the whole entry, id included, so it could
            # never be acknowledged and would be reclaimed forever. With JUSTID both 6.2 and
            # 7.0 give ids (7.0 also drops deleted entries from the group by itself).
            ids = cast(list[str], await self._redis.xautoclaim(
                keys.events(), GROUP, self.consumer, min_idle_time=idle_ms, start_id="0-0",
                count=count, justid=True))
            if not ids:
                return []
            async with self._redis.pipeline(transaction=False) as pipe:
                for stream_id in ids:
                    pipe.xrange(keys.events(), min=stream_id, max=stream_id)
                found = cast(list[list[tuple[str, dict[str, str]]]], await pipe.execute())
        # A deleted entry reads as nothing: None fields, acknowledged by _handle_entry.
        entries: list[Entry] = [(stream_id, rows[0][1] if rows else None)
                                for stream_id, rows in zip(ids, found, strict=True)]
        if entries:
            self.metrics.reclaimed.inc(len(entries))
            self.log.info("notifier.reclaimed", entries=len(entries))
        return entries

    async def _handle_entry(self, stream_id: str, fields: dict[str, str] | None) -> None:
        try:
            if fields is None or "event" not in fields:
                # Trimmed away (6.2 reports such entries as nil) or malformed: nothing to do.
                await self._ack(stream_id, None)
                return
            event = Event.from_json(fields["event"])
            wanted = self.channels_for(event.kind)
            if fields.get("only"):
                wanted = [name for name in wanted if name == fields["only"]]
            for name in wanted:
                await self._deliver(stream_id, event, name)
            await self._ack(stream_id, event)
        except StoreUnavailableError:
            # Left pending: this notifier or another retries it after reclaim_idle.
            self.metrics.redis_errors.inc()
            self.log.warning("notifier.redis_unavailable", stream_id=stream_id)
        except EntryLostError:
            self.log.warning("notifier.entry_taken_over", stream_id=stream_id)
        except Exception:
            self.log.exception("notifier.exception", stream_id=stream_id)

    async def _ack(self, stream_id: str, event: Event | None) -> None:
        with store_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xack(keys.events(), GROUP, stream_id)
                if event is not None:
                    pipe.expire(keys.notified(event.id), _MARK_TTL_SECONDS)
                    pipe.delete(keys.attempts(event.id))
                await pipe.execute()

    async def _deliver(self, stream_id: str, event: Event, name: str) -> None:
        with store_errors():
            if await self._redis.sismember(keys.notified(event.id), name):
                return
        channel = self._channels[name]
        event_log = self.log.bind(event_id=event.id, event_kind=event.kind, channel=name,
                                  user_id=event.user_id)
        metrics = self.metrics
        seconds = metrics.delivery_seconds(name)
        while True:
            with store_errors():
                attempt = int(await self._redis.hincrby(keys.attempts(event.id), name, 1))
            started = time.perf_counter()
            try:
                await channel.deliver(event)
            except DeliveryError as exc:
                seconds.observe(time.perf_counter() - started)
                if exc.permanent or attempt >= self._policy.max_attempts:
                    await self._events.bury(event, name, str(exc), attempt)
                    await self._mark_done(event, name)
                    metrics.notifications(name, event.kind, "dead_lettered").inc()
                    event_log.error("notify.dead_lettered", attempts=attempt, error=str(exc),
                                    permanent=exc.permanent)
                    return
                delay = min(self._policy.backoff_max,
                            self._policy.backoff_base * 2 ** (attempt - 1)) * self._jitter()
                metrics.retries(name).inc()
                event_log.warning("notify.retrying", attempts=attempt, error=str(exc),
                                  delay_s=round(delay, 3))
                await self._wait(delay, stream_id)
                continue
            seconds.observe(time.perf_counter() - started)
            await self._mark_done(event, name)
            metrics.notifications(name, event.kind, "delivered").inc()
            event_log.info("notify.delivered", attempts=attempt)
            return

    async def _wait(self, delay: float, stream_id: str) -> None:
        """Sleep ``delay`` seconds while keeping the entry ours: its idle time is reset often
        enough (XCLAIM to ourselves) that no other notifier takes it over meanwhile."""
        step = self._policy.reclaim_idle / 3
        while True:
            await self._sleep(min(delay, step))
            with store_errors():
                kept = await self._redis.xclaim(keys.events(), GROUP, self.consumer, 0,
                                                [stream_id], justid=True)
            if not kept:
                # Stalled past reclaim_idle, another notifier took the entry (or finished
                # it): stop here rather than deliver it a second time.
                raise EntryLostError(stream_id)
            delay -= step
            if delay <= 0:
                return

    async def _mark_done(self, event: Event, name: str) -> None:
        with store_errors():
            await self._redis.sadd(keys.notified(event.id), name)
