"""What the process's own runtime adds to every reply: how late the event loop runs what is
due (its lag) and how long the garbage collector stops the process (its pauses).

Neither is a step of the SMTP path, yet either shows up in its tail: a transaction whose
reply is ready waits behind every callback queued before it, and a collection stops them
all. The benchmark's latency profile (bench/latency_profile.py) reads both from the
metrics endpoint beside the per-step histograms, and an operator sees them on the same
dashboard as the Redis and upstream steps.

* ``relay_event_loop_lag_seconds``: a timer due every ``LAG_INTERVAL`` seconds records how
  late it fired. A timer fires after the callbacks already ready, so the lag is what any
  reply becoming ready at that moment would wait for the loop; sampled, it costs twenty
  wake-ups a second.
* ``relay_gc_pause_seconds{generation}``: ``gc.callbacks`` times every collection. The
  ``python_gc_collections_total`` family (prometheus_client's GCCollector) counts them; this
  says how long each one stopped the process.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

# 50 ms: often enough that a second of load gives twenty samples per worker, rare enough to
# cost nothing measurable (a timer and one histogram observation).
LAG_INTERVAL = 0.05
LAG_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
               0.5, 1.0, 2.5)
GC_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
              0.25)


class RuntimeMonitor:
    """Event-loop lag and GC pauses into ``registry``; ``start`` on the running loop, ``stop``
    on the way out (it also removes the GC callback, so tests can make many)."""

    def __init__(self, registry: CollectorRegistry, interval: float = LAG_INTERVAL) -> None:
        self.interval = interval
        self.lag = Histogram(
            "relay_event_loop_lag_seconds", "How late the event loop ran a timer due every "
            f"{interval:g} s: what a reply ready at that moment waited for the loop.",
            buckets=LAG_BUCKETS, registry=registry)
        self.gc_pause = Histogram(
            "relay_gc_pause_seconds", "How long each garbage collection stopped the process, "
            "by generation.", ["generation"], buckets=GC_BUCKETS, registry=registry)
        self._gc_children = [self.gc_pause.labels(str(g)) for g in range(3)]
        self._gc_started = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch_lag(),
                                                                name="loop-lag")
            gc.callbacks.append(self._on_gc)

    async def stop(self) -> None:
        if self._task is None:
            return
        task, self._task = self._task, None
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def _watch_lag(self) -> None:
        loop = asyncio.get_running_loop()
        observe = self.lag.observe
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            observe(max(0.0, loop.time() - due))

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # Called by the interpreter around every collection; kept to a clock read and one
        # observation, as it runs inside the pause it measures.
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self._gc_children[info.get("generation", 2)].observe(
                time.perf_counter() - self._gc_started)
            self._gc_started = 0.0
