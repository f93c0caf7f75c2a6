"""The CSV form of the suppression list (``command-relay suppress import|export`` and the admin
API's ``/v1/suppressions/import|export``): the layout, the reading of lines from a stream and
the writing of rows. What a field may hold is checked in ``relay.admin.suppressions``.

A file is one header row, ``address,scope,reason,source,time``, then one entry per line:
scope is a user id (or an address the user owns, on import) or ``*`` for the global list;
time is ISO-8601 in UTC. One entry is one physical line (no field holds a line break), so a
refusal names the line an operator sees in an editor. Lines end in LF; a CR before it (a
spreadsheet's CRLF) and a UTF-8 byte-order mark at the start are accepted.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime

from relay.decisions.suppression import Suppression

HEADER = ("address", "scope", "reason", "source", "time")
HEADER_LINE = ",".join(HEADER)
# An entry is under 400 bytes (an address is at most 254); a longer line is refused, and read
# no further than this into memory.
MAX_LINE = 4096
_BOM = "\ufeff"


class RowError(ValueError):
    """One line of an import is refused; the message says why (the line number is added by
    the caller)."""


def iso_time(at: int) -> str:
    """Unix seconds as ISO-8601 UTC, as the file, the API and ``suppress list`` show it."""
    return datetime.fromtimestamp(at, UTC).isoformat()


def parse_time(text: str) -> int:
    """ISO-8601 (``2026-11-15T12:00:00+00:00``, ``…Z``, a date alone) as Unix seconds; a time
    without an offset is UTC."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise RowError(f"time is not ISO-8601: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    at = int(when.timestamp())
    if at < 0:
        raise RowError(f"time is before 1970: {text!r}")
    return at


def format_row(entry: Suppression) -> str:
    """One entry as a CSV line (LF-terminated)."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(
        (entry.address, entry.scope, entry.reason.value, entry.source, iso_time(entry.at)))
    return out.getvalue()


def header() -> str:
    return HEADER_LINE + "\n"


def split_fields(text: str) -> list[str]:
    """The fields of one line (CSV quoting), each with ASCII blanks around it taken away;
    RowError for a line that is not CSV or has another number of fields than the header."""
    try:
        fields = next(csv.reader([text], strict=True))
    except csv.Error as exc:
        raise RowError(f"not a CSV line ({exc})") from None
    if len(fields) != len(HEADER):
        raise RowError(f"expected {len(HEADER)} fields ({HEADER_LINE}), got {len(fields)}")
    return [f.strip(" \t") for f in fields]


def decode_line(raw: bytes, number: int) -> str:
    """A line's bytes as text; the byte-order mark is taken off line 1."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RowError("not UTF-8 text") from None
    if number == 1 and text.startswith(_BOM):
        text = text[1:]
    return text.removesuffix("\r")


async def numbered_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    """The lines of a byte stream, numbered from 1, without their LF; at most MAX_LINE + 1
    bytes of a line are kept (what is beyond is skipped, so a line without end cannot fill
    memory: such a line comes out longer than MAX_LINE and is refused by the caller)."""
    number, pending, skipping = 0, bytearray(), False
    async for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not skipping:
                pending += piece[:MAX_LINE + 1 - len(pending)]
                skipping = len(pending) > MAX_LINE
            if end < 0:
                break
            number += 1
            yield number, bytes(pending)
            pending.clear()
            skipping = False
            start = end + 1
    if pending:
        yield number + 1, bytes(pending)
