"""Every Redis key name the relay uses (STYLE §3, §6). No other module builds a key.

Per-user keys carry the user id in one hash tag, ``{u-…}``, so all keys one Lua script touches
live in one Redis Cluster slot. Index keys (sender -> user, login -> app) are single-key
lookups and need no tag.
"""

from __future__ import annotations

PREFIX = "relay"


def user(user_id: str) -> str:
    """Hash: email, plan, limit (custom, optional), tz, status, password, created_at."""
    return f"{PREFIX}:user:{{{user_id}}}"


def user_senders(user_id: str) -> str:
    """Set of sender addresses (lower case) the user owns."""
    return f"{PREFIX}:senders:{{{user_id}}}"


def usage(user_id: str, period: str) -> str:
    """Hash for one user and calendar month (YYYY-MM): used (reserved + delivered), delivered."""
    return f"{PREFIX}:usage:{{{user_id}}}:{period}"


def reservations(user_id: str, txn_id: str) -> str:
    """Hash of one transaction's open reservations: recipient number -> 1."""
    return f"{PREFIX}:resv:{{{user_id}}}:{txn_id}"


def sender_index(address: str) -> str:
    """String: the id of the user who owns this sender address (lower case)."""
    return f"{PREFIX}:sender:{address.lower()}"


def users_index() -> str:
    """Set of all user ids (admin listing only, never on the SMTP path)."""
    return f"{PREFIX}:users"


def app(name: str) -> str:
    """Hash: name, password, status, created_at of an application credential."""
    return f"{PREFIX}:app:{name}"


def apps_index() -> str:
    """Set of all application names."""
    return f"{PREFIX}:apps"
