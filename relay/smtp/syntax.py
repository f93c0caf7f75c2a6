"""What the relay accepts in a command line and in an envelope path, before aiosmtpd parses it
(STYLE §1 step 1).

aiosmtpd decodes a command's argument as UTF-8 with ``surrogateescape`` and hands it on, so
invalid bytes travelled into handlers, the logs (orjson refuses lone surrogates: the line
raised and the client got ``451 4.3.0``) and Redis. Its path parser (the email package's)
also *changes* what it was given: it drops a bare CR (``<a@b\\rc.example>`` became
``a@bc.example``), comments and source routes. The rules here:

- a command argument with bytes that are not UTF-8 is a syntax error (500 5.5.2);
- a C0 control character or DEL anywhere in a command argument is a syntax error (501 5.5.2);
- a path in angle brackets is acknowledged only if the parsed address is exactly the text
  between the brackets, so the address forwarded is the address the client was told 250 for.

Pure functions: no I/O, tested with plain tables.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from relay.errors import (
    AddressSyntaxError,
    CommandSyntaxError,
    ControlCharacterError,
    InvalidUtf8Error,
)
from relay.message.paths import SIMPLE_PATH

# surrogateescape maps each undecodable byte to U+DC80..U+DCFF.
_SURROGATE = re.compile("[\udc80-\udcff]")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_CONTROL_BYTES = re.compile(b"[\x00-\x1f\x7f]")
# The common shape of a MAIL FROM / RCPT TO argument, <dot-atom@hostname> and parameters
# (relay/message/paths.py): for it, aiosmtpd's parser (email._header_value_parser, a class
# created per call) gives the address unchanged; anything else still goes through that parser.

Parser = Callable[[str], tuple[str | None, str | None]]


def command_problem(command: str, arg: str | None,
                    line: bytes | None = None) -> CommandSyntaxError | None:
    """The refusal for a command the relay will not interpret, or None.

    ``line`` is the command line as read, terminator included: aiosmtpd strips the blanks
    around the argument, VT and FF among them (and any run of CR before the LF), so only
    the raw line shows a control character there.
    """
    if arg and _SURROGATE.search(arg):
        return InvalidUtf8Error(command)
    if line is not None:
        body = line[:-2] if line.endswith(b"\r\n") else line.removesuffix(b"\n")
        if _CONTROL_BYTES.search(body):
            return ControlCharacterError(command)
    elif arg and _CONTROL.search(arg):
        return ControlCharacterError(command)
    return None


def parse_path(arg: str, role: str, *, local_part_limit: int,
               full_parser: Parser) -> tuple[str | None, str | None]:
    """``(address, rest)`` as aiosmtpd's ``_getaddr`` returns it (None, None: unparsable),
    through the fast expression when it fits, else ``full_parser``.

    Raises AddressSyntaxError (``role``: "sender" or "recipient") when the parser would
    return an address other than the one written between the angle brackets.
    """
    simple = SIMPLE_PATH.match(arg)
    # The parser also eats the blanks after ">" (CFWS); a comment there goes to it.
    rest = arg[simple.end():].lstrip(" \t") if simple else ""
    if simple is not None and not rest.startswith("(") and not (
            local_part_limit and len(simple.group(1).rpartition("@")[0]) > local_part_limit):
        return simple.group(1), rest
    address, rest_parsed = full_parser(arg)
    # aiosmtpd gives the null reverse-path as "<>" and an empty argument as "".
    if address not in (None, "", "<>"):
        if not _has_domain(address):
            # RFC 5321 §4.1.2: a mailbox is local-part "@" domain. A bare local part (or a
            # bang path) would be delivered wherever the upstream decides; an authenticated
            # submission relay has no local mailboxes (not even Postmaster) to offer.
            raise AddressSyntaxError(role)
        text = arg.lstrip()
        written = _bracketed(text) if text.startswith("<") else text.split(None, 1)[0]
        if address != written:
            raise AddressSyntaxError(role)
    return address, rest_parsed


def _has_domain(address: str) -> bool:
    """Whether ``address`` is local-part "@" domain, with both parts (an "@" inside a quoted
    local part does not count)."""
    if address.startswith('"'):
        closing = _closing_quote(address)
        if closing is None:
            return False
        local, rest = address[:closing + 1], address[closing + 1:]
        return rest.startswith("@") and len(rest) > 1 and len(local) > 2
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain)


def _closing_quote(text: str) -> int | None:
    """The index of the quote that closes the one ``text`` starts with."""
    escaped = False
    for index, char in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return index
    return None


def _bracketed(arg: str) -> str | None:
    """The text between the opening "<" and its ">" (a ">" inside a quoted local part does not
    close it), or None when there is no closing bracket."""
    quoted = escaped = False
    for index, char in enumerate(arg[1:], start=1):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return arg[1:index]
    return None
