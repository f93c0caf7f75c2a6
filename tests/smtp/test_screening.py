"""relay.smtp.screening: the suppression check the transaction calls, against a real
redis-server (the SMTP flows are in tests/flows/test_suppression.py)."""

from __future__ import annotations

import socket

import pytest
import redis.asyncio as aioredis
import structlog
from structlog.testing import capture_logs

from relay.decisions.quota import QuotaStore
from relay.decisions.suppression import SuppressionReason, SuppressionStore
from relay.errors import RecipientSuppressedError, StoreUnavailableError
from relay.observe.metrics import RelayMetrics
from relay.smtp.screening import Log, RecipientScreen
from relay.store.client import connect_redis

UID = "u-screen"
NOV = "2026-11"


def screen_on(redis: aioredis.Redis, metrics: RelayMetrics) -> RecipientScreen:
    return RecipientScreen(SuppressionStore(redis), QuotaStore(redis, metrics), metrics)


def log() -> Log:
    logger: Log = structlog.get_logger()
    return logger


@pytest.fixture
async def lists(redis_client: aioredis.Redis) -> SuppressionStore:
    store = SuppressionStore(redis_client)
    await store.add("own@example.test", user_id=UID, reason=SuppressionReason.UNSUBSCRIBE,
                    source="test")
    await store.add("spam@example.test", user_id=None, reason=SuppressionReason.COMPLAINT,
                    source="test")
    return store


async def test_screen_before_reserve_refuses_the_global_list_only(
        redis_client: aioredis.Redis, lists: SuppressionStore) -> None:
    """before_reserve: a global entry is refused (scope global) and counted; the user's own
    entry is left to reserve.lua, so the address comes back normalised for it."""
    metrics = RelayMetrics()
    screen = screen_on(redis_client, metrics)
    assert await screen.before_reserve(UID, NOV, "Own@Example.test", log()) == \
        "own@example.test"
    with pytest.raises(RecipientSuppressedError) as refused:
        await screen.before_reserve(UID, NOV, "SPAM@example.test", log())
    assert (refused.value.suppression, refused.value.scope) == ("complaint", "global")
    usage = await QuotaStore(redis_client).usage(UID, NOV)
    assert (usage.used, usage.suppressed, usage.suppressed_reasons) == (0, 1, {"complaint": 1})
    assert metrics.registry.get_sample_value(
        "relay_recipients_suppressed_total", {"reason": "complaint", "scope": "global"}) == 1


async def test_screen_at_rcpt_refuses_either_list(redis_client: aioredis.Redis,
                                                  lists: SuppressionStore) -> None:
    """at_rcpt (no reservation): the user's entry and the global one are both refused; an
    address on neither passes."""
    screen = screen_on(redis_client, RelayMetrics())
    with pytest.raises(RecipientSuppressedError) as own:
        await screen.at_rcpt(UID, NOV, "own@example.test", log())
    assert own.value.reply == "550 5.7.1 Recipient has unsubscribed from this sender"
    with pytest.raises(RecipientSuppressedError):
        await screen.at_rcpt(UID, NOV, "spam@example.test", log())
    await screen.at_rcpt(UID, NOV, "kept@example.test", log())
    assert (await QuotaStore(redis_client).usage(UID, NOV)).suppressed == 2


async def test_screen_drop_keeps_the_others_in_order_and_logs_each_dropped(
        redis_client: aioredis.Redis, lists: SuppressionStore) -> None:
    """drop: the recipients not on a list, in their order; one refusal per dropped address
    (as given by the client), each logged as rcpt.refused and counted."""
    metrics = RelayMetrics()
    screen = screen_on(redis_client, metrics)
    with capture_logs() as logs:
        kept, dropped = await screen.drop(UID, NOV, ["a@example.test", "Own@example.test",
                                                     "b@example.test", "spam@example.test"],
                                          log())
    assert kept == ["a@example.test", "b@example.test"]
    assert {a: (r.suppression, r.scope) for a, r in dropped.items()} == {
        "Own@example.test": ("unsubscribe", "user"), "spam@example.test": ("complaint",
                                                                           "global")}
    assert [(e["event"], e["suppression"], e["deferred"]) for e in logs] == [
        ("rcpt.refused", "unsubscribe", True), ("rcpt.refused", "complaint", True)]
    assert metrics.registry.get_sample_value(
        "relay_recipients_total",
        {"outcome": "refused", "reason": "RecipientSuppressedError"}) == 2
    assert await screen.drop(UID, NOV, ["a@example.test"], log()) == (["a@example.test"], {})


async def test_screen_redis_unreachable_fails_closed() -> None:
    """With Redis unreachable the check raises StoreUnavailableError (the client gets a 451
    and retries; nothing is sent unchecked) and counts the error."""
    metrics = RelayMetrics()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        client = connect_redis(f"redis://127.0.0.1:{holder.getsockname()[1]}/0", timeout=1)
        try:
            screen = screen_on(client, metrics)
            with pytest.raises(StoreUnavailableError):
                await screen.before_reserve(UID, NOV, "a@example.test", log())
            with pytest.raises(StoreUnavailableError):
                await screen.drop(UID, NOV, ["a@example.test"], log())
        finally:
            await client.aclose()
    assert metrics.registry.get_sample_value(
        "relay_redis_errors_total", {"step": "suppression"}) == 2
