"""The runtime monitor (relay/observe/runtime.py): the loop-lag timer sees a blocked loop,
and every collection is timed by generation. Lower bounds only: a loop blocked for 200 ms
cannot run a timer due in that time before the block ends, whatever the machine's speed."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from relay.errors import StartupError
from relay.observe.runtime import RuntimeMonitor
from tests.conftest import RelayFactory


def _count(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return value or 0.0


def _bucket(registry: CollectorRegistry, name: str, le: str) -> float:
    return _count(registry, f"{name}_bucket", le=le)


async def test_a_blocked_loop_shows_as_lag() -> None:
    registry = CollectorRegistry()
    monitor = RuntimeMonitor(registry, interval=0.01)
    monitor.start()
    try:
        await asyncio.sleep(0.05)  # a few samples of an idle loop first
        time.sleep(0.2)  # noqa: ASYNC251 - blocks the loop on purpose
        await asyncio.sleep(0.05)
    finally:
        await monitor.stop()
    name = "relay_event_loop_lag_seconds"
    total = _count(registry, f"{name}_count")
    assert total >= 2
    # The timer due during the block fired at least 190 ms late: above the 0.1 s bucket.
    assert _bucket(registry, name, "0.1") < total
    assert _count(registry, f"{name}_sum") >= 0.19


async def test_collections_are_timed_by_generation_and_the_callback_goes_away() -> None:
    registry = CollectorRegistry()
    monitor = RuntimeMonitor(registry)
    monitor.start()
    try:
        gc.collect()  # a full collection: generation 2
        gc.collect(0)
    finally:
        await monitor.stop()
    assert _count(registry, "relay_gc_pause_seconds_count", generation="2") >= 1
    assert _count(registry, "relay_gc_pause_seconds_count", generation="0") >= 1
    assert monitor._on_gc not in gc.callbacks
    before = _count(registry, "relay_gc_pause_seconds_count", generation="2")
    gc.collect()
    assert _count(registry, "relay_gc_pause_seconds_count", generation="2") == before


async def test_stop_without_start_and_twice() -> None:
    monitor = RuntimeMonitor(CollectorRegistry())
    await monitor.stop()
    monitor.start()
    await monitor.stop()
    await monitor.stop()


async def test_a_refused_start_up_leaves_no_timer_and_no_gc_callback(
        make_relay: RelayFactory, tmp_path: Path) -> None:
    """A relay whose certificate cannot be loaded stops at start-up: the runtime monitor is
    started only once everything else is up, so nothing of it outlives the refusal."""
    callbacks = list(gc.callbacks)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(StartupError, match="cannot load TLS certificate"):
        await make_relay(tls_cert=bad, tls_key=bad)
    assert gc.callbacks == callbacks
    assert [t for t in asyncio.all_tasks() if t.get_name() == "loop-lag"] == []
