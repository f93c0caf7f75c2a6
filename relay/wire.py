"""A message in SMTP wire form, held once (issue 5: no second copy of the body).

The relay keeps a message's DATA exactly as the client sent it: dot-stuffed, CRLF line ends,
without the terminating ``.\\r\\n`` (RFC 5321 §4.5.2). That is already the form the upstream
needs, so in the common case the body goes upstream as a view of the received bytes, with no
un-stuffing, re-stuffing or line-ending conversion in between.

The bytes the upstream receives are exactly what the former path produced (aiosmtpd's
un-stuffing, then aiosmtplib's line-ending normalisation and dot-stuffing); where a message
would come out differently in wire form (a bare CR or LF, a line that starts with a single
dot the client failed to double), ``Outgoing`` takes that same slow path instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.message import header_length, strip_headers

# What aiosmtplib does to a message in DATA (protocol.py): every CRLF, bare LF or bare CR
# becomes CRLF, then a dot is added in front of every line that starts with one.
_LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LINE_START_DOT = re.compile(rb"(?m)^\.")


def unstuff(raw: bytes | bytearray) -> bytes:
    """The content of dot-stuffed ``raw``: the first dot of every line that starts with one
    removed (RFC 5321 §4.5.2), line ends left as they are."""
    content = bytes(raw).replace(b"\r\n.", b"\r\n")
    return content[1:] if content.startswith(b".") else content


def stuff(content: bytes) -> bytes:
    """``content`` in wire form, as aiosmtplib would send it: line ends normalised to CRLF,
    a final CRLF, and leading dots doubled."""
    content = _LINE_ENDS.sub(b"\r\n", content)
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    return _LINE_START_DOT.sub(b"..", content)


def is_clean_wire(raw: bytes | bytearray) -> bool:
    """True when ``stuff(unstuff(raw)) == raw``: every line ends in CRLF (no bare CR or LF)
    and every line that starts with a dot starts with two (the client stuffed correctly)."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf:
        return False
    if raw and not raw.endswith(b"\r\n"):
        return False
    if raw.startswith(b".") and not raw.startswith(b".."):
        return False
    return raw.count(b"\r\n.") == raw.count(b"\r\n..")


class WireMessage:
    """One received message, in wire form (``raw``: dot-stuffed, no terminator)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes | bytearray) -> None:
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw)

    def header_content(self) -> bytes:
        """The header section as content (un-stuffed), for reading control headers."""
        return unstuff(self.raw[:header_length(self.raw)])

    def content(self) -> bytes:
        """The whole message as content (a copy: for the capture folder and tests)."""
        return unstuff(self.raw)

    def outgoing(self, trace: bytes, strip: tuple[bytes, ...]) -> Outgoing:
        """What goes upstream: ``trace`` on top, header fields starting with ``strip``
        removed, in wire form."""
        raw = self.raw
        if not is_clean_wire(raw):
            # Rare: re-derive the wire form from the content, exactly as before.
            return Outgoing((stuff(trace + strip_headers(unstuff(raw), strip)),))
        end = header_length(raw)
        head = bytes(raw[:end])
        if not any(prefix in head.lower() for prefix in strip):
            return Outgoing((trace, memoryview(raw)))
        kept = stuff(strip_headers(unstuff(head), strip))
        return Outgoing((trace, kept, memoryview(raw)[end:]))


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message for the upstream: buffers that, written in order, are its DATA in wire form
    (without the terminator). Views into the received bytes, not copies of them."""

    chunks: tuple[bytes | memoryview, ...]

    def __len__(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    def content(self) -> bytes:
        """The message as content (a copy: for the capture folder)."""
        return unstuff(b"".join(self.chunks))
