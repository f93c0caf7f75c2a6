"""The refusal of a recipient on the suppression list (relay/decisions/suppression.py): the
user's own list (scope "user": a contact who unsubscribed from that agent) or the
brokerage's (scope "global": a hard bounce, a spam complaint). The reply names the entry's
reason, so the application and a person reading its log know why (docs/suppression.md)."""

from __future__ import annotations

from typing import Any

import structlog

from relay.errors.base import PermanentError, RefusalCounter, RefusalLevel


class RecipientSuppressedError(PermanentError):
    """Permanent: sending again is what the list forbids. ``suppression`` is the entry's
    reason (unsubscribe, complaint, bounce, manual), ``scope`` "user" or "global"."""

    # RFC 3463 X.7.1: delivery not authorized, message refused.
    code = 550
    status = "5.7.1"
    text = "Recipient is on this sender's suppression list"

    def __init__(self, suppression: str = "manual", scope: str = "user") -> None:
        self.suppression = suppression
        self.scope = scope
        super().__init__(_TEXTS.get((suppression, scope)) or _TEXTS.get((suppression, ""))
                         or type(self).text)

    def log_refusal(self, log: structlog.typing.FilteringBoundLogger, event: str,
                    counter: RefusalCounter | None = None, *, level: RefusalLevel = "info",
                    **fields: Any) -> None:
        """As every refusal, with the entry's reason and scope (fields ``suppression`` and
        ``scope``)."""
        super().log_refusal(log, event, counter, level=level, suppression=self.suppression,
                            scope=self.scope, **fields)


# What the reply says, by (reason, scope); "" is either scope.
_TEXTS = {
    ("unsubscribe", "user"): "Recipient has unsubscribed from this sender",
    ("unsubscribe", "global"): "Recipient has unsubscribed from all mail sent through this "
                               "relay",
    ("complaint", ""): "Recipient has reported earlier mail as spam",
    ("bounce", ""): "Recipient address bounced permanently before",
    ("manual", "user"): "Recipient is on this sender's suppression list",
    ("manual", "global"): "Recipient is on the suppression list",
}
