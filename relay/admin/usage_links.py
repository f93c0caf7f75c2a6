"""Links to the agent's usage page (relay/admin/usage_page.py): signed with the link secret
(purpose "usage"), naming one user, expiring after a lifetime the caller chooses within
bounds. Made by ``command-relay usage link`` and ``POST /v1/users/{user}/usage-link``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from relay.identity.signed_links import LinkSigner

PURPOSE = "usage"
# The CRM fetches a fresh link whenever it opens the panel; a day covers a panel left open.
DEFAULT_TTL_SECONDS = 24 * 3600
MAX_TTL_SECONDS = 31 * 24 * 3600


class LinkLifetimeError(ValueError):
    """A lifetime that is not a duration, or out of bounds."""


def usage_link(signer: LinkSigner, public_url: str, user_id: str, *,
               ttl: float = DEFAULT_TTL_SECONDS, now: float | None = None) -> str:
    """The URL of ``user_id``'s page, valid for ``ttl`` seconds."""
    if not 0 < ttl <= MAX_TTL_SECONDS:
        raise LinkLifetimeError(f"a usage link lives from 1 second to "
                                f"{MAX_TTL_SECONDS // 86400} days, not {ttl:g} seconds")
    token = signer.sign(PURPOSE, {"u": user_id}, ttl=ttl, now=now)
    return f"{public_url.rstrip('/')}/usage/{token}"


@dataclass(frozen=True, slots=True)
class UsageLinks:
    """What makes the links to the page: the link secret's signer and the public URL."""

    signer: LinkSigner
    public_url: str

    def make(self, user_id: str, ttl: float, now: float) -> dict[str, Any]:
        """The link and when it expires (ISO-8601 UTC)."""
        return {"url": usage_link(self.signer, self.public_url, user_id, ttl=ttl, now=now),
                "expires_at": datetime.fromtimestamp(int(now + ttl), UTC).isoformat()}


_DURATION = re.compile(r"([0-9]{1,9})([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """``90``, ``90s``, ``30m``, ``12h`` or ``7d`` as seconds; LinkLifetimeError otherwise."""
    # fullmatch: no blank, no trailing newline (what the API document's pattern allows).
    found = _DURATION.fullmatch(text)
    if not found:
        raise LinkLifetimeError(f"a link lifetime looks like 3600, 90s, 30m, 12h or 7d, "
                                f"not {text!r}")
    return int(found.group(1)) * _UNIT_SECONDS[found.group(2)]
