"""DATA: the command (``DataMixin``, part of ``RelaySMTP``) and its bulk reader.

aiosmtpd reads DATA one line at a time in Python (a ``readuntil`` and a debug log call per
line, then a list of lines joined and un-stuffed): at 100 KB that was most of the relay's CPU.
This reader asks the stream for everything up to the next ``.\\r\\n`` at once, so a message
costs a few calls per network read instead of a few per line, and keeps the body in wire form
(``relay/message/wire.py``) as the list of pieces it was read in: never joined, never copied again.

It keeps aiosmtpd's rules (1.4.6, after the SMTP-smuggling fix):
- only ``.`` alone on a line ends the data, and a line ends only with CRLF: ``\\n.\\n``,
  ``\\r.\\r`` and ``\\n.\\r\\n`` are content, never an end;
- a line longer than ``line_limit`` bytes (CRLF included) answers 500, more than
  ``size_limit`` bytes of data answers 552, in both cases only after the terminator has been
  read (RFC 5321 §4.2.5), with the data discarded as soon as the limit is passed.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

from aiosmtpd.smtp import MISSING

from relay import errors
from relay.message.wire import WireMessage
from relay.smtp.connection import ConnectionBase
from relay.smtp.session import RelayEnvelope

_DOT_LINE = b".\r\n"


class DataProblem(enum.Enum):
    LINE_TOO_LONG = "line_too_long"
    TOO_MUCH = "too_much"


@dataclass(slots=True)
class DataRead:
    chunks: list[bytes]  # dot-stuffed, CRLF line ends, without the terminating ".\r\n"
    size: int  # bytes received before the terminator (what the size limit counts)
    problem: DataProblem | None
    clean: bool  # relay.message.wire.is_clean_wire of the joined chunks


class _WireShape:
    """``relay.message.wire.is_clean_wire`` of everything fed, decided piece by piece: the counts of
    CR, LF, CRLF, CRLF "." and CRLF ".." over the whole, exactly, also where a pattern
    straddles two pieces (counted in a window of the junction)."""

    __slots__ = ("cr", "crlf", "dot", "dotdot", "head", "lf", "tail")

    def __init__(self) -> None:
        self.cr = self.lf = self.crlf = self.dot = self.dotdot = 0
        self.tail = b""  # the last three bytes so far
        self.head = b""  # the first two bytes

    def feed(self, chunk: bytes) -> None:
        tail = self.tail
        self.cr += chunk.count(b"\r")
        self.lf += chunk.count(b"\n")
        # An occurrence that ends in this piece but starts before it lies in the window of
        # the previous (length - 1) bytes and this piece's first (length - 1) bytes.
        self.crlf += chunk.count(b"\r\n") + (tail[-1:] + chunk[:1]).count(b"\r\n")
        if b"." in chunk:
            # Both patterns end in a dot: a piece without one (memchr, nearly free) adds
            # nothing to either count, so base64 parts skip two full scans.
            self.dot += chunk.count(b"\r\n.") + (tail[-2:] + chunk[:2]).count(b"\r\n.")
            self.dotdot += (chunk.count(b"\r\n..")
                            + (tail[-3:] + chunk[:3]).count(b"\r\n.."))
        if len(self.head) < 2:
            self.head = (self.head + chunk[:2])[:2]
        self.tail = chunk[-3:] if len(chunk) >= 3 else (tail + chunk)[-3:]

    @property
    def clean(self) -> bool:
        if not (self.cr == self.lf == self.crlf and self.dot == self.dotdot):
            return False
        if self.head and not self.tail.endswith(b"\r\n"):
            return False
        return not (self.head.startswith(b".") and self.head != b"..")


class _LineMeter:
    """Tracks the longest CRLF-terminated line across chunks, with bytes operations: exact
    at the pieces' ends, a proof by windows in between (falling back to an exact split)."""

    __slots__ = ("current", "limit", "pending_cr", "too_long")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.current = 0  # bytes of the unfinished line so far
        self.pending_cr = False  # the last chunk ended with "\r" (maybe half a CRLF)
        self.too_long = False

    def feed(self, chunk: bytes) -> None:
        if self.pending_cr and chunk.startswith(b"\n"):
            # A CRLF split across two reads: the "\r" is counted already, add the "\n".
            if self.current + 1 > self.limit:
                self.too_long = True
            self.current = -1  # the "\n" opens the next line's count below
        first = chunk.find(b"\r\n")
        if first < 0:
            self.current += len(chunk)
        else:
            if self.current + first + 2 > self.limit:
                self.too_long = True
            last = chunk.rfind(b"\r\n")
            if last > first and not self._short_lines(chunk, first + 2, last + 2):
                # Some stretch has no CRLF: measure the lines between exactly.
                longest = max(map(len, chunk[first + 2:last].split(b"\r\n"))) + 2
                if longest > self.limit:
                    self.too_long = True
            self.current = len(chunk) - last - 2
        if self.current > self.limit:
            self.too_long = True
        self.pending_cr = chunk.endswith(b"\r")

    def _short_lines(self, chunk: bytes, start: int, end: int) -> bool:
        """True when every line in ``chunk[start:end]`` (which ends with a CRLF) is provably
        within the limit: each window of limit // 2 bytes holds a CRLF, so no two CRLFs
        are further apart than the limit. A few ``find`` calls per KB instead of a split
        into a list of every line; False sends the caller to the exact measure."""
        width = self.limit // 2
        if width < 2:
            return False  # no window can hold a CRLF: measure exactly
        at = start
        while at < end - 2:
            if chunk.find(b"\r\n", at, min(at + width, end)) < 0:
                return False
            at += width
        return True


async def read_data(reader: asyncio.StreamReader, *, size_limit: int | None,
                    line_limit: int) -> DataRead:
    """Read a DATA body from ``reader`` up to and including the terminating ``.\\r\\n``;
    bytes after it (a pipelined command) stay in the reader."""
    chunks: list[bytes] = []
    shape = _WireShape()
    size = 0
    problem: DataProblem | None = None
    meter = _LineMeter(line_limit)
    # The last two bytes read; the data starts at a line start, as if after a CRLF.
    tail = b"\r\n"
    while True:
        try:
            chunk = await reader.readuntil(_DOT_LINE)
            at_end = True
        except asyncio.LimitOverrunError as exc:
            # No ".\r\n" within the stream's limit: take what is safe to take (the stream
            # keeps the last bytes, which could start a ".\r\n").
            chunk = await reader.readexactly(exc.consumed)
            at_end = False
        if at_end:
            # ".\r\n" ends the data only at a line start: right after a CRLF.
            before = chunk[-5:-3] if len(chunk) >= 5 else (tail + chunk[:-3])[-2:]
            at_end = before == b"\r\n"
        body = chunk[:-3] if at_end else chunk
        if body:
            size += len(body)
            tail = body[-2:] if len(body) >= 2 else (tail + body)[-2:]
            if problem is None:
                meter.feed(body)
                if meter.too_long:
                    problem = DataProblem.LINE_TOO_LONG
                elif size_limit and size > size_limit:
                    problem = DataProblem.TOO_MUCH
                if problem is None:
                    chunks.append(body)
                    shape.feed(body)
                else:
                    chunks = []  # discard at once: no memory for a refused message
        if at_end:
            return DataRead(chunks, size, problem, problem is None and shape.clean)


class DataMixin(ConnectionBase):
    """The DATA command of ``RelaySMTP``."""

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the body read in bulk and kept in wire form (``read_data``);
        the checks before the 354 and the replies are aiosmtpd's own."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert isinstance(envelope, RelayEnvelope)
        if not envelope.rcpt_tos:
            await self.push(errors.DATA_NEED_RCPT)
            return
        if arg:
            await self.push(errors.DATA_SYNTAX)
            return
        await self.push(errors.DATA_START)
        try:
            read = await read_data(self._reader, size_limit=self.data_size_limit,
                                   line_limit=self.line_length_limit)
        except asyncio.CancelledError:
            # The connection was lost during DATA (aiosmtpd cancels this task).
            self.session_log.info("data.connection_lost")
            self._writer.close()
            raise
        if read.problem is not None:
            self.session_log.warning("data.refused", reason=read.problem.value, size=read.size)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            self.mark_reply_logged()
            await self.push(errors.LINE_TOO_LONG if read.problem is DataProblem.LINE_TOO_LONG
                            else errors.DATA_TOO_MUCH)
            return
        envelope.message = WireMessage(read.chunks, clean=read.clean)
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(errors.DATA_OK if status is MISSING else status)
