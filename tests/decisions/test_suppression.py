"""relay.decisions.suppression: the list's store against a real redis-server."""

from __future__ import annotations

import redis.asyncio as aioredis

from relay.decisions.suppression import (
    GLOBAL,
    Suppression,
    SuppressionReason,
    SuppressionStore,
    reason_of,
)
from relay.store import keys


async def test_entries_are_scoped_and_normalised(redis_client: aioredis.Redis) -> None:
    store = SuppressionStore(redis_client)
    await store.add("Ann@Example.COM", user_id="u-1", reason=SuppressionReason.UNSUBSCRIBE,
                    source="cli", at=100)
    await store.add("bob@example.com", user_id=None, reason=SuppressionReason.BOUNCE,
                    source="mandrill", at=200)
    entry = await store.get("ANN@example.com", user_id="u-1")
    assert entry == Suppression("ann@example.com", "u-1", SuppressionReason.UNSUBSCRIBE,
                                "cli", 100)
    # A user's entry is not another user's, nor global; the global one is nobody's own.
    assert await store.get("ann@example.com", user_id="u-2") is None
    assert await store.check_global("ann@example.com") is None
    bounced = await store.check_global("BOB@example.com")
    assert bounced is not None and bounced.scope == GLOBAL
    assert await store.get("bob@example.com", user_id="u-1") is None
    # Stored where reserve.lua (user scope, the user's slot) and the RCPT path look.
    assert await redis_client.hget(keys.suppressions("u-1"), "ann@example.com") == \
        "unsubscribe\tcli\t100"


async def test_replace_remove_and_list(redis_client: aioredis.Redis) -> None:
    store = SuppressionStore(redis_client)
    await store.add("c@example.com", user_id="u-3", reason=SuppressionReason.MANUAL,
                    source="cli", at=1)
    await store.add("c@example.com", user_id="u-3", reason=SuppressionReason.COMPLAINT,
                    source="api", at=2)
    created = await store.add_many([
        Suppression("b@example.com", "u-3", SuppressionReason.BOUNCE, "import", 3),
        Suppression("A@example.com", "u-3", SuppressionReason.UNSUBSCRIBE, "import", 4),
        Suppression("c@example.com", "u-3", SuppressionReason.MANUAL, "import", 5),
    ])
    assert created == 2  # c@ was already listed: replaced, not new
    listed = await store.listing(user_id="u-3")
    assert [(e.address, e.reason.value) for e in listed] == [
        ("a@example.com", "unsubscribe"), ("b@example.com", "bounce"),
        ("c@example.com", "manual")]
    assert await store.remove("C@example.com", user_id="u-3") is True
    assert await store.remove("c@example.com", user_id="u-3") is False
    assert len(await store.listing(user_id="u-3")) == 2
    assert await store.add_many([]) == 0


async def test_check_reads_both_scopes_global_first(redis_client: aioredis.Redis) -> None:
    """check: the global entry when there is one (it names the wider refusal), else the
    user's own; nothing for an address on neither list or on another user's."""
    store = SuppressionStore(redis_client)
    await store.add("both@example.com", user_id="u-1", reason=SuppressionReason.UNSUBSCRIBE,
                    source="cli", at=1)
    await store.add("both@example.com", user_id=None, reason=SuppressionReason.COMPLAINT,
                    source="mandrill", at=2)
    await store.add("own@example.com", user_id="u-1", reason=SuppressionReason.UNSUBSCRIBE,
                    source="one-click", at=3)
    both = await store.check("Both@Example.com", user_id="u-1")
    assert both == Suppression("both@example.com", None, SuppressionReason.COMPLAINT,
                               "mandrill", 2)
    own = await store.check("own@example.com", user_id="u-1")
    assert own is not None and own.scope == "u-1"
    assert await store.check("own@example.com", user_id="u-2") is None
    assert await store.check("free@example.com", user_id="u-1") is None


async def test_check_many_keys_hits_by_normalised_address(
        redis_client: aioredis.Redis) -> None:
    """check_many answers every address at once (repeats and case folded), hits only."""
    store = SuppressionStore(redis_client)
    await store.add("a@example.com", user_id="u-1", reason=SuppressionReason.MANUAL,
                    source="cli", at=1)
    await store.add("b@example.com", user_id=None, reason=SuppressionReason.BOUNCE,
                    source="cli", at=1)
    found = await store.check_many(["A@example.com", "b@example.com", "c@example.com",
                                    "a@example.com"], user_id="u-1")
    assert {address: (e.reason.value, e.scope) for address, e in found.items()} == {
        "a@example.com": ("manual", "u-1"), "b@example.com": ("bounce", GLOBAL)}
    assert await store.check_many([], user_id="u-1") == {}


def test_reason_of_an_unknown_reason_is_manual() -> None:
    """An entry's reason this relay does not know reads as manual (still suppressed)."""
    assert reason_of("bounce") is SuppressionReason.BOUNCE
    assert reason_of("legal-hold") is SuppressionReason.MANUAL
