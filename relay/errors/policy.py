"""Refusals the relay's own policies decide: a sender it does not serve, a disabled user or
an unconfigured plan, a routing rule that refuses, the monthly limit (its reply chosen
in policies/plans.toml), and an app's one-click unsubscribe policy (routing.toml)."""

from __future__ import annotations

from dataclasses import dataclass

from relay.errors.base import PermanentError, RelayError, TemporaryError


class SenderNotAllowedError(PermanentError):
    code = 553
    status = "5.7.1"
    text = "Sender address not allowed for this login"


class UnknownSenderError(PermanentError):
    code = 550
    status = "5.7.1"
    text = "Sender address does not belong to any Command Email user"


class UserDisabledError(PermanentError):
    code = 550
    status = "5.7.1"
    text = "Command Email is disabled for this user"


class PlanMisconfiguredError(TemporaryError):
    code = 451
    status = "4.3.5"
    text = "Sending plan not configured for this user, try again later"


class RouteRefusedError(PermanentError):
    # A routing rule (policies/routing.toml) refuses the message; the rule's own text, when
    # it has one, replaces the default.
    code = 550
    status = "5.7.1"
    text = "Refused by routing policy"


@dataclass(frozen=True, slots=True)
class OverLimitReply:
    """The over-limit reply chosen in policies/plans.toml; text is a str.format template."""

    code: int
    status: str
    text: str

    def as_permanent(self) -> OverLimitReply:
        """This reply, or the same text as a permanent refusal (550 5.7.1) when it is a 4xx:
        for an app that must never retry a refused email (it moves on instead)."""
        if self.code >= 500:
            return self
        return OverLimitReply(550, "5.7.1", self.text)


class QuotaExceededError(RelayError):
    """A recipient would take the user past the monthly limit."""

    def __init__(self, reply: OverLimitReply, *, used: int, limit: int, resets_on: str) -> None:
        self.used = used
        self.limit = limit
        super().__init__(
            reply.text.format(used=used, limit=limit, resets_on=resets_on),
            code=reply.code, status=reply.status,
        )


class UnsubscribeHeadersMissingError(PermanentError):
    """The app's policy (``unsubscribe = "refuses"`` in routing.toml) requires the one-click
    unsubscribe headers of RFC 8058, and the message lacks ``missing`` (header names)."""

    # RFC 3463 X.6.0: something about the content of the message makes it undeliverable.
    code = 550
    status = "5.6.0"
    text = "One-click unsubscribe required (RFC 8058): message lacks List-Unsubscribe"

    def __init__(self, missing: tuple[str, ...] = ("List-Unsubscribe",)) -> None:
        self.missing = missing
        named = " and ".join(_DESCRIBED.get(name, name) for name in missing)
        super().__init__(f"One-click unsubscribe required (RFC 8058): message lacks {named}")


# How a refusal names each header: the exact field a message must carry.
_DESCRIBED = {"List-Unsubscribe": "List-Unsubscribe (with an https URI)",
              "List-Unsubscribe-Post": "List-Unsubscribe-Post: List-Unsubscribe=One-Click"}

