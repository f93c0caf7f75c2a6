"""The only changes the relay makes to a message's bytes (STYLE §1 step 6).

The body and every header the sender wrote pass through unchanged, so a DKIM signature still
verifies. The relay adds one ``Received:`` trace header at the top (RFC 5321 §4.4) and removes
its own control headers (``X-KW-*``), which are instructions to the relay, not content. The
one other edit, the one-click unsubscribe headers an app's policy may have added, is in
``relay/message/unsubscribe.py`` (never a field a DKIM signature covers).
"""

from __future__ import annotations

import re
from datetime import datetime
from email.utils import format_datetime

CONTROL_HEADER_PREFIX = b"x-kw-"


def received_header(*, helo: str, peer_ip: str, hostname: str, protocol: str, txn_id: str,
                    now: datetime) -> bytes:
    """A ``Received:`` line. ``protocol`` is ESMTPSA/ESMTPA (RFC 3848) and so on."""
    # The HELO name is client input: keep it to printable ASCII without spaces or parentheses
    # so it cannot break the header's structure.
    safe_helo = re.sub(r"[^\x21-\x7e]|[()]", "?", helo)[:255] or "unknown"
    return (f"Received: from {safe_helo} ([{peer_ip}])\r\n"
            f"\tby {hostname} (Command Email Relay) with {protocol} id {txn_id};\r\n"
            f"\t{format_datetime(now)}\r\n").encode("ascii")


def strip_headers(content: bytes, prefixes: tuple[bytes, ...]) -> bytes:
    """``content`` without the header fields whose names start with one of ``prefixes``
    (lower case), folded continuation lines included.

    Only the header section is looked at; a message with nothing to strip is returned as
    the same object, untouched.
    """
    header_len = header_length(content)
    head = content[:header_len]
    lowered = head.lower()
    if not any(prefix in lowered for prefix in prefixes):
        return content
    kept: list[bytes] = []
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            # A continuation line belongs to the field above it (RFC 5322 §2.2.3).
            if not dropping:
                kept.append(line)
            continue
        dropping = line.lower().startswith(prefixes)
        if not dropping:
            kept.append(line)
    return b"".join(kept) + content[header_len:]


# What is stripped around a control header's name and value: the blanks of RFC 5322 (WSP)
# only. bytes.strip() also took VT and FF away, so "X-KW-Route: <VT>mailchimp" (or a VT after
# the name) reached the validation in relay.controls as a clean "mailchimp".
_WSP = b" \t"


def control_headers(content: bytes) -> dict[str, str]:
    """The X-KW-* fields of the header section: lower-case name without the prefix -> value
    (unfolded, SP and HTAB stripped, any other character kept for the caller to judge;
    undecodable bytes replaced). The first of a repeated field wins."""
    head = content[:header_length(content)]
    if CONTROL_HEADER_PREFIX not in head.lower():
        return {}
    fields: dict[str, str] = {}
    name: str | None = None
    for line in head.splitlines():
        if line[:1] in (b" ", b"\t"):
            if name is not None:  # unfold (RFC 5322 §2.2.3); "X-KW-Route:" CRLF " v" is "v"
                fields[name] = (fields[name] + " "
                                + line.strip(_WSP).decode("utf-8", "replace")).strip(" ")
            continue
        name = None
        if line.lower().startswith(CONTROL_HEADER_PREFIX) and b":" in line:
            raw_name, _, value = line.partition(b":")
            key = raw_name[len(CONTROL_HEADER_PREFIX):].strip(_WSP).lower().decode(
                "ascii", "replace")
            if key not in fields:
                fields[key] = value.strip(_WSP).decode("utf-8", "replace")
                name = key
    return fields


def header_length(content: bytes | bytearray) -> int:
    """Bytes up to and including the line ending of the last header line.

    The header ends at the first empty line, CRLF or bare LF (RFC 5322 §2.1); searching for
    one kind first would let a later blank line of that kind pull body lines into the header.
    """
    if content.startswith((b"\r\n", b"\n")):
        return 0  # no header section at all
    # "\n\r\n" and "\n\n": a line ending followed by an empty line (CRLF or LF). The bare-LF
    # form is looked for only before the CRLF one, so a CRLF message's body is not scanned.
    crlf = content.find(b"\n\r\n")
    lf = content.find(b"\n\n", 0, crlf if crlf >= 0 else len(content))
    ends = [found + 1 for found in (crlf, lf) if found >= 0]
    return min(ends) if ends else len(content)
