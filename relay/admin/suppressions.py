"""Operating the suppression list, shared by ``command-relay suppress …`` and the admin API's
``/v1/suppressions`` routes, so both check and answer the same: add, remove, list, import and
export entries (the store and the check on the SMTP path are in
``relay.decisions.suppression``).

A scope is named by a user reference (a user id or any address the user owns, as the users
commands take) or ``*`` (GLOBAL) for the global list. Refused requests raise ``AdminError``
(404 for an unknown user or an entry that is not there); StoreUnavailableError when Redis is
unreachable.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from relay.admin import suppression_csv as csvform
from relay.admin.operations import Admin, AdminError
from relay.admin.suppression_csv import RowError
from relay.decisions.suppression import GLOBAL, Suppression, SuppressionReason
from relay.identity.accounts import ADDRESS_PATTERN, normalize_address

log = structlog.get_logger()

# RFC 5321 4.5.3.1.3: a path is at most 256 octets, its angle brackets included.
MAX_ADDRESS = 254
# Who made an entry: printable ASCII without blanks ("cli", "api", "import", "mandrill"…).
SOURCE_PATTERN = r"^[!-~]{1,64}$(?!\n)"
REASONS = tuple(r.value for r in SuppressionReason)
# Entries written per pipelined round trip of an import.
IMPORT_BATCH = 1000
# Refusals an import summary lists one by one (all are counted).
MAX_REFUSALS_LISTED = 1000
# Scope references an import remembers (a file names a few users, many times each).
_SCOPE_CACHE = 10_000
_ADDRESS = re.compile(ADDRESS_PATTERN)
_SOURCE = re.compile(SOURCE_PATTERN)


def check_recipient(address: str) -> str:
    """The address to suppress, normalised (A-Z lower-cased); ValueError unless it is one
    address of at most MAX_ADDRESS characters, as given (no blanks around it)."""
    if not _ADDRESS.match(address) or len(address) > MAX_ADDRESS:
        raise ValueError(f"not an email address: {address!r}"
                         + (f" (over {MAX_ADDRESS} characters)" if len(address) > MAX_ADDRESS
                            else ""))
    return normalize_address(address)


def check_reason(reason: str) -> SuppressionReason:
    try:
        return SuppressionReason(reason)
    except ValueError:
        raise ValueError(f"unknown reason {reason!r}; reasons: {', '.join(REASONS)}") from None


def check_source(source: str) -> str:
    if not _SOURCE.match(source):
        raise ValueError(f"source must be 1 to 64 printable ASCII characters without blanks, "
                         f"got {source!r}")
    return source


def scope_name(user_id: str | None) -> str:
    return f"the list of user {user_id}" if user_id else "the global list"


def entry_view(entry: Suppression) -> dict[str, Any]:
    """An entry as the API, ``suppress list --json`` and the CSV columns show it."""
    return {"address": entry.address, "scope": entry.scope, "reason": entry.reason.value,
            "source": entry.source, "time": csvform.iso_time(entry.at)}


@dataclass
class ImportSummary:
    """What an import did: entries added (new), replaced (the address was already on that
    list: the file's reason, source and time win) and lines refused, with why."""

    added: int = 0
    replaced: int = 0
    refused: int = 0
    # (line number, reason), the first MAX_REFUSALS_LISTED of them.
    refusals: list[tuple[int, str]] = field(default_factory=list)

    def refuse(self, line: int, reason: str) -> None:
        self.refused += 1
        if len(self.refusals) < MAX_REFUSALS_LISTED:
            self.refusals.append((line, reason))

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "replaced": self.replaced, "refused": self.refused,
                "refusals": [{"line": n, "error": e} for n, e in self.refusals],
                "refusals_not_listed": self.refused - len(self.refusals)}


class SuppressionOps:
    """The suppression-list operations over one Admin (its store, users and clock)."""

    def __init__(self, admin: Admin) -> None:
        self._admin = admin
        self._store = admin.suppressions

    def _now(self) -> int:
        return int(self._admin.clock.now().timestamp())

    async def scope(self, ref: str | None) -> str | None:
        """The user id a reference names, or None (global) for None or ``*``."""
        if ref is None or ref == GLOBAL:
            return None
        return (await self._admin.find(ref)).id

    async def scopes(self, ref: str | None) -> list[str | None]:
        """The scopes a listing covers: the one named, or (None) the global list and then
        every user's, by id."""
        if ref is not None:
            return [await self.scope(ref)]
        users = await self._admin.accounts.list_users()
        return [None, *sorted(u.id for u in users)]

    async def add(self, address: str, *, user: str | None, reason: str,
                  source: str) -> tuple[Suppression, bool]:
        """Create or replace the entry of ``address`` on one list (the latest reason wins);
        the entry and whether it is new."""
        try:
            normalized = check_recipient(address)
            checked_reason = check_reason(reason)
            checked_source = check_source(source)
        except ValueError as exc:
            raise AdminError(str(exc)) from None
        user_id = await self.scope(user)
        entry = Suppression(normalized, user_id, checked_reason, checked_source, self._now())
        created = await self._store.add_many([entry]) == 1
        log.info("suppression.added", scope=entry.scope, reason=entry.reason.value,
                 source=entry.source, domain=normalized.rpartition("@")[2], created=created)
        return entry, created

    async def remove(self, address: str, *, user: str | None) -> Suppression:
        """Take ``address`` off one list; the entry removed (AdminError 404 if it was not
        there)."""
        user_id = await self.scope(user)
        entry = await self._store.get(address, user_id=user_id)
        if entry is None or not await self._store.remove(address, user_id=user_id):
            raise AdminError(f"{normalize_address(address)!r} is not on {scope_name(user_id)}",
                             not_found=True)
        log.info("suppression.removed", scope=entry.scope, reason=entry.reason.value,
                 domain=entry.address.rpartition("@")[2])
        return entry

    async def by_scope(self, ref: str | None) -> AsyncIterator[list[Suppression]]:
        """The entries of each scope ``scopes(ref)`` covers, one list per scope, sorted by
        address (an HSCAN may return a field twice while Redis rehashes: shown once)."""
        for user_id in await self.scopes(ref):
            entries = await self._store.listing(user_id=user_id)
            yield [e for i, e in enumerate(entries)
                   if i == 0 or e.address != entries[i - 1].address]

    async def listing(self, ref: str | None) -> list[Suppression]:
        return [e async for entries in self.by_scope(ref) for e in entries]

    async def export_csv(self, ref: str | None) -> AsyncIterator[str]:
        """The CSV file of ``scopes(ref)``: the header row, then one chunk of rows per scope.
        The scope is resolved before the header is produced (an unknown user is refused
        before anything is written)."""
        scopes = self.by_scope(ref)
        first = await anext(scopes)
        yield csvform.header() + "".join(csvform.format_row(e) for e in first)
        async for entries in scopes:
            yield "".join(csvform.format_row(e) for e in entries)

    async def import_csv(self, chunks: AsyncIterable[bytes]) -> ImportSummary:
        """Read a CSV file (the layout of relay.admin.suppression_csv) from a byte stream and
        write its entries IMPORT_BATCH at a time, in one pipelined round trip each. A line
        that is refused is counted and listed with its number and why; the others are
        written. Idempotent: importing a file again leaves the same list. AdminError (and
        nothing written) for a file without the header row."""
        summary = ImportSummary()
        batch: list[Suppression] = []
        resolved: dict[str, str | AdminError | None] = {}
        lines = csvform.numbered_lines(chunks)
        await self._check_header(lines)
        async for number, raw in lines:
            try:
                entry = await self._parse(number, raw, resolved)
            except RowError as exc:
                summary.refuse(number, str(exc))
                continue
            if entry is None:
                continue
            batch.append(entry)
            if len(batch) >= IMPORT_BATCH:
                await self._write(batch, summary)
        await self._write(batch, summary)
        log.info("suppression.imported", added=summary.added, replaced=summary.replaced,
                 refused=summary.refused)
        return summary

    @staticmethod
    async def _check_header(lines: AsyncIterator[tuple[int, bytes]]) -> None:
        expected = f"a header row {csvform.HEADER_LINE}"
        try:
            number, raw = await anext(lines)
        except StopAsyncIteration:
            raise AdminError(f"the file is empty: expected {expected}") from None
        try:
            text = csvform.decode_line(raw, number)
        except RowError as exc:
            raise AdminError(f"line 1: {exc}: expected {expected}") from None
        if text != csvform.HEADER_LINE:
            raise AdminError(f"line 1 is not {expected}: {text[:80]!r}")

    async def _parse(self, number: int, raw: bytes,
                     resolved: dict[str, str | AdminError | None]) -> Suppression | None:
        """One data line as an entry; None for a blank line; RowError if refused."""
        if len(raw) > csvform.MAX_LINE:
            raise RowError(f"line longer than {csvform.MAX_LINE} bytes")
        text = csvform.decode_line(raw, number)
        if not text.strip():
            return None
        address, scope, reason, source, at = csvform.split_fields(text)
        try:
            normalized = check_recipient(address)
            checked_reason = check_reason(reason)
            checked_source = check_source(source) if source else "import"
        except ValueError as exc:
            raise RowError(str(exc)) from None
        when = csvform.parse_time(at) if at else self._now()
        if not scope:
            raise RowError(f"scope is empty: a user id or address, or {GLOBAL} for the "
                           "global list")
        if scope not in resolved:
            if len(resolved) >= _SCOPE_CACHE:
                resolved.clear()
            try:
                resolved[scope] = await self.scope(scope)
            except AdminError as exc:
                resolved[scope] = exc
        user_id = resolved[scope]
        if isinstance(user_id, AdminError):
            raise RowError(f"scope: {user_id}")
        return Suppression(normalized, user_id, checked_reason, checked_source, when)

    async def _write(self, batch: list[Suppression], summary: ImportSummary) -> None:
        if not batch:
            return
        created = await self._store.add_many(batch)
        summary.added += created
        summary.replaced += len(batch) - created
        batch.clear()
