"""A message in SMTP wire form, held once (no second copy of the body).

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

from relay.message.headers import header_length, strip_headers

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
    """One received message in wire form: the pieces it was read in (dot-stuffed, CRLF line
    ends, no terminator), never joined. ``clean`` is ``is_clean_wire`` of the whole, which
    the reader works out as it goes (``relay.smtpdata``)."""

    __slots__ = ("chunks", "clean", "size")

    def __init__(self, chunks: list[bytes], *, clean: bool | None = None) -> None:
        self.chunks = chunks
        self.size = sum(map(len, chunks))
        self.clean = is_clean_wire(b"".join(chunks)) if clean is None else clean

    def __len__(self) -> int:
        return self.size

    def _header(self) -> tuple[bytes, int]:
        """The leading bytes that hold the whole header section, and its length. Usually
        the first piece alone; pieces are joined only until the blank line is in them."""
        count = 1
        while True:
            joined = self.chunks[0] if count == 1 else b"".join(self.chunks[:count])
            end = header_length(joined)
            if end < len(joined) or count >= len(self.chunks):
                return joined, end
            count *= 2  # doubling: a header without an end costs one more copy, not n

    def header_content(self) -> bytes:
        """The header section as content (un-stuffed), for reading control headers."""
        if not self.chunks:
            return b""
        joined, end = self._header()
        return unstuff(joined[:end])

    def content(self) -> bytes:
        """The whole message as content (a copy: for the capture folder and tests)."""
        return unstuff(b"".join(self.chunks))

    def outgoing(self, trace: bytes, strip: tuple[bytes, ...]) -> Outgoing:
        """What goes upstream: ``trace`` on top, header fields starting with ``strip``
        removed, in wire form. When the client's wire form is already right, that is the
        received pieces themselves."""
        if not self.clean:
            # Rare: re-derive the wire form from the content, exactly as before.
            return Outgoing((stuff(trace + strip_headers(self.content(), strip)),))
        if not self.chunks:
            return Outgoing((trace,))
        joined, end = self._header()
        head = joined[:end]
        if not any(prefix in head.lower() for prefix in strip):
            return Outgoing((trace, *self.chunks))
        kept = stuff(strip_headers(unstuff(head), strip))
        rest: list[bytes | memoryview] = []
        offset = 0
        for chunk in self.chunks:
            if offset + len(chunk) > end:
                rest.append(chunk if offset >= end else memoryview(chunk)[end - offset:])
            offset += len(chunk)
        return Outgoing((trace, kept, *rest))


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message for the upstream: buffers that, written in order, are its DATA in wire form
    (without the terminator). The received pieces (or views of them), not copies."""

    chunks: tuple[bytes | memoryview, ...]

    def __len__(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    def content(self) -> bytes:
        """The message as content (a copy: for the capture folder)."""
        return unstuff(b"".join(self.chunks))
