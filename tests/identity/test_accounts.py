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

from relay.errors import SenderNotAllowedError, UnknownSenderError, UserDisabledError
from relay.identity.accounts import (
    ACTIVE,
    DISABLED,
    AccountConflictError,
    AccountError,
    AccountStore,
    AppPrincipal,
    UserPrincipal,
    check_address,
    normalize_address,
)
from relay.identity.passwords import verify_password
from relay.store import keys
from tests.conftest import PASSWORD, add_user

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


# -- users and apps in the store -------------------------------------------------------------
async def test_a_user_is_found_by_id_or_by_any_address_it_owns(accounts: AccountStore) -> None:
    user = await add_user(accounts, senders=("Desk@KW.test",), plan="pro", limit=42,
                          tz="Europe/Paris")
    assert (user.email, user.plan, user.custom_limit, user.tz) == (
        "agent@kw.test", "pro", 42, "Europe/Paris")
    assert user.status == ACTIVE and user.active and user.pending is None
    assert await accounts.get_user(user.id) == user
    assert await accounts.find_user(user.id) == user
    assert await accounts.find_user("desk@kw.test") == user
    assert await accounts.find_user("nobody@kw.test") is None
    assert await accounts.find_user("not an id") is None
    assert await accounts.get_user("u-missing") is None
    other = await add_user(accounts, "other@kw.test")
    assert [u.id for u in await accounts.list_users()] == sorted([user.id, other.id])


async def test_a_taken_address_or_id_is_refused_and_claims_nothing(
        accounts: AccountStore, redis_client: aioredis.Redis) -> None:
    """A user whose addresses include one already owned is not created, and the free
    addresses of that attempt stay free; a taken id, a bad id or a bad address is refused."""
    first = await add_user(accounts, senders=("shared@kw.test",), user_id="u-first")
    with pytest.raises(AccountConflictError, match=r"shared@kw\.test"):
        await add_user(accounts, "new@kw.test", senders=("a-free@kw.test", "shared@kw.test"))
    assert await redis_client.get(keys.sender_index("a-free@kw.test")) is None
    assert await redis_client.get(keys.sender_index("new@kw.test")) is None
    assert await accounts.find_user("shared@kw.test") == first
    with pytest.raises(AccountConflictError, match="u-first"):
        await add_user(accounts, "third@kw.test", user_id="u-first")
    with pytest.raises(AccountError, match="user id"):
        await add_user(accounts, "fourth@kw.test", user_id="has space")
    with pytest.raises(AccountError, match="not an email address"):
        await add_user(accounts, "no-at-sign")
    assert [u.id for u in await accounts.list_users()] == ["u-first"]


async def test_a_disabled_user_cannot_send_until_enabled_again(accounts: AccountStore) -> None:
    user = await add_user(accounts)
    await accounts.set_user_status(user.id, DISABLED)
    for principal in (UserPrincipal(user.email, user.id), AppPrincipal("smartplans")):
        with pytest.raises(UserDisabledError):
            await accounts.resolve_sender(principal, "agent@kw.test")
    await accounts.set_user_status(user.id, ACTIVE)
    assert (await accounts.resolve_sender(AppPrincipal("smartplans"), "agent@kw.test")).id \
        == user.id
    with pytest.raises(AccountError):
        await accounts.set_user_status("u-missing", DISABLED)


async def test_a_user_credential_sends_only_from_its_own_addresses(
        accounts: AccountStore) -> None:
    user = await add_user(accounts, senders=("desk@kw.test",))
    other = await add_user(accounts, "other@kw.test")
    principal = UserPrincipal(user.email, user.id)
    assert (await accounts.resolve_sender(principal, "desk@kw.test")).id == user.id
    with pytest.raises(SenderNotAllowedError):
        await accounts.resolve_sender(principal, other.email)
    with pytest.raises(UnknownSenderError):
        await accounts.resolve_sender(AppPrincipal("smartplans"), "nobody@kw.test")


async def test_route_preferences_are_saved_and_cleared(accounts: AccountStore) -> None:
    user = await add_user(accounts)
    await accounts.set_preference(user.id, "campaigns", "mailchimp")
    found = await accounts.get_user(user.id)
    assert found is not None and dict(found.preferences) == {"campaigns": "mailchimp"}
    await accounts.set_preference(user.id, "campaigns", None)
    found = await accounts.get_user(user.id)
    assert found is not None and dict(found.preferences) == {}
    with pytest.raises(AccountError):
        await accounts.set_preference("u-missing", "campaigns", "mailchimp")


async def test_a_password_hash_is_found_for_the_login_address_only(
        accounts: AccountStore) -> None:
    """A user logs in with its own email, not with another address it may send from; a user
    without a credential (sends only through apps) has no hash."""
    user = await add_user(accounts, senders=("desk@kw.test",))
    found = await accounts.user_password_hash("agent@kw.test")
    assert found is not None and found[0] == user and verify_password(PASSWORD.encode(), found[1])
    assert await accounts.user_password_hash("desk@kw.test") is None
    await add_user(accounts, "apps-only@kw.test", password=False)
    assert await accounts.user_password_hash("apps-only@kw.test") is None


async def test_apps_are_added_once_and_listed_with_their_hash(accounts: AccountStore) -> None:
    app = await accounts.add_app("smartplans", password_hash="h-1")
    assert (app.name, app.status) == ("smartplans", ACTIVE)
    await accounts.add_app("campaigns", password_hash="h-2")
    with pytest.raises(AccountConflictError):
        await accounts.add_app("smartplans", password_hash="h-3")
    with pytest.raises(AccountError):
        await accounts.add_app("Bad Name", password_hash="h-4")
    assert await accounts.app_password_hash("smartplans") == (app, "h-1")
    assert await accounts.app_password_hash("unknown") is None
    assert await accounts.app_password_hash("Bad Name") is None
    assert [a.name for a in await accounts.list_apps()] == ["campaigns", "smartplans"]
