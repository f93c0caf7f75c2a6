"""The shadow trial's differences counted in Redis per UTC day, for ``command-relay shadow
report`` (docs/shadow.md).

Nothing here is on the SMTP path's clock: ``add`` only appends to a queue in this process
(no await, never raises), and one background task writes what is queued, after the replies
that found the differences were given: it waits ``interval`` (a second) for a batch to
gather, then writes it in one pipeline (HINCRBY per kind and per app and kind, the latest
examples per kind with LPUSH + LTRIM), so a busy trial costs Redis one round trip a second
per process, not one per difference. ``report`` may lag by that second. The counts are for
reports: a batch that meets Redis away is dropped (logged as ``shadow.count_failed`` and
counted in ``relay_shadow_uncounted_total``), and so is a difference found while the queue
is full; every difference is in the log all the same (``shadow.differs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from relay.config.shadow import KINDS
from relay.errors import StoreUnavailableError
from relay.observe.metrics import RelayMetrics, detached
from relay.store import keys
from relay.store.client import RedisClient, store_errors

log = structlog.get_logger()

# A day's counts are kept about a month, then expire by themselves.
COUNTS_TTL_SECONDS = 35 * 24 * 3600
EXAMPLES_KEPT = 20  # per kind and day
MAX_PENDING = 10_000  # differences queued in this process, at most
BATCH = 2000  # differences per pipeline, at most
INTERVAL_SECONDS = 1.0  # how long a batch gathers before it is written


@dataclass(frozen=True, slots=True)
class Counted:
    """One difference as counted: its day, kind and app, and the example kept of it."""

    day: str  # YYYY-MM-DD, UTC
    kind: str
    app: str
    example: Mapping[str, object]


@dataclass(slots=True)
class DayCounts:
    """One day as ``shadow report`` reads it."""

    day: str
    by_kind: dict[str, int] = field(default_factory=dict)
    by_app: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: dict[str, list[dict[str, object]]] = field(default_factory=dict)


class ShadowCounts:
    """The queue of differences to count, its writer task, and the reader of the counts."""

    def __init__(self, redis: RedisClient, metrics: RelayMetrics | None = None, *,
                 max_pending: int = MAX_PENDING, interval: float = INTERVAL_SECONDS,
                 retry_delay: float = 1.0) -> None:
        self._redis = redis
        self._metrics = metrics or detached()
        self._max_pending = max_pending
        self._interval = interval
        self._retry_delay = retry_delay
        # Set to write at once what is queued (``idle``, ``close``) instead of gathering.
        self._now = asyncio.Event()
        self._pending: deque[Counted] = deque()
        self._task: asyncio.Task[None] | None = None
        self._full = False

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, counted: Counted) -> None:
        """Queue one difference to be counted; no I/O here, never raises."""
        if len(self._pending) >= self._max_pending:
            self._metrics.shadow_uncounted.inc()
            if not self._full:
                self._full = True
                log.warning("shadow.count_queue_full", pending=len(self._pending),
                            note="differences are logged but not counted until it drains")
            return
        self._pending.append(counted)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._pending:
            if self._interval > 0 and not self._now.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._now.wait(), self._interval)
            batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
            self._full = False
            try:
                await self._write(batch)
            except StoreUnavailableError:
                self._metrics.shadow_uncounted.inc(len(batch))
                log.warning("shadow.count_failed", differences=len(batch),
                            note="Redis unreachable: these differences are in the log only")
                # One attempt per interval while Redis is away; what arrives meanwhile waits.
                await asyncio.sleep(self._retry_delay)

    async def _write(self, batch: list[Counted]) -> None:
        counts: Counter[tuple[str, str]] = Counter()
        # The latest of each day and kind: the ones the list keeps.
        examples: dict[tuple[str, str], deque[Counted]] = {}
        for item in batch:
            counts[item.day, f"kind:{item.kind}"] += 1
            counts[item.day, f"app:{item.app}:{item.kind}"] += 1
            examples.setdefault((item.day, item.kind), deque(maxlen=EXAMPLES_KEPT)).append(item)
        with store_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                for (day, name), count in counts.items():
                    pipe.hincrby(keys.shadow_counts(day), name, count)
                for day in {day for day, _ in counts}:
                    pipe.expire(keys.shadow_counts(day), COUNTS_TTL_SECONDS)
                for (day, kind), found in examples.items():
                    key = keys.shadow_examples(day, kind)
                    # Oldest first, so the newest ends at the head of the list.
                    pipe.lpush(key, *(json.dumps(e.example, sort_keys=True) for e in found))
                    pipe.ltrim(key, 0, EXAMPLES_KEPT - 1)
                    pipe.expire(key, COUNTS_TTL_SECONDS)
                await pipe.execute()

    async def idle(self) -> None:
        """Write what is queued now, without waiting for the batch to gather, and return
        once it is written (or dropped)."""
        self._now.set()
        try:
            while self._task is not None and not self._task.done():
                await asyncio.shield(self._task)
        finally:
            self._now.clear()

    async def close(self, seconds: float) -> None:
        """Write what is queued for up to ``seconds`` (the relay is stopping), then stop;
        what is left is counted as uncounted."""
        self._now.set()
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), seconds)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pending:
            self._metrics.shadow_uncounted.inc(len(self._pending))
            log.warning("shadow.count_failed", differences=len(self._pending),
                        note="the relay stopped before they were counted")
            self._pending.clear()

    async def read(self, days: list[str]) -> list[DayCounts]:
        """The counts and examples of ``days`` (YYYY-MM-DD), one round trip per day."""
        found = []
        for day in days:
            with store_errors():
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.hgetall(keys.shadow_counts(day))
                    for kind in KINDS:
                        pipe.lrange(keys.shadow_examples(day, kind), 0, -1)
                    record, *lists = await pipe.execute()
            counts = DayCounts(day)
            for name, value in record.items():
                group, _, rest = name.partition(":")
                if group == "kind":
                    counts.by_kind[rest] = int(value)
                elif group == "app":
                    app, _, kind = rest.rpartition(":")
                    counts.by_app.setdefault(app, {})[kind] = int(value)
            for kind, entries in zip(KINDS, lists, strict=True):
                if entries:
                    counts.examples[kind] = [json.loads(e) for e in entries]
            found.append(counts)
        return found
