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
    """Set of sender addresses (normalised: A-Z lower-cased) the user owns."""
    return f"{PREFIX}:senders:{{{user_id}}}"


def usage(user_id: str, period: str) -> str:
    """Hash for one user and calendar month (YYYY-MM): used (reserved + delivered), delivered."""
    return f"{PREFIX}:usage:{{{user_id}}}:{period}"


def reservations(user_id: str, txn_id: str) -> str:
    """Hash of one transaction's open reservations: recipient number -> 1."""
    return f"{PREFIX}:resv:{{{user_id}}}:{txn_id}"


def sender_index(address: str) -> str:
    """String: the id of the user who owns this sender address, as
    ``accounts.normalize_address`` gives it (A-Z lower-cased). Not folded again here: a
    second, wider folding (str.lower()) would map a non-ASCII look-alike onto an ASCII key."""
    return f"{PREFIX}:sender:{address}"


def users_index() -> str:
    """Set of all user ids (admin listing only, never on the SMTP path)."""
    return f"{PREFIX}:users"


def app(name: str) -> str:
    """Hash: name, password, status, created_at of an application credential."""
    return f"{PREFIX}:app:{name}"


def apps_index() -> str:
    """Set of all application names."""
    return f"{PREFIX}:apps"


def audit(user_id: str) -> str:
    """Stream: the user's append-only plan-change audit trail (never trimmed)."""
    return f"{PREFIX}:audit:{{{user_id}}}"


def events() -> str:
    """Stream: every event for the notifier (threshold, reached, rejected, plan changed…)."""
    return f"{PREFIX}:events"


def dead_letters() -> str:
    """Stream: events a channel could not deliver after its last retry."""
    return f"{PREFIX}:events:dead"


def notified(event_id: str) -> str:
    """Set of channels that already delivered one event (so a retry skips them)."""
    return f"{PREFIX}:notified:{event_id}"


def attempts(event_id: str) -> str:
    """Hash: channel -> failed delivery attempts of one event."""
    return f"{PREFIX}:attempts:{event_id}"


def route_credentials(user_id: str, route: str) -> str:
    """Hash: username, secret (Fernet ciphertext) of the user's own credentials for a route."""
    return f"{PREFIX}:cred:{{{user_id}}}:{route}"


def auth_failures_client(client: str) -> str:
    """String counter with a TTL: failed AUTH attempts from one client address (an IPv6
    client by its /64) in the current throttling window."""
    return f"{PREFIX}:authfail:ip:{{{client}}}"


def auth_failures_login(digest: str) -> str:
    """String counter with a TTL: failed AUTH attempts for one login (a digest of the
    lower-cased login, so any bytes a client sends make a short, safe key)."""
    return f"{PREFIX}:authfail:login:{{{digest}}}"


def suppressions(user_id: str) -> str:
    """Hash of the recipients one user must not send to (a contact unsubscribed from that
    agent): normalised address -> ``reason<TAB>source<TAB>unix seconds``. In the user's slot,
    so reserve.lua reads it in the same step as the quota."""
    return f"{PREFIX}:supp:{{{user_id}}}"


def global_suppressions() -> str:
    """Hash of the recipients nobody at the brokerage may send to (a hard bounce, a spam
    complaint): normalised address -> ``reason<TAB>source<TAB>unix seconds``. One key in one
    Cluster slot, read with single-key commands only."""
    return f"{PREFIX}:supp:global"


def dedup(user_id: str, digest: str) -> str:
    """Hash of one message's recipients, for idempotent resubmission: normalised recipient ->
    its state (relay/decisions/lua/claims.lua). ``digest``: the SHA-256 of the message's
    Message-ID, hex. In the user's slot, so commit.lua marks the recipients accepted in the
    same step as the quota; expires after ``RELAY_DEDUP_WINDOW``."""
    return f"{PREFIX}:dedup:{{{user_id}}}:{digest}"


def shadow_counts(day: str) -> str:
    """Hash of one UTC day (YYYY-MM-DD) of the shadow trial's differences:
    ``kind:<kind>`` and ``app:<app>:<kind>`` -> count (``command-relay shadow report``).
    Both of a day's keys share the day's hash tag: one pipeline, one Cluster slot."""
    return f"{PREFIX}:shadow:{{{day}}}:counts"


def shadow_examples(day: str, kind: str) -> str:
    """List of the latest differences of one kind on one UTC day, JSON, newest first."""
    return f"{PREFIX}:shadow:{{{day}}}:examples:{kind}"
