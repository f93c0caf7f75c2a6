"""The lines of a bulk import, read into checked rows (``command-relay users import``,
``POST /v1/user-imports``; ``relay/admin/user_import.py`` applies them).

Two formats, one user a line (docs/onboarding.md): CSV with a header row naming the columns,
or JSON lines, one object each. Fields: ``email`` (required), ``id``, ``plan``, ``limit`` (a
custom monthly limit; ``custom_limit`` is the same), ``tz``, ``senders`` (``;``-separated in
CSV, a list in JSON), ``status`` (``active`` or ``disabled``). Each value is checked as
``users add`` checks it. A field the file does not have (no column, no key) leaves what a
user has as it is; an empty cell or ``null`` asks for the default (the default plan, no
custom limit, RELAY_DEFAULT_TZ, active, no sender but the email).

Read as a stream: a line at a time, so a file of any length takes the same memory.
"""

from __future__ import annotations

import csv
import enum
import re
import string
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from relay.config.policies import Policies, check_limit
from relay.config.zones import time_zone_names
from relay.identity.accounts import ACTIVE, DISABLED, USER_ID_PATTERN, AccountError, check_address

CSV = "csv"
JSON_LINES = "jsonl"
FORMATS = (CSV, JSON_LINES)
# A line longer than this is refused unread (a user's line is well under 1 KB).
MAX_LINE = 64 * 1024
# Sender addresses one line may give a user (write_user.lua passes them to one SADD).
MAX_SENDERS = 1000
FIELDS = ("email", "id", "plan", "limit", "tz", "senders", "status")
_ALIASES = {"custom_limit": "limit"}
_USER_ID = re.compile(USER_ID_PATTERN)
_DIGITS = re.compile(r"^[0-9]{1,20}$(?!\n)")
_BLANKS = string.whitespace


class Absent(enum.Enum):
    """A field the file does not have: the user's value stays as it is."""

    ABSENT = "absent"


ABSENT = Absent.ABSENT


@dataclass(frozen=True, slots=True)
class Row:
    """One checked line: every value normalised, defaults already put in for empty ones."""

    line: int
    email: str
    user_id: str | None
    plan: str | Absent
    limit: int | Absent | None
    tz: str | Absent
    senders: frozenset[str] | Absent  # besides the email, which every user sends from
    status: str | Absent


@dataclass(frozen=True, slots=True)
class Refusal:
    line: int
    reason: str


class LineError(ValueError):
    """This line cannot be imported; the message says why."""


def format_of(first_line: bytes) -> str:
    """JSON lines when the first line that is not blank opens an object, else CSV."""
    return JSON_LINES if first_line.lstrip(b"\xef\xbb\xbf \t\r").startswith(b"{") else CSV


async def numbered_lines(chunks: AsyncIterable[bytes]
                         ) -> AsyncIterator[list[tuple[int, bytes | None]]]:
    """The lines of a byte stream, numbered from 1, a chunk's worth at a time, without
    their line ends (LF or CRLF). A line over MAX_LINE bytes comes as None (refused: not
    read nor held)."""
    number, pending, skipping = 0, b"", False
    async for chunk in chunks:
        parts = (pending + chunk).split(b"\n")
        pending = parts.pop()
        found: list[tuple[int, bytes | None]] = []
        for part in parts:
            number += 1
            too_long = skipping or len(part) > MAX_LINE
            found.append((number, None if too_long else part.removesuffix(b"\r")))
            skipping = False
        if len(pending) > MAX_LINE:
            pending, skipping = b"", True
        if found:
            yield found
    if pending or skipping:
        yield [(number + 1, None if skipping else pending.removesuffix(b"\r"))]


class RowReader:
    """Turns the lines of one file into Rows or Refusals, checking each value like
    ``users add`` (relay/admin/operations.py). A CSV file's first line that is not blank is
    its header; if it cannot be used, ``fatal`` is set and no later line is read."""

    def __init__(self, policies: Policies, default_tz: str, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        self._policies = policies
        self._default_tz = default_tz
        self._zones = time_zone_names()  # once: it reads the zone database from disk
        self._format = fmt
        self._columns: tuple[str, ...] | None = None
        self.fatal = False

    def read(self, line: int, raw: bytes | None) -> Row | Refusal | None:
        """The line's Row, a Refusal, or None for a blank line or the CSV header."""
        if raw is None:
            return Refusal(line, f"the line is longer than {MAX_LINE:,} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._refuse_header(line, "not UTF-8 text") if self._awaits_header() \
                else Refusal(line, "not UTF-8 text")
        if line == 1:
            text = text.removeprefix("\ufeff")  # the byte order mark spreadsheets write
        if not text.strip(_BLANKS):
            return None
        try:
            if self._format == JSON_LINES:
                return self._row(line, self._json_fields(text))
            if self._columns is None:
                self._columns = self._header(text)
                return None
            return self._row(line, self._csv_fields(text, self._columns))
        except LineError as exc:
            if self._awaits_header():
                return self._refuse_header(line, str(exc))
            return Refusal(line, str(exc))

    def _awaits_header(self) -> bool:
        return self._format == CSV and self._columns is None

    def _refuse_header(self, line: int, reason: str) -> Refusal:
        self.fatal = True
        return Refusal(line, f"the header: {reason}; no line after it was read")

    # -- the two formats -----------------------------------------------------------------
    @staticmethod
    def _cells(text: str) -> list[str]:
        try:
            # strict: an unclosed quote is an error, not a cell running to the line's end.
            cells = next(csv.reader([text], strict=True))
        except csv.Error as exc:
            raise LineError(f"not a CSV line: {exc}") from None
        return [cell.strip(_BLANKS) for cell in cells]

    def _header(self, text: str) -> tuple[str, ...]:
        columns = []
        for cell in self._cells(text):
            name = _ALIASES.get(cell.lower(), cell.lower())
            if name not in FIELDS:
                raise LineError(f"unknown column {cell!r}; columns: {', '.join(FIELDS)}")
            if name in columns:
                raise LineError(f"the column {name!r} is named twice")
            columns.append(name)
        if "email" not in columns:
            raise LineError("no email column (the columns: " + ", ".join(FIELDS) + ")")
        return tuple(columns)

    def _csv_fields(self, text: str, columns: tuple[str, ...]) -> dict[str, Any]:
        cells = self._cells(text)
        if len(cells) != len(columns):
            raise LineError(f"{len(cells)} cells where the header has {len(columns)}")
        fields: dict[str, Any] = {}
        for name, cell in zip(columns, cells, strict=True):
            if name == "senders":
                fields[name] = [part.strip(_BLANKS) for part in cell.split(";")
                                if part.strip(_BLANKS)]
            elif name == "limit":
                if cell and not _DIGITS.match(cell):
                    raise LineError(f"limit must be a positive whole number, got {cell!r}")
                fields[name] = int(cell) if cell else None
            else:
                fields[name] = cell or None
        return fields

    @staticmethod
    def _json_fields(text: str) -> dict[str, Any]:
        try:
            # orjson refuses NaN, Infinity and lone surrogates, which no JSON text holds.
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise LineError(f"not a JSON object: {exc}") from None
        if not isinstance(value, dict):
            raise LineError("not a JSON object")
        fields: dict[str, Any] = {}
        for key, item in value.items():
            name = _ALIASES.get(key, key)
            if name not in FIELDS:
                raise LineError(f"unknown field {key!r}; fields: {', '.join(FIELDS)}")
            if name in fields:
                raise LineError(f"the field {name!r} is given twice")
            fields[name] = _json_value(name, item)
        return fields

    # -- the values ------------------------------------------------------------------------
    def _row(self, line: int, fields: Mapping[str, Any]) -> Row:
        email = fields.get("email")
        if not email:
            raise LineError("no email")
        try:
            email = check_address(email)
            senders = fields.get("senders", ABSENT)
            if senders is not ABSENT:
                if len(senders or ()) > MAX_SENDERS:
                    raise LineError(f"more than {MAX_SENDERS:,} senders")
                senders = frozenset(check_address(s) for s in senders or ()) - {email}
        except AccountError as exc:
            raise LineError(str(exc)) from None
        user_id = fields.get("id")
        if user_id is not None and not _USER_ID.match(user_id):
            raise LineError(f"user id must be 1-64 letters, digits, - and _: {user_id!r}")
        plan = fields.get("plan", ABSENT)
        if plan is not ABSENT:
            plan = plan or self._policies.default_plan
            if plan not in self._policies.plans:
                raise LineError(f"unknown plan {plan!r}; plans: "
                                + ", ".join(self._policies.plans))
        limit = fields.get("limit", ABSENT)
        if isinstance(limit, int):
            try:
                check_limit(limit)
            except ValueError as exc:
                raise LineError(str(exc)) from None
        tz = fields.get("tz", ABSENT)
        if tz is not ABSENT:
            tz = tz or self._default_tz
            if tz not in self._zones:
                raise LineError(f"unknown time zone {tz!r}")
        status = fields.get("status", ABSENT)
        if status is not ABSENT:
            status = status or ACTIVE
            if status not in (ACTIVE, DISABLED):
                raise LineError(f"status must be {ACTIVE} or {DISABLED}, got {status!r}")
        return Row(line, email, user_id, plan, limit, tz, senders, status)


def _json_value(name: str, value: Any) -> Any:
    """A JSON field's value in the type its name wants; null is the default."""
    if value is None:
        return None
    if name == "senders":
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise LineError("senders must be a list of addresses")
        return value
    if name == "limit":
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON does not tell 5 from 5.0
        if not isinstance(value, int) or isinstance(value, bool):
            raise LineError(f"limit must be a positive whole number, got {value!r}")
        return value
    if not isinstance(value, str):
        raise LineError(f"{name} must be a string")
    return value
