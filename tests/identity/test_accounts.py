"""relay/identity/accounts.py against a real redis-server.

Address normalisation: only ASCII letters are case-folded, so a non-ASCII look-alike (KELVIN
SIGN for K, a leading ideographic space) is another address, never an alias of an ASCII one,
wherever addresses are compared: sender matching, lookup by email, login and user creation.

Sender hints: an app's MAIL FROM costs one Redis round trip once the sender's user is known;
the sender -> user hint is only trusted while the user's own record still lists the address.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from relay.errors import SenderNotAllowedError, UnknownSenderError
from relay.identity.accounts import (
    AccountConflictError,
    AccountStore,
    AppPrincipal,
    UserPrincipal,
    check_address,
    normalize_address,
)
from relay.store import keys
from tests.conftest import add_user

KELVIN = "\u212a"  # KELVIN SIGN: str.lower() makes it an ASCII "k"
# Non-ASCII spellings that str.lower() or str.strip() would turn into the ASCII address of
# another user: what an attacker writes in MAIL FROM (with SMTPUTF8) or in a login.
LOOK_ALIKES = [
    pytest.param(f"agent@{KELVIN}w.test", id="kelvin_sign"),
    pytest.param(f"AGENT@{KELVIN}W.TEST", id="kelvin_sign_upper"),
    pytest.param("\u3000agent@kw.test", id="ideographic_space"),  # strip() removes it
    pytest.param("agent@kw.test\u00a0", id="no_break_space"),
]


@pytest.mark.parametrize(("given", "normalized"), [
    ("Agent@KW.Test", "agent@kw.test"),
    (" agent@kw.test\t", "agent@kw.test"),
    (f"agent@{KELVIN}w.test", f"agent@{KELVIN}w.test"),
    ("JOS\u00c9@kw.test", "jos\u00c9@kw.test"),  # only A-Z are folded
    ("stra\u00dfe@kw.test", "stra\u00dfe@kw.test"),
    ("\u0130nfo@kw.test", "\u0130nfo@kw.test"),  # str.lower(): "i" + COMBINING DOT ABOVE
    ("\u3000agent@kw.test", "\u3000agent@kw.test"),  # non-ASCII blanks are not stripped
])
def test_normalize_address_folds_ascii_letters_only(given: str, normalized: str) -> None:
    assert normalize_address(given) == normalized


def test_check_address_folds_ascii_letters_only() -> None:
    assert check_address("Agent@KW.Test") == "agent@kw.test"
    assert check_address(f"Agent@{KELVIN}w.test") == f"agent@{KELVIN}w.test"


def test_sender_index_key_keeps_non_ascii_as_given() -> None:
    """The index key is the normalised address as it is: no second, wider folding."""
    assert keys.sender_index(f"agent@{KELVIN}w.test") != keys.sender_index("agent@kw.test")


@pytest.mark.parametrize("look_alike", LOOK_ALIKES)
async def test_user_credential_cannot_send_from_a_look_alike_of_its_address(
        accounts: AccountStore, look_alike: str) -> None:
    """A look-alike of the user's own address is an address the user does not own."""
    user = await add_user(accounts)
    with pytest.raises(SenderNotAllowedError):
        await accounts.resolve_sender(UserPrincipal(user.email, user.id), look_alike)


@pytest.mark.parametrize("look_alike", LOOK_ALIKES)
async def test_app_credential_look_alike_is_nobodys_address(accounts: AccountStore,
                                                          look_alike: str) -> None:
    """An app sending from a look-alike is not counted against (or sent as) the owner of the
    ASCII address."""
    await add_user(accounts)
    with pytest.raises(UnknownSenderError):
        await accounts.resolve_sender(AppPrincipal("smartplans"), look_alike)


@pytest.mark.parametrize("look_alike", LOOK_ALIKES)
async def test_look_alike_finds_no_user_and_logs_nobody_in(accounts: AccountStore,
                                                           look_alike: str) -> None:
    await add_user(accounts)
    assert await accounts.find_user(look_alike) is None
    assert await accounts.user_password_hash(look_alike) is None


async def test_ascii_case_still_matches(accounts: AccountStore) -> None:
    """Case does not matter for ASCII letters (what providers do): same user, same login."""
    user = await add_user(accounts, senders=("Desk@KW.test",))
    assert user.senders == {"agent@kw.test", "desk@kw.test"}
    principal = UserPrincipal(user.email, user.id)
    assert (await accounts.resolve_sender(principal, "DESK@kw.TEST")).id == user.id
    assert (await accounts.resolve_sender(AppPrincipal("smartplans"), "Agent@Kw.Test")).id \
        == user.id
    found = await accounts.user_password_hash("AGENT@KW.TEST")
    assert found is not None and found[0].id == user.id


async def test_a_look_alike_is_a_different_address_to_own(accounts: AccountStore,
                                                          redis_client: aioredis.Redis) -> None:
    """Creating a user with the look-alike is not a conflict with the ASCII address, and each
    address resolves to its own owner only."""
    ascii_owner = await add_user(accounts)
    look_alike = f"agent@{KELVIN}w.test"
    other = await add_user(accounts, "other@kw.test", senders=(look_alike,))
    assert look_alike in other.senders
    assert await redis_client.get(keys.sender_index("agent@kw.test")) == ascii_owner.id
    assert await redis_client.get(keys.sender_index(look_alike)) == other.id
    app = AppPrincipal("smartplans")
    assert (await accounts.resolve_sender(app, look_alike)).id == other.id
    assert (await accounts.resolve_sender(app, "agent@kw.test")).id == ascii_owner.id
    with pytest.raises(SenderNotAllowedError):
        await accounts.resolve_sender(UserPrincipal(other.email, other.id), "agent@kw.test")
    with pytest.raises(AccountConflictError):
        await add_user(accounts, "third@kw.test", senders=(f"AGENT@{KELVIN}w.test",))


# -- sender hints ---------------------------------------------------------------------------
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
