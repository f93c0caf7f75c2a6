"""Users (agents) and application credentials kept in Redis, and who a send counts against
(STYLE §1 step 3).

A user owns sender addresses; a *user credential* (login = the user's email) may send only
from them. An *app credential* (login = the app name, e.g. ``smartplans``) may send for any
active user, and the send counts against the user who owns the MAIL FROM address.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from relay.errors import (
    SenderNotAllowedError,
    UnknownSenderError,
    UserDisabledError,
)
from relay.store import hot, keys
from relay.store.client import RedisClient, store_errors
from relay.store.scripts import lua_source

PREFERENCE_PREFIX = "route:"
ACTIVE = "active"
DISABLED = "disabled"
_APP_NAME = re.compile(r"^[a-z][a-z0-9_-]{1,63}$")
# The same patterns as relay/admin/openapi.json states (the admin API's users): "$(?!\n)" is the end
# of the text in both Python's and ECMAScript's regular expressions (Python's "$" alone also
# matches before a final newline).
USER_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$(?!\n)"
# Deliberately simple: one @, no spaces or angle brackets. RFC 5321 validity is the
# upstream's business; this only keeps junk out of the sender index.
# "Spaces" are spelled out: what \s matches differs between Python's and ECMAScript's (and
# Rust's) regular expressions, and the document must mean the same to every validator.
_ADDRESS_CHAR = (r"[^@<>\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f"
                 r"\u3000\ufeff]")
ADDRESS_PATTERN = rf"^{_ADDRESS_CHAR}+@{_ADDRESS_CHAR}+$(?!\n)"
_USER_ID = re.compile(USER_ID_PATTERN)
_ADDRESS = re.compile(ADDRESS_PATTERN)


class AccountError(ValueError):
    """An admin operation on users or apps was refused (exists, not found, bad value)."""


class AccountConflictError(AccountError):
    """The id, name or an address is already taken (the admin API's 409)."""


@dataclass(frozen=True, slots=True)
class PendingChange:
    plan: str
    custom_limit: int | None
    effective_from: str  # YYYY-MM


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str
    plan: str
    custom_limit: int | None
    tz: str
    status: str
    senders: frozenset[str]
    created_at: str
    # A downgrade or cancellation waiting for the next monthly reset (see subscriptions.py).
    pending: PendingChange | None = None
    # Saved route per app (`command-relay route set USER campaigns mailchimp`).
    preferences: Mapping[str, str] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.status == ACTIVE


@dataclass(frozen=True, slots=True)
class App:
    name: str
    status: str
    created_at: str


@dataclass(frozen=True, slots=True)
class UserPrincipal:
    """Authenticated with a user credential: may send only from that user's addresses."""

    login: str
    user_id: str

    @property
    def app(self) -> str:
        return "direct"


@dataclass(frozen=True, slots=True)
class AppPrincipal:
    """Authenticated with an application credential: may send for any active user."""

    login: str

    @property
    def app(self) -> str:
        return self.login


Principal = UserPrincipal | AppPrincipal


# A-Z only. str.lower() also maps non-ASCII characters onto ASCII ones (KELVIN SIGN U+212A
# becomes "k"), and str.strip() removes non-ASCII blanks (U+3000, U+00A0): either let a
# look-alike that is another address on the wire match the ASCII address a user owns.
_ASCII_UPPER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def ascii_lower(text: str) -> str:
    """``text`` with A-Z lower-cased and every other character left as it is."""
    return text.translate(_ASCII_UPPER)


def normalize_address(address: str) -> str:
    """Sender addresses are matched case-insensitively in ASCII (what every provider does in
    practice); non-ASCII characters are compared exactly, so a look-alike never folds onto an
    ASCII address. Only ASCII blanks around it are taken away."""
    return ascii_lower(address.strip(string.whitespace))


def check_address(address: str) -> str:
    """A new address, normalised like a looked-up one (A-Z lower-cased); AccountError unless it
    matches ADDRESS_PATTERN as given (no surrounding spaces taken away: what is refused is
    what the API document refuses)."""
    if not _ADDRESS.match(address):
        raise AccountError(f"not an email address: {address!r}")
    return ascii_lower(address)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def user_from_record(user_id: str, record: Mapping[str, str],
                     senders: set[str] | frozenset[str]) -> User:
    """The User of a stored record (``keys.user``) and sender set (``keys.user_senders``)."""
    return User(
        id=user_id,
        email=record["email"],
        plan=record["plan"],
        custom_limit=int(record["limit"]) if record.get("limit") else None,
        tz=record["tz"],
        status=record["status"],
        senders=frozenset(senders),
        created_at=record.get("created_at", ""),
        pending=PendingChange(
            plan=record["pending_plan"],
            custom_limit=int(record["pending_limit"]) if record.get("pending_limit") else None,
            effective_from=record["pending_from"],
        ) if record.get("pending_from") else None,
        preferences={name.removeprefix(PREFERENCE_PREFIX): value
                     for name, value in record.items() if name.startswith(PREFERENCE_PREFIX)},
    )


class AccountStore:
    """Reads and writes users and apps. Redis errors surface as StoreUnavailableError."""

    # Bound on the sender -> user id hints kept per process (about 100 bytes each).
    SENDER_HINTS = 50_000

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self._read_user = hot.register_script(redis,
            lua_source("relay.identity", "user.lua"))
        # Which user owned a sender address when last looked up. Only a hint, to save the
        # index lookup on an app's MAIL FROM: it is used only if the user record, read fresh
        # on every MAIL, still lists the address; otherwise the index is asked again.
        self._sender_hints: dict[str, str] = {}

    # -- users ---------------------------------------------------------------------------
    async def add_user(self, email: str, *, plan: str, tz: str, password_hash: str | None,
                       custom_limit: int | None = None, senders: tuple[str, ...] = (),
                       user_id: str | None = None) -> User:
        """Create a user owning ``email`` and ``senders``; raises AccountError if any address
        or the id is already taken."""
        email = check_address(email)
        addresses = {email, *(check_address(s) for s in senders)}
        user_id = f"u-{secrets.token_hex(5)}" if user_id is None else user_id
        if not _USER_ID.match(user_id):
            raise AccountError(f"user id must be letters, digits, - and _: {user_id!r}")
        record = {"email": email, "plan": plan, "tz": tz, "status": ACTIVE,
                  "created_at": _now()}
        if custom_limit is not None:
            record["limit"] = str(custom_limit)
        if password_hash is not None:
            record["password"] = password_hash
        with store_errors():
            if await self._redis.exists(keys.user(user_id)):
                raise AccountConflictError(f"user id {user_id} already exists")
            claimed: list[str] = []
            for address in sorted(addresses):
                # SET NX claims each address atomically, so two admins racing cannot both
                # own one address; a failed claim rolls back the ones this call made.
                if await self._redis.set(keys.sender_index(address), user_id, nx=True):
                    claimed.append(address)
                    continue
                if claimed:
                    await self._redis.delete(*(keys.sender_index(a) for a in claimed))
                raise AccountConflictError(f"address {address} already belongs to a user")
            async with self._redis.pipeline(transaction=False) as pipe:
                # redis-py's stubs want a Mapping with a union key type; ours is all str.
                pipe.hset(keys.user(user_id), mapping=record)  # type: ignore[arg-type]
                pipe.sadd(keys.user_senders(user_id), *addresses)
                pipe.sadd(keys.users_index(), user_id)
                await pipe.execute()
        return user_from_record(user_id, record, addresses)

    async def get_user(self, user_id: str) -> User | None:
        """One round trip: the user record and its sender set, in one script (same slot)."""
        with store_errors():
            flat, senders = await self._read_user(
                keys=[keys.user(user_id), keys.user_senders(user_id)])
        if not flat:
            return None
        record = dict(zip(flat[::2], flat[1::2], strict=True))
        return user_from_record(user_id, record, set(senders))

    async def find_user(self, ref: str) -> User | None:
        """A user by id or by any address they own."""
        if "@" in ref:
            with store_errors():
                user_id = await self._redis.get(keys.sender_index(normalize_address(ref)))
            return await self.get_user(str(user_id)) if user_id else None
        return await self.get_user(ref) if _USER_ID.match(ref) else None

    async def list_users(self) -> list[User]:
        with store_errors():
            ids = sorted(await self._redis.smembers(keys.users_index()))
        users = [await self.get_user(str(user_id)) for user_id in ids]
        return [u for u in users if u is not None]

    async def set_user_status(self, user_id: str, status: str) -> None:
        with store_errors():
            if not await self._redis.exists(keys.user(user_id)):
                raise AccountError(f"no user {user_id}")
            await self._redis.hset(keys.user(user_id), "status", status)

    async def set_preference(self, user_id: str, app: str, route: str | None) -> None:
        """Save (or clear, with None) the user's route for ``app``."""
        with store_errors():
            if not await self._redis.exists(keys.user(user_id)):
                raise AccountError(f"no user {user_id}")
            if route is None:
                await self._redis.hdel(keys.user(user_id), PREFERENCE_PREFIX + app)
            else:
                await self._redis.hset(keys.user(user_id), PREFERENCE_PREFIX + app, route)

    async def user_password_hash(self, email: str) -> tuple[User, str] | None:
        """The user who logs in as ``email`` and their stored hash, if they have a credential."""
        user = await self.find_user(email)
        if user is None or normalize_address(email) != user.email:
            return None
        with store_errors():
            stored = await self._redis.hget(keys.user(user.id), "password")
        return (user, str(stored)) if stored else None

    # -- apps ----------------------------------------------------------------------------
    async def add_app(self, name: str, *, password_hash: str) -> App:
        if not _APP_NAME.match(name):
            raise AccountError(
                f"app name must be 2-64 lower-case letters, digits, - and _: {name!r}")
        created = _now()
        with store_errors():
            added = await self._redis.hsetnx(keys.app(name), "password", password_hash)
            if not added:
                raise AccountConflictError(f"app {name} already exists")
            await self._redis.hset(keys.app(name),
                                   mapping={"status": ACTIVE, "created_at": created})
            await self._redis.sadd(keys.apps_index(), name)
        return App(name, ACTIVE, created)

    async def app_password_hash(self, name: str) -> tuple[App, str] | None:
        if not _APP_NAME.match(name):
            return None
        with store_errors():
            record = await self._redis.hgetall(keys.app(name))
        return app_credential(name, record)

    @property
    def redis(self) -> RedisClient:
        """The client, for a caller that pipelines its own reads with ``queue_app``."""
        return self._redis

    def queue_app(self, pipe: Any, name: str) -> bool:
        """Queue the read of ``app_password_hash`` on ``pipe`` (False, nothing queued, for a
        name no app can have); ``app_credential`` reads its result."""
        if not _APP_NAME.match(name):
            return False
        pipe.hgetall(keys.app(name))
        return True

    async def list_apps(self) -> list[App]:
        with store_errors():
            names = sorted(await self._redis.smembers(keys.apps_index()))
        apps = [await self.app_password_hash(str(name)) for name in names]
        return [found[0] for found in apps if found is not None]

    # -- the SMTP path -------------------------------------------------------------------
    async def resolve_sender(self, principal: Principal, address: str) -> User:
        """The user a send from ``address`` counts against.

        Raises SenderNotAllowedError (user credential, foreign address), UnknownSenderError
        (app credential, address nobody owns), UserDisabledError, StoreUnavailableError.
        """
        normalized = normalize_address(address)
        if isinstance(principal, UserPrincipal):
            user = await self.get_user(principal.user_id)
            if user is None or normalized not in user.senders:
                raise SenderNotAllowedError()
        else:
            hint = self._sender_hints.get(normalized)
            user = await self.get_user(hint) if hint else None
            if user is None or normalized not in user.senders:
                with store_errors():
                    user_id = await self._redis.get(keys.sender_index(normalized))
                user = await self.get_user(str(user_id)) if user_id else None
                if user is None:
                    self._sender_hints.pop(normalized, None)
                    raise UnknownSenderError()
                if len(self._sender_hints) >= self.SENDER_HINTS:
                    self._sender_hints.clear()  # rare; the next lookups refill it
                self._sender_hints[normalized] = user.id
        if not user.active:
            raise UserDisabledError()
        return user


def app_credential(name: str, record: Mapping[Any, Any]) -> tuple[App, str] | None:
    """The app and its stored hash from its hash's fields, if it has a credential."""
    if not record or "password" not in record:
        return None
    return (App(name, str(record.get("status", ACTIVE)), str(record.get("created_at", ""))),
            str(record["password"]))
