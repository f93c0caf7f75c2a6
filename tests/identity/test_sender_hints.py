"""An app's MAIL FROM costs one Redis round trip once the sender's user is known: the
sender -> user hint is only trusted while the user's own record still lists the address."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from relay.errors import UnknownSenderError
from relay.identity.accounts import AccountStore, AppPrincipal
from relay.store import keys
from tests.conftest import add_user


async def _gets(redis_client: aioredis.Redis) -> int:
    stats = await redis_client.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


async def test_second_lookup_skips_the_sender_index(accounts: AccountStore,
                                                    redis_client: aioredis.Redis):
    user = await add_user(accounts, senders=("team@kw.test",))
    app = AppPrincipal("campaigns")
    assert (await accounts.resolve_sender(app, "Team@kw.test")).id == user.id
    before = await _gets(redis_client)
    for _ in range(3):
        assert (await accounts.resolve_sender(app, "team@kw.test")).id == user.id
    assert await _gets(redis_client) == before  # no index GET: the hint, checked by the record


async def test_a_moved_sender_is_followed_to_its_new_owner(accounts: AccountStore,
                                                           redis_client: aioredis.Redis):
    first = await add_user(accounts, senders=("desk@kw.test",))
    second = await add_user(accounts, "other@kw.test")
    app = AppPrincipal("campaigns")
    assert (await accounts.resolve_sender(app, "desk@kw.test")).id == first.id
    # An operator moves the address (the index and both sender sets).
    await redis_client.srem(keys.user_senders(first.id), "desk@kw.test")
    await redis_client.sadd(keys.user_senders(second.id), "desk@kw.test")
    await redis_client.set(keys.sender_index("desk@kw.test"), second.id)
    assert (await accounts.resolve_sender(app, "desk@kw.test")).id == second.id


async def test_a_removed_sender_is_unknown_again(accounts: AccountStore,
                                                 redis_client: aioredis.Redis):
    first = await add_user(accounts, senders=("gone@kw.test",))
    app = AppPrincipal("campaigns")
    await accounts.resolve_sender(app, "gone@kw.test")
    await redis_client.srem(keys.user_senders(first.id), "gone@kw.test")
    await redis_client.delete(keys.sender_index("gone@kw.test"))
    with pytest.raises(UnknownSenderError):
        await accounts.resolve_sender(app, "gone@kw.test")
