"""A message's own identifier, its ``Message-ID`` (RFC 5322 §3.6.4), as idempotent
resubmission reads it (docs/resubmission.md).

Normalised minimally: the field is unfolded and the blanks around it stripped; the angle
brackets, the case and every other byte are kept as sent. Two submissions are the same
message only when their Message-IDs are byte for byte the same: an app that resubmits sends
the same bytes again, and a looser match would take two different messages for one.
"""

from __future__ import annotations

from relay.message.headers import header_length

_NAME = b"message-id"
# Blanks around the value, and the line ends of folding (RFC 5322 §2.2.3).
_BLANKS = b" \t\r\n"


def message_id(header: bytes) -> bytes | None:
    """The first ``Message-ID`` field of the header section ``header`` (content, not wire
    form), unfolded and stripped; None when there is none or it is empty."""
    head = header[:header_length(header)]
    if _NAME not in head.lower():
        return None
    value: bytes | None = None
    for line in head.splitlines():
        if value is not None:
            if line[:1] in (b" ", b"\t"):
                value += line.rstrip(_BLANKS)  # unfolding removes the line end only
                continue
            break
        name, colon, rest = line.partition(b":")
        if colon and name.rstrip(b" \t").lower() == _NAME:
            value = rest.strip(_BLANKS)
    value = (value or b"").strip(_BLANKS)
    return value or None
