"""Per-user credentials for routes with ``credentials = "user"`` (the user's own Mailchimp
Transactional API key), encrypted at rest.

Secrets are sealed with Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``) under
``RELAY_CREDENTIALS_KEY``; Redis only ever holds ciphertext. The key can be rotated by
re-entering the credentials under a new key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from cryptography.fernet import Fernet, InvalidToken

from relay.config.dev_keys import dev_key
from relay.errors import CredentialsUnreadableError
from relay.store import keys
from relay.store.client import RedisClient, store_errors

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class RouteCredentials:
    username: str
    secret: str = field(repr=False)


def load_key(configured: str | None, state_dir: Path) -> bytes:
    """The Fernet key: the configured one, or (development) one kept in the state folder."""
    return dev_key(configured, state_dir / "credentials.key", Fernet.generate_key,
                   event="dev.credentials_key", setting="RELAY_CREDENTIALS_KEY")


class CredentialStore:
    """``key`` is the Fernet key, or a function giving it, called on first use (so that a
    command that never touches credentials never creates a development key file)."""

    def __init__(self, redis: RedisClient, key: bytes | Callable[[], bytes]) -> None:
        self._redis = redis
        self._key = key
        self._cipher: Fernet | None = None

    @property
    def _fernet(self) -> Fernet:
        if self._cipher is None:
            self._cipher = Fernet(self._key() if callable(self._key) else self._key)
        return self._cipher

    async def save(self, user_id: str, route: str, credentials: RouteCredentials) -> None:
        sealed = self._fernet.encrypt(credentials.secret.encode()).decode()
        with store_errors():
            await self._redis.hset(keys.route_credentials(user_id, route),
                                   mapping={"username": credentials.username,
                                            "secret": sealed})

    async def load(self, user_id: str, route: str) -> RouteCredentials | None:
        """The user's credentials for ``route``; None if they have none.

        Raises CredentialsUnreadableError, StoreUnavailableError.
        """
        with store_errors():
            record = await self._redis.hgetall(keys.route_credentials(user_id, route))
        if not record:
            return None
        try:
            secret = self._fernet.decrypt(str(record["secret"]).encode()).decode()
        except (InvalidToken, KeyError) as exc:
            log.error("credentials.unreadable", user_id=user_id, route=route)
            raise CredentialsUnreadableError() from exc
        return RouteCredentials(str(record.get("username", "")), secret)

    async def delete(self, user_id: str, route: str) -> bool:
        with store_errors():
            return bool(await self._redis.delete(keys.route_credentials(user_id, route)))
