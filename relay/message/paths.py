"""The common shape of a mailbox on an SMTP command line: ``dot-atom@hostname`` (RFC 5321
§4.1.2 without quoted local parts, address literals or source routes).

Both ends of the relay take a short cut for it. The SMTP server reads ``<local@domain>``
with one regular expression instead of aiosmtpd's parser (relay/smtp/syntax.py); the
upstream client writes MAIL FROM and RCPT TO for it itself instead of through aiosmtplib's
``quote_address``, which runs ``email.utils.parseaddr`` on every address (relay/delivery/
pool.py). Anything else takes the full parsers at both ends.
"""

from __future__ import annotations

import re

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
DOT_ATOM_ADDRESS = rf"{_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*"
# ``<address>`` at the start of a MAIL FROM / RCPT TO argument (group 1: the address).
SIMPLE_PATH = re.compile(rf"<({DOT_ATOM_ADDRESS})>")
_SIMPLE_ADDRESS = re.compile(DOT_ATOM_ADDRESS)


def is_simple_address(address: str) -> bool:
    """Whether ``address`` is exactly ``dot-atom@hostname`` (ASCII, nothing around it)."""
    return _SIMPLE_ADDRESS.fullmatch(address) is not None
