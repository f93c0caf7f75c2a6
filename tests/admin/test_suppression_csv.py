"""The CSV form of the suppression list: lines read from a byte stream whatever its chunking,
over-long lines cut short in memory, fields and times parsed, rows written so that they read
back the same."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from relay.admin.suppression_csv import (
    MAX_LINE,
    RowError,
    decode_line,
    format_row,
    iso_time,
    numbered_lines,
    parse_time,
    split_fields,
)
from relay.decisions.suppression import Suppression, SuppressionReason


async def _stream(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def _lines(data: bytes, size: int) -> list[tuple[int, bytes]]:
    return [line async for line in numbered_lines(_stream(data, size))]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
async def test_numbered_lines_are_the_same_whatever_the_chunks(size):
    """Lines split at LF (a CR stays, for the decoder), numbered from 1, the same for every
    chunk size; an empty line is a line; a last line without LF is read; no line after a
    final LF."""
    data = b"header\r\none\n\nthree\nlast"
    assert await _lines(data, size) == [(1, b"header\r"), (2, b"one"), (3, b""),
                                        (4, b"three"), (5, b"last")]
    assert await _lines(data + b"\n", size) == await _lines(data, size)


@pytest.mark.parametrize("size", [1000, 4096, 65_536])
async def test_numbered_lines_keep_no_more_than_max_line_of_a_long_line(size):
    """A line of 10 MB comes out cut at MAX_LINE + 1 bytes (so it is refused, without being
    held in memory), and the lines after it keep their numbers."""
    data = b"header\n" + b"x" * 10_000_000 + b"\nnext\n"
    lines = await _lines(data, size)
    assert [(n, len(raw)) for n, raw in lines] == [(1, 6), (2, MAX_LINE + 1), (3, 4)]
    assert lines[2] == (3, b"next")


async def test_numbered_lines_of_nothing():
    """An empty stream has no line."""
    assert await _lines(b"", 10) == []


def test_decode_line_takes_the_bom_off_line_one_only_and_refuses_bad_utf8():
    """A spreadsheet's byte-order mark opens line 1 only; a CR before the LF is dropped; bytes
    that are not UTF-8 are refused."""
    assert decode_line("\ufeffheader\r".encode(), 1) == "header"
    assert decode_line("\ufeffa".encode(), 2) == "\ufeffa"
    assert decode_line("ä@x.test".encode(), 2) == "ä@x.test"
    with pytest.raises(RowError, match="not UTF-8"):
        decode_line(b"\xff@x.test", 2)


@pytest.mark.parametrize(("text", "error"), [
    ("a@x.test,*,bounce", "expected 5 fields"),
    ("a@x.test,*,bounce,cli,2026-01-01,extra", "expected 5 fields"),
    ('"a@x.test,*,bounce,cli,2026-01-01', "not a CSV line"),
    ('a@x.test,"*"x,bounce,cli,', "not a CSV line"),
])
def test_split_fields_refuses_what_is_not_one_entry(text, error):
    """A line with another number of fields than the header, or broken quoting, is refused."""
    with pytest.raises(RowError, match=error):
        split_fields(text)


def test_split_fields_takes_blanks_away_and_reads_quotes():
    assert split_fields(' a@x.test , * ,"bounce", cli ,') == ["a@x.test", "*", "bounce",
                                                              "cli", ""]


@pytest.mark.parametrize(("text", "at"), [
    ("2026-11-15T12:00:00+00:00", 1_794_744_000),
    ("2026-11-15T12:00:00Z", 1_794_744_000),
    ("2026-11-15T12:00:00", 1_794_744_000),
    ("2026-11-15T13:00:00+01:00", 1_794_744_000),
    ("2026-11-15T12:00:00.900Z", 1_794_744_000),
    ("2026-11-15", 1_794_700_800),
])
def test_parse_time_reads_iso_8601_as_utc(text, at):
    """Offsets are honoured; a time without one is UTC; fractions of a second are dropped."""
    assert parse_time(text) == at
    assert iso_time(at).endswith("+00:00")


@pytest.mark.parametrize("text", ["yesterday", "1794744000", "2026-13-01", "1969-12-31"])
def test_parse_time_refuses_what_is_not_an_iso_time_after_1970(text):
    with pytest.raises(RowError, match="time"):
        parse_time(text)


def test_format_row_reads_back_as_the_same_fields():
    """A row is the header's five columns; a source with a comma or a quote is quoted and
    reads back unchanged."""
    entry = Suppression("a@x.test", None, SuppressionReason.BOUNCE, 'we,"ird', 1_794_744_000)
    line = format_row(entry)
    assert line.endswith("\n") and line.count("\n") == 1
    assert split_fields(line[:-1]) == ["a@x.test", "*", "bounce", 'we,"ird',
                                       "2026-11-15T12:00:00+00:00"]
    user = Suppression("b@x.test", "u-1", SuppressionReason.UNSUBSCRIBE, "cli", 0)
    assert format_row(user) == "b@x.test,u-1,unsubscribe,cli,1970-01-01T00:00:00+00:00\n"
