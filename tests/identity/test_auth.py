"""The verified-credential cache: a slow hash once per credential, never a stale answer."""

from __future__ import annotations

import pytest

from relay.identity import auth
from relay.identity.accounts import DISABLED, AccountStore
from relay.identity.auth import Authenticator, VerifiedCache
from relay.identity.passwords import hash_password
from relay.store import keys
from tests.conftest import PASSWORD, add_app, add_user


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Records every password the slow scrypt check is run on."""
    seen: list[bytes] = []
    real = auth.verify_password

    def counting(password: bytes, stored: str) -> bool:
        seen.append(password)
        return real(password, stored)

    monkeypatch.setattr(auth, "verify_password", counting)
    return seen


async def test_auth_cache_skips_the_slow_hash_for_a_known_credential(accounts: AccountStore,
                                                                     hashes: list[bytes]):
    """The second AUTH with the same login and password runs no scrypt check."""
    await add_user(accounts)
    auth = Authenticator(accounts)
    for _ in range(3):
        principal = await auth.authenticate(b"agent@kw.test", PASSWORD.encode())
        assert principal is not None and principal.login == "agent@kw.test"
    assert len(hashes) == 1
    assert len(auth.cache) == 1


async def test_auth_cache_never_remembers_a_wrong_password(accounts: AccountStore,
                                                           hashes: list[bytes]):
    """Failures are checked every time (and cost one hash, like unknown logins)."""
    await add_user(accounts)
    auth = Authenticator(accounts)
    for _ in range(2):
        assert await auth.authenticate(b"agent@kw.test", b"wrong") is None
        assert await auth.authenticate(b"nobody@kw.test", b"wrong") is None
    assert len(hashes) == 4
    assert len(auth.cache) == 0


async def test_auth_cache_follows_a_password_change(accounts: AccountStore, redis_client):
    """After the stored password changes, the old one is refused at the next AUTH."""
    user = await add_user(accounts)
    auth = Authenticator(accounts)
    assert await auth.authenticate(b"agent@kw.test", PASSWORD.encode()) is not None
    await redis_client.hset(keys.user(user.id), "password", hash_password("new secret"))
    assert await auth.authenticate(b"agent@kw.test", PASSWORD.encode()) is None
    assert await auth.authenticate(b"agent@kw.test", b"new secret") is not None


async def test_auth_cache_follows_disabling(accounts: AccountStore, redis_client):
    """A disabled user or app is refused even though its credential was verified before."""
    user = await add_user(accounts)
    await add_app(accounts, "campaigns")
    auth = Authenticator(accounts)
    assert await auth.authenticate(b"agent@kw.test", PASSWORD.encode()) is not None
    assert await auth.authenticate(b"campaigns", PASSWORD.encode()) is not None
    await accounts.set_user_status(user.id, DISABLED)
    await redis_client.hset(keys.app("campaigns"), "status", DISABLED)
    assert await auth.authenticate(b"agent@kw.test", PASSWORD.encode()) is None
    assert await auth.authenticate(b"campaigns", PASSWORD.encode()) is None


def test_auth_cache_is_bounded_and_keyed_by_a_digest():
    """Least recently used entries go first; no password is kept in the cache."""
    cache = VerifiedCache(size=2)
    a, b, c = (cache.digest(login, b"pw") for login in (b"a", b"b", b"c"))
    cache.remember(a, "h")
    cache.remember(b, "h")
    assert cache.holds(a, "h")  # a is now the most recent
    cache.remember(c, "h")
    assert cache.holds(a, "h") and cache.holds(c, "h") and not cache.holds(b, "h")
    assert not cache.holds(a, "other stored hash")
    assert cache.digest(b"ab", b"c") != cache.digest(b"a", b"bc")
    assert b"pw" not in b"".join(cache._entries)


async def test_an_app_login_reads_the_throttle_and_the_credential_together(
        accounts: AccountStore, redis_client, hashes: list[bytes]):
    """One pipelined read for an app: the login's failures so far come back with the
    principal, and a login at its limit is refused before any password is checked."""
    from relay.errors import AuthThrottledError
    from relay.identity.throttle import AuthThrottle

    await add_app(accounts, "campaigns")
    throttle = AuthThrottle(redis_client, per_client=5, per_login=3, window=60)
    auth = Authenticator(accounts)
    principal, earlier = await auth.check(b"campaigns", PASSWORD.encode(), throttle,
                                          "127.0.0.9")
    assert principal is not None and principal.app == "campaigns" and earlier == 0
    await throttle.record_failure("127.0.0.9", b"campaigns")
    await throttle.record_failure("127.0.0.9", b"campaigns")
    principal, earlier = await auth.check(b"campaigns", b"wrong", throttle, "127.0.0.9")
    assert principal is None and earlier == 2
    await throttle.record_failure("127.0.0.9", b"campaigns")
    checked = len(hashes)
    with pytest.raises(AuthThrottledError):
        await auth.check(b"campaigns", PASSWORD.encode(), throttle, "127.0.0.9")
    assert len(hashes) == checked  # refused without looking at the password
    # An app name no app can have asks nothing of the credential, and still pays a hash.
    principal, _ = await auth.check(b"no such app!", PASSWORD.encode(), throttle, "127.0.0.8")
    assert principal is None and len(hashes) == checked + 1
