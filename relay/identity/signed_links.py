"""Signed, optionally expiring tokens for links the relay hands out: the one-click unsubscribe
URL of a recipient (RFC 8058), the agent's usage page.

A token is ``<body>.<tag>``: the body is the payload (a small JSON object) in url-safe base64,
the tag an HMAC-SHA256 over the purpose and the body under ``RELAY_LINK_SECRET``. The purpose
is part of what is signed, so a token made for one kind of link never opens another. The
expiry, when there is one, is inside the signed payload (``exp``, Unix seconds), so it cannot
be moved without breaking the tag. Nothing here is secret in the token itself: it names a user
and a recipient, it does not hide them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from pathlib import Path
from typing import Any

import orjson

from relay.config.dev_keys import dev_key

# 128 bits of tag: url-short, far beyond guessing.
_TAG_BYTES = 16


class SignedLinkError(Exception):
    """A token that does not open its link. ``reason`` is for the log line, never a secret."""

    reason = "invalid"


class LinkInvalidError(SignedLinkError):
    """Malformed, altered, or made for another purpose or under another secret."""

    reason = "invalid"


class LinkExpiredError(SignedLinkError):
    """Well signed, but past its expiry."""

    reason = "expired"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LinkSigner:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("a link secret needs at least 16 bytes")
        self._secret = secret

    def _tag(self, purpose: str, body: str) -> str:
        mac = hmac.new(self._secret, f"{purpose}.{body}".encode(), hashlib.sha256)
        return _b64(mac.digest()[:_TAG_BYTES])

    def sign(self, purpose: str, payload: dict[str, Any], *, ttl: float | None = None,
             now: float | None = None) -> str:
        """A token carrying ``payload`` for ``purpose``; it expires ``ttl`` seconds from now
        when given, else never (an unsubscribe link must work for as long as the mail is
        read)."""
        data = dict(payload)
        if ttl is not None:
            data["exp"] = int((time.time() if now is None else now) + ttl)
        body = _b64(orjson.dumps(data, option=orjson.OPT_SORT_KEYS))
        return f"{body}.{self._tag(purpose, body)}"

    def verify(self, purpose: str, token: str, *, now: float | None = None) -> dict[str, Any]:
        """The payload of a token made by ``sign`` for ``purpose``; LinkInvalidError or
        LinkExpiredError otherwise. The tag is compared in constant time before the body is
        parsed, so nothing an attacker made is ever decoded."""
        body, dot, tag = token.partition(".")
        if not dot or not body or not tag or len(token) > 4096:
            raise LinkInvalidError()
        if not hmac.compare_digest(tag.encode(), self._tag(purpose, body).encode()):
            raise LinkInvalidError()
        try:
            data = orjson.loads(_unb64(body))
        except (ValueError, binascii.Error, orjson.JSONDecodeError):
            raise LinkInvalidError() from None
        if not isinstance(data, dict):
            raise LinkInvalidError()
        expires = data.pop("exp", None)
        if expires is not None and (time.time() if now is None else now) >= expires:
            raise LinkExpiredError()
        return data


def load_link_secret(configured: str | None, state_dir: Path) -> bytes:
    """The link secret: the configured one, or (development) one kept in the state folder."""
    return dev_key(configured, state_dir / "link.key", lambda: secrets.token_urlsafe(32).encode(),
                   event="dev.link_secret", setting="RELAY_LINK_SECRET")
