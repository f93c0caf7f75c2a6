"""Reading a bulk import's lines (relay/admin/import_rows.py): the two formats, every value
checked as ``users add`` checks it, absent fields told from empty ones, and lines split out of
any chunking of the bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from relay.admin.import_rows import (
    ABSENT,
    CSV,
    JSON_LINES,
    MAX_LINE,
    MAX_SENDERS,
    Refusal,
    Row,
    RowReader,
    format_of,
    numbered_lines,
)
from relay.config.policies import MAX_MONTHLY_LIMIT, load_policies
from tests.conftest import POLICIES

PLANS = load_policies(POLICIES)


def reader(fmt: str) -> RowReader:
    return RowReader(PLANS, "UTC", fmt)


def read_all(fmt: str, *lines: str) -> list[Row | Refusal]:
    r = reader(fmt)
    found = [r.read(number, line.encode()) for number, line in enumerate(lines, 1)]
    return [item for item in found if item is not None]


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def lines_of(data: bytes, size: int) -> list[tuple[int, bytes | None]]:
    return [line async for batch in numbered_lines(chunked(data, size)) for line in batch]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
async def test_numbered_lines_are_the_same_for_any_chunking(size):
    """LF and CRLF ends, a last line without an end, empty lines: numbered from 1 whatever
    the chunk size."""
    data = b"a,b\r\nc\n\nlast"
    assert await lines_of(data, size) == [(1, b"a,b"), (2, b"c"), (3, b""), (4, b"last")]


@pytest.mark.parametrize("size", [1000, MAX_LINE + 10, 10 * MAX_LINE])
async def test_numbered_lines_a_line_over_the_maximum_comes_unread(size):
    """A line longer than MAX_LINE comes as None (it is never held whole); the lines after
    it keep their numbers."""
    data = b"first\n" + b"x" * (MAX_LINE + 1) + b"\nthird\n" + b"y" * (MAX_LINE + 5)
    assert await lines_of(data, size) == [(1, b"first"), (2, None), (3, b"third"), (4, None)]


def test_format_of_tells_json_lines_from_csv():
    assert format_of(b'{"email": "a@kw.test"}') == JSON_LINES
    assert format_of(b'\xef\xbb\xbf  {"email": "a@kw.test"}') == JSON_LINES
    assert format_of(b"email,plan") == CSV


def test_csv_row_with_every_field():
    """Cells are trimmed, senders split on ';', the email joins nobody's sender list twice,
    addresses are A-Z lower-cased."""
    [row] = read_all(CSV, "email, id ,plan,limit,tz,senders,status",
                     " Agent@KW.test ,u-1,pro,1234,America/Chicago, a@kw.test ; B@kw.test;"
                     "agent@kw.test ;,disabled")
    assert row == Row(2, "agent@kw.test", "u-1", "pro", 1234, "America/Chicago",
                      frozenset({"a@kw.test", "b@kw.test"}), "disabled")


def test_csv_missing_columns_are_absent_and_empty_cells_are_defaults():
    """A column the file lacks leaves the user's value alone; an empty cell asks for the
    default (default plan, no custom limit, RELAY_DEFAULT_TZ, active, no other sender)."""
    [absent, empty] = read_all(CSV, "email", "a@kw.test") + \
        read_all(CSV, "email,id,plan,limit,tz,senders,status", "a@kw.test,,,,,,")
    assert absent == Row(2, "a@kw.test", None, ABSENT, ABSENT, ABSENT, ABSENT, ABSENT)
    assert empty == Row(2, "a@kw.test", None, "free", None, "UTC", frozenset(), "active")


def test_csv_header_is_case_blind_and_takes_custom_limit():
    [row] = read_all(CSV, "\ufeffEMAIL,Custom_Limit", "a@kw.test,77")
    assert row.limit == 77


@pytest.mark.parametrize(("header", "reason"), [
    ("mail,plan", "unknown column 'mail'"),
    ("plan,tz", "no email column"),
    ("email,limit,custom_limit", "the column 'limit' is named twice"),
    ('email,"plan', "not a CSV line"),
])
def test_csv_a_bad_header_is_refused_and_stops_the_file(header, reason):
    """The header is refused with its line number; no later line is read (fatal)."""
    r = reader(CSV)
    refusal = r.read(1, header.encode())
    assert isinstance(refusal, Refusal) and refusal.line == 1
    assert reason in refusal.reason and "no line after it was read" in refusal.reason
    assert r.fatal


@pytest.mark.parametrize(("line", "reason"), [
    ("not-an-address,u-1,free,,", "not an email address: 'not-an-address'"),
    (",u-1,free,,", "no email"),
    ("a@kw.test,u 1,free,,", "user id must be"),
    ("a@kw.test,u-1,gold,,", "unknown plan 'gold'; plans: free, plus, pro, team"),
    ("a@kw.test,u-1,free,-5,", "limit must be a positive whole number, got '-5'"),
    ("a@kw.test,u-1,free,1.5,", "limit must be a positive whole number"),
    ("a@kw.test,u-1,free,0,", "the custom limit must be a positive integer"),
    (f"a@kw.test,u-1,free,{MAX_MONTHLY_LIMIT + 1},", "the custom limit must be a positive"),
    ("a@kw.test,u-1,free,,Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
    ("a@kw.test,u-1,free,,UTC,extra", "6 cells where the header has 5"),
    ('a@kw.test,"u-1', "not a CSV line"),
])
def test_csv_bad_values_are_refused_with_the_line_number(line, reason):
    [refusal] = read_all(CSV, "email,id,plan,limit,tz", line)
    assert isinstance(refusal, Refusal) and refusal.line == 2
    assert reason in refusal.reason


def test_csv_bad_sender_and_status_refused():
    refusals = read_all(CSV, "email,senders,status", "a@kw.test,b@kw.test;nope,",
                        "a@kw.test,,gone")
    assert [(r.line, r.reason) for r in refusals if isinstance(r, Refusal)] == [
        (2, "not an email address: 'nope'"), (3, "status must be active or disabled, got "
                                                 "'gone'")]


def test_a_line_with_too_many_senders_is_refused():
    senders = ";".join(f"s{n}@kw.test" for n in range(MAX_SENDERS + 1))
    [refusal] = read_all(CSV, "email,senders", f"a@kw.test,{senders}")
    assert refusal == Refusal(2, f"more than {MAX_SENDERS:,} senders")


def test_json_lines_row_and_null_defaults():
    """A list of senders; null is the default; a key not given is absent; 5.0 is 5."""
    rows = read_all(JSON_LINES,
                    '{"email": "A@kw.test", "id": "u-1", "plan": "plus", "limit": 5.0, '
                    '"tz": "Europe/Paris", "senders": ["x@kw.test"], "status": "active"}',
                    "",
                    '{"email": "b@kw.test", "plan": null, "custom_limit": null, "senders": null}')
    assert rows == [
        Row(1, "a@kw.test", "u-1", "plus", 5, "Europe/Paris", frozenset({"x@kw.test"}),
            "active"),
        Row(3, "b@kw.test", None, "free", None, ABSENT, frozenset(), ABSENT)]


@pytest.mark.parametrize(("line", "reason"), [
    ("[1, 2]", "not a JSON object"),
    ('{"email": "a@kw.test"', "not a JSON object"),
    ('{"email": "a@kw.test", "limit": NaN}', "not a JSON object"),
    ('{"email": "a@kw.test", "name": "Ann"}', "unknown field 'name'"),
    ('{"email": "a@kw.test", "limit": 5, "custom_limit": 6}', "the field 'limit' is given twice"),
    ('{"email": 5}', "email must be a string"),
    ('{"email": " a@kw.test"}', "not an email address"),
    ('{"email": "a@kw.test", "senders": "b@kw.test"}', "senders must be a list"),
    ('{"email": "a@kw.test", "limit": "5"}', "limit must be a positive whole number"),
    ('{"email": "a@kw.test", "limit": true}', "limit must be a positive whole number"),
    ('{"email": "a@kw.test", "id": "\\ud800"}', "not a JSON object"),
])
def test_json_lines_bad_lines_are_refused(line, reason):
    [refusal] = read_all(JSON_LINES, line)
    assert isinstance(refusal, Refusal) and refusal.line == 1
    assert reason in refusal.reason


def test_a_line_that_is_not_utf8_or_too_long_is_refused():
    r = reader(JSON_LINES)
    assert r.read(4, b'{"email": "\xff@kw.test"}') == Refusal(4, "not UTF-8 text")
    assert r.read(5, None) == Refusal(5, f"the line is longer than {MAX_LINE:,} bytes")
    assert not r.fatal
