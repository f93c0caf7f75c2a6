"""The relay's control headers (``X-KW-*``): instructions from the apps, read at the end of
DATA and stripped before forwarding.

Each value is validated; a bad one (a control character anywhere in it included) is ignored
and reported (the caller logs it), never an error for the message: a typo in a tracking id
must not stop an email.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from relay.message.headers import control_headers

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
# Matched as written, then lower-cased: the pattern being ASCII, so is the lower-casing
# (str.lower() first made "mailchimp\u212a", with KELVIN SIGN, the valid "mailchimpk").
_ROUTE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
# A C0 control character or DEL anywhere in a value makes it invalid as a whole: a value is
# never cleaned into a valid one (a VT before "mailchimp", taken off as a blank, chose the
# mailchimp route).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# ASCII digits only: str.isdigit() also holds for "²", which int() then refuses.
_STEP = re.compile(r"^[0-9]{1,6}$")
KNOWN = ("app", "smartplan-id", "smartplan-step", "contact-id", "campaign-id", "route")


@dataclass(frozen=True, slots=True)
class Controls:
    app: str | None = None
    smartplan_id: str | None = None
    smartplan_step: int | None = None
    contact_id: str | None = None
    campaign_id: str | None = None
    route: str = ""  # "" when absent
    problems: tuple[str, ...] = field(default=())

    def ids(self) -> dict[str, str | int]:
        """The tracking ids present, for events and logs."""
        found = {"smartplan_id": self.smartplan_id, "smartplan_step": self.smartplan_step,
                 "contact_id": self.contact_id, "campaign_id": self.campaign_id}
        return {k: v for k, v in found.items() if v is not None}


def read_controls(content: bytes) -> Controls:
    """Parse and validate the X-KW-* header fields of ``content``."""
    fields = control_headers(content)
    problems: list[str] = []
    values: dict[str, object] = {}
    for name, value in fields.items():
        if name not in KNOWN:
            problems.append(f"unknown header X-KW-{name}")
            continue
        typed = _typed(name, value)
        if typed is None:
            problems.append(f"invalid X-KW-{name}")
        else:
            values[name.replace("-", "_")] = typed
    return Controls(**values, problems=tuple(problems))  # type: ignore[arg-type]


def _typed(name: str, value: str) -> str | int | None:
    """The value of the known control header ``name``, typed, or None when it is invalid."""
    if _CONTROL.search(value):
        return None
    if name == "smartplan-step":
        return int(value) if _STEP.match(value) else None
    if name == "route":
        return value.lower() if _ROUTE.match(value) else None
    return value if _ID.match(value) else None
