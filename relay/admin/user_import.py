"""Bulk onboarding: create or update users from a CSV or JSON-lines file, idempotently
(``command-relay users import``, ``POST /v1/user-imports``: the same code for both).

Each line is read and checked like ``users add`` (``import_rows.py``) and compared with what
Redis holds, a batch at a time (``relay/identity/bulk.py``): one pipeline reads the batch's
users, one claims the addresses new to them with SET NX (an address another user owns is
refused for that line, never moved), one writes what changed. A refused line gets its number
and reason; the other lines go on. A line that matches what Redis holds writes nothing, so
the same file imported twice gives ``unchanged`` for every line the second time.

Lines apply in file order: a line about a user or an address that an earlier line of the
same batch changes starts the next batch, so it sees that change (the last line about a user
wins). Plan changes go through ``Admin.change_plan``, the rules of ``plan set``: an upgrade
applies now, a downgrade at the next reset, each is audited and publishes ``plan.changed``.

A dry run reads the same and writes nothing. What it would have written stays in memory (for
each user it would create or change: the result, and the addresses it would claim or give
back), so that later lines see it as they would in the real run; a real run holds one batch.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import structlog

from relay.admin.import_rows import (
    ABSENT,
    Absent,
    Refusal,
    Row,
    RowReader,
    format_of,
    numbered_lines,
)
from relay.admin.import_summary import (
    CREATED,
    REFUSED,
    UNCHANGED,
    UPDATED,
    ImportSummary,
    LineResult,
)
from relay.admin.operations import Admin, AdminError
from relay.decisions.subscriptions import terms_in_force
from relay.decisions.usage import user_period
from relay.errors import StoreUnavailableError
from relay.identity.accounts import ACTIVE, PendingChange, User
from relay.identity.bulk import UserWrite

log = structlog.get_logger()

BATCH = 500  # lines per batch: a few round trips for this many users
PLAN_CHANGES_IN_FLIGHT = 16
RETRIES = 3  # times a batch is run again after Redis failed it
RETRY_FIRST = 0.5  # seconds before the first retry, doubling


@dataclass(slots=True)
class _Change:
    """A line that creates or changes a user, until it is written (or refused)."""

    row: Row
    user_id: str
    before: User | None
    after: User  # as a dry run predicts it
    claims: frozenset[str]
    releases: frozenset[str]
    fields: dict[str, str]
    plan: tuple[str, int | None] | None
    changed: tuple[str, ...]
    plan_change: str | None = None

    def result(self, *, dry_run: bool) -> LineResult:
        if self.before is None:
            return LineResult(self.row.line, CREATED, None if dry_run and self.row.user_id is
                              None else self.user_id, self.row.email)
        return LineResult(self.row.line, UPDATED, self.user_id, self.row.email, self.changed,
                          self.plan_change)


@dataclass(slots=True)
class _Attempts:
    """What the attempts at one batch set out to write. A retry reads the batch again, so
    what a failed attempt wrote reads as unchanged: its results stand for those lines, and
    the steps that may not have run after it (the users index, the releases) run again."""

    results: dict[int, LineResult] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)
    releases: set[tuple[str, str]] = field(default_factory=set)

    def add(self, changes: Sequence[_Change]) -> None:
        for c in changes:
            self.results[c.row.line] = c.result(dry_run=False)
            if c.before is None:
                self.created.add(c.user_id)
            self.releases.update((address, c.user_id) for address in c.releases)


class _Cut(Exception):
    """This line depends on a change an earlier line of the batch makes: next batch."""


class UserImport:
    """One import run. ``on_result`` sees each line's result, in file order; ``on_progress``
    the number of lines done so far, after each batch."""

    def __init__(self, admin: Admin, *, dry_run: bool = False, by: str = "import",
                 keep_changes: bool = False, batch_size: int = BATCH,
                 on_result: Callable[[LineResult], None] | None = None,
                 on_progress: Callable[[int], None] | None = None) -> None:
        self._admin = admin
        self._dry_run = dry_run
        self._by = by
        self._batch_size = batch_size
        self._on_result = on_result
        self._on_progress = on_progress
        self.summary = ImportSummary(dry_run, changes=[] if keep_changes else None)
        # The dry run's memory of what it would have written (see the module docstring).
        self._users: dict[str, User] = {}
        self._owners: dict[str, str | None] = {}

    async def run(self, chunks: AsyncIterable[bytes], fmt: str | None = None) -> ImportSummary:
        """Import every line of ``chunks`` (the file's bytes) as ``fmt`` (csv, jsonl; None:
        by its first line). Raises StoreUnavailableError if Redis stays away (see _batch):
        what was written stays, and running the same import again finishes it."""
        started = time.perf_counter()
        reader: RowReader | None = None
        batch: list[Row | Refusal] = []
        async for lines in numbered_lines(chunks):
            for number, raw in lines:
                if reader is None:
                    if raw is not None and not raw.strip():
                        continue
                    self.summary.format = fmt or format_of(raw or b"")
                    reader = RowReader(self._admin.policies, self._admin.default_tz,
                                       self.summary.format)
                item = reader.read(number, raw)
                if item is not None:
                    batch.append(item)
                if reader.fatal:
                    break
                if len(batch) >= self._batch_size:
                    batch = await self._batch(batch)
            if reader is not None and reader.fatal:
                break
        while batch:
            batch = await self._batch(batch)
        self.summary.seconds = time.perf_counter() - started
        s = self.summary
        log.info("users.imported", dry_run=s.dry_run, format=s.format, lines=s.lines,
                 created=s.created, updated=s.updated, unchanged=s.unchanged,
                 refused=s.refused, duration_ms=round(s.seconds * 1000))
        return s

    # -- one batch -------------------------------------------------------------------------
    async def _batch(self, items: list[Row | Refusal]) -> list[Row | Refusal]:
        """Apply the lines of ``items`` up to the first that depends on an earlier one;
        the rest is returned for the next batch.

        A batch that Redis fails in the middle of (a timeout: a loaded machine, a failover)
        is run again, from its reads, up to RETRIES times: each step is idempotent (a claim
        naming the line's own user counts as made, a write already done reads as
        unchanged), so what the first attempt wrote is simply found done."""
        attempted = _Attempts()
        for attempt in range(RETRIES + 1):
            try:
                results, later = await self._apply(items, attempted)
                break
            except StoreUnavailableError:
                if attempt == RETRIES:
                    raise
                log.warning("users.import_retried", attempt=attempt + 1,
                            first_line=items[0].line, note="Redis did not answer in time; "
                            "the batch is run again")
                await asyncio.sleep(RETRY_FIRST * 2 ** attempt)
        for result in results:
            if result.action == UNCHANGED and result.line in attempted.results:
                result = attempted.results[result.line]
            self.summary.count(result)
            if self._on_result is not None:
                self._on_result(result)
        if self._on_progress is not None:
            self._on_progress(self.summary.lines)
        return later

    async def _apply(self, items: list[Row | Refusal], attempted: _Attempts
                     ) -> tuple[list[LineResult], list[Row | Refusal]]:
        head = _independent(items)
        items, later = items[:head], items[head:]
        rows = [item for item in items if isinstance(item, Row)]
        known, owners = await self._read(rows)
        results: list[LineResult | _Change] = []
        touched: set[str] = set()
        for number, item in enumerate(items):
            if isinstance(item, Refusal):
                results.append(LineResult(item.line, REFUSED, reason=item.reason))
                continue
            try:
                results.append(self._decide(item, known, owners, touched))
            except _Cut:
                later = items[number:] + later
                break
        changes = [r for r in results if isinstance(r, _Change)]
        refused = await self._claim(changes)
        accepted = [c for c in changes if c.row.line not in refused]
        if self._dry_run:
            self._remember(accepted)
        else:
            attempted.add(accepted)
            await self._write(accepted, attempted)
        done = [result if not isinstance(result, _Change) else
                LineResult(result.row.line, REFUSED, reason=refused[result.row.line])
                if result.row.line in refused else result.result(dry_run=self._dry_run)
                for result in results]
        return done, later

    async def _read(self, rows: Sequence[Row]
                    ) -> tuple[dict[str, User | None], dict[str, str | None]]:
        """The users the rows name (by id, or by the owner of their email) and the owner
        of each id-less row's email: two pipelines at most."""
        bulk = self._admin.bulk
        ids = list(dict.fromkeys(r.user_id for r in rows if r.user_id is not None))
        emails = list(dict.fromkeys(r.email for r in rows if r.user_id is None))
        users, found = await bulk.read(ids, emails)
        known: dict[str, User | None] = dict(zip(ids, users, strict=True))
        owners = {email: self._owners.get(email, owner)
                  for email, owner in zip(emails, found, strict=True)}
        more = list(dict.fromkeys(owner for owner in owners.values()
                                  if owner is not None and owner not in known))
        if more:
            users, _ = await bulk.read(more, [])
            known.update(zip(more, users, strict=True))
        known.update((user_id, user) for user_id, user in self._users.items()
                     if user_id in known)
        return known, owners

    def _decide(self, row: Row, known: dict[str, User | None],
                owners: dict[str, str | None], touched: set[str]) -> LineResult | _Change:
        """What the row asks of the user it names; raises _Cut if it depends on a change an
        earlier row of the batch makes (``touched``: the ids and addresses they change)."""
        if row.user_id is not None:
            user_id = row.user_id
        else:
            if "@" + row.email in touched:
                raise _Cut
            owner = owners[row.email]
            user_id = owner if owner is not None else f"u-{secrets.token_hex(5)}"
        if user_id in touched:
            raise _Cut
        before = known.get(user_id)
        if before is not None and before.email != row.email:
            if row.user_id is None:
                return LineResult(row.line, REFUSED, reason=f"address {row.email} already "
                                  f"belongs to user {user_id}")
            return LineResult(row.line, REFUSED, reason=(
                f"user {user_id} has the email {before.email}, not {row.email} (an import "
                "does not change a user's email)"))
        change = self._change(row, user_id, before)
        if change is None:
            return LineResult(row.line, UNCHANGED, user_id, row.email)
        keys = {user_id, *("@" + a for a in change.after.senders | change.releases)}
        if keys & touched:
            raise _Cut
        touched |= keys
        return change

    def _change(self, row: Row, user_id: str, before: User | None) -> _Change | None:
        """The change the row makes to ``before`` (None: a new user); None if nothing."""
        admin = self._admin
        if before is None:
            after = User(
                id=user_id, email=row.email,
                plan=admin.policies.default_plan if isinstance(row.plan, Absent) else row.plan,
                custom_limit=None if isinstance(row.limit, Absent) else row.limit,
                tz=admin.default_tz if isinstance(row.tz, Absent) else row.tz,
                status=ACTIVE if isinstance(row.status, Absent) else row.status,
                senders=frozenset({row.email} | (frozenset() if isinstance(row.senders, Absent)
                                                 else row.senders)),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"))
            record = {"email": after.email, "plan": after.plan, "tz": after.tz,
                      "status": after.status, "created_at": after.created_at}
            if after.custom_limit is not None:
                record["limit"] = str(after.custom_limit)
            return _Change(row, user_id, None, after, after.senders, frozenset(), record,
                           None, ())
        fields: dict[str, str] = {}
        changed: list[str] = []
        after = before
        if row.tz is not ABSENT and row.tz != before.tz:
            fields["tz"] = row.tz
        if row.status is not ABSENT and row.status != before.status:
            fields["status"] = row.status
        if fields:
            after = replace(after, tz=fields.get("tz", after.tz),
                            status=fields.get("status", after.status))
        # The terms the user is headed for: a pending downgrade counts as already asked.
        aim = (before.pending.plan, before.pending.custom_limit) if before.pending else \
            (before.plan, before.custom_limit)
        wanted = (aim[0] if isinstance(row.plan, Absent) else row.plan,
                  aim[1] if isinstance(row.limit, Absent) else row.limit)
        plan = wanted if wanted != aim else None
        if plan is not None:
            changed += [name for name, old, new in (("plan", aim[0], wanted[0]),
                                                    ("limit", aim[1], wanted[1])) if old != new]
        changed += sorted(fields)
        senders = before.senders if isinstance(row.senders, Absent) else \
            frozenset({row.email} | row.senders)
        if senders != before.senders:
            changed.append("senders")
            after = replace(after, senders=senders)
        if not changed:
            return None
        change = _Change(row, user_id, before, after, senders - before.senders,
                         before.senders - senders, fields, plan, tuple(changed))
        if plan is not None and self._dry_run:
            change.plan_change, change.after = self._predict(after, *plan)
        return change

    def _predict(self, user: User, plan: str, limit: int | None) -> tuple[str, User]:
        """What ``plan set`` would do (the Python twin of plan_change.lua, for a dry run)."""
        admin = self._admin
        period = user_period(user, admin.clock.now(), admin.default_tz)
        terms = terms_in_force(user, period.label, admin.policies)
        base = replace(user, plan=terms.plan, custom_limit=terms.custom_limit, pending=None)
        if (terms.plan, terms.custom_limit) == (plan, limit):
            return "unchanged", base
        new_limit = limit if limit is not None else admin.policies.plans[plan].monthly_limit
        if terms.limit is None or new_limit >= terms.limit:
            outcome = "change" if new_limit == terms.limit else "upgrade"
            return outcome, replace(base, plan=plan, custom_limit=limit)
        return "downgrade", replace(base, pending=PendingChange(plan, limit,
                                                                period.following.label))

    # -- claims and writes -----------------------------------------------------------------
    async def _claim(self, changes: Sequence[_Change]) -> dict[int, str]:
        """Claim the addresses new to each change's user; the refused lines (by number)
        with their reason. A refused line's own claims are given back."""
        bulk = self._admin.bulk
        wanted = [(address, c.user_id, c) for c in changes for address in sorted(c.claims)]
        if self._dry_run:
            got = [False] * len(wanted)
        else:
            got = await bulk.claim([(address, user_id) for address, user_id, _ in wanted])
        taken = [address for (address, _, _), made in zip(wanted, got, strict=True)
                 if not made]
        _, found = await bulk.read([], taken)
        owners = dict(zip(taken, found, strict=True))
        owners.update((a, self._owners[a]) for a in taken if a in self._owners)
        refused: dict[int, str] = {}
        for (address, user_id, change), made in zip(wanted, got, strict=True):
            owner = user_id if made else owners[address]
            if owner == user_id or change.row.line in refused:
                continue
            if owner is not None:
                refused[change.row.line] = f"address {address} already belongs to user {owner}"
            elif not self._dry_run:  # claimed, then given back, between the two pipelines
                refused[change.row.line] = (f"address {address} changed hands during the "
                                            "import; import this line again")
        give_back = [(address, user_id) for (address, user_id, change), made
                     in zip(wanted, got, strict=True) if made and change.row.line in refused]
        await bulk.release(give_back)
        return refused

    async def _write(self, changes: Sequence[_Change], attempted: _Attempts) -> None:
        await self._admin.bulk.write(
            [UserWrite(c.user_id, c.before is None, c.fields, c.claims, c.releases)
             for c in changes], index=attempted.created, releases=attempted.releases)
        plan_changes = [c for c in changes if c.plan is not None]
        for start in range(0, len(plan_changes), PLAN_CHANGES_IN_FLIGHT):
            await asyncio.gather(*(self._change_plan(c) for c in
                                   plan_changes[start:start + PLAN_CHANGES_IN_FLIGHT]))

    async def _change_plan(self, change: _Change) -> None:
        assert change.plan is not None
        plan, limit = change.plan
        try:
            result = await self._admin.change_plan(change.user_id, plan, custom_limit=limit,
                                                   by=self._by)
        except AdminError as exc:  # pragma: no cover - the plan and limit were checked
            change.plan_change = f"refused: {exc}"
            return
        change.plan_change = str(result["outcome"])

    def _remember(self, changes: Sequence[_Change]) -> None:
        """A dry run: keep what these changes would have written, for the later lines."""
        for c in changes:
            self._users[c.user_id] = c.after
            self._owners.update((address, c.user_id) for address in c.claims)
            self._owners.update((address, None) for address in c.releases)


def _independent(items: Sequence[Row | Refusal]) -> int:
    """How many of the first items name no id or address that an earlier one names (from
    the lines alone, before anything is read: the later ones wait for the next batch)."""
    seen: set[str] = set()
    for number, item in enumerate(items):
        if isinstance(item, Refusal):
            continue
        names = {"@" + item.email}
        if not isinstance(item.senders, Absent):
            names.update("@" + address for address in item.senders)
        if item.user_id is not None:
            names.add(item.user_id)
        if names & seen:
            return number
        seen |= names
    return len(items)
