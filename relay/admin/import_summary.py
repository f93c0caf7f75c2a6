"""What a bulk import did, line by line and in sum (``relay/admin/user_import.py``): the
summary that ``command-relay users import --json`` prints and ``POST /v1/user-imports``
answers (``UserImportSummary`` in relay/admin/openapi.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CREATED, UPDATED, UNCHANGED, REFUSED = "created", "updated", "unchanged", "refused"
DETAILS_KEPT = 1000  # refusals (and, when asked, changes) listed in the summary


@dataclass(frozen=True, slots=True)
class LineResult:
    """What happened to one line (``user_id`` is None for a user a dry run would create
    with a generated id)."""

    line: int
    action: str  # created, updated, unchanged, refused
    user_id: str | None = None
    email: str | None = None
    fields: tuple[str, ...] = ()  # what an update changes: plan, limit, tz, status, senders
    plan_change: str | None = None  # upgrade, change, downgrade, unchanged (as `plan set`)
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.action == REFUSED:
            return {"line": self.line, "reason": self.reason}
        found: dict[str, Any] = {"line": self.line, "action": self.action,
                                 "user_id": self.user_id, "email": self.email}
        if self.action == UPDATED:
            found["fields"] = list(self.fields)
        if self.plan_change is not None:
            found["plan_change"] = self.plan_change
        return found


@dataclass(slots=True)
class ImportSummary:
    dry_run: bool
    format: str | None = None
    lines: int = 0  # lines holding a user (neither blank nor the CSV header)
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    refused: int = 0
    refusals: list[LineResult] = field(default_factory=list)  # the first DETAILS_KEPT
    changes: list[LineResult] | None = None  # with keep_changes: the first DETAILS_KEPT
    seconds: float = 0.0

    def count(self, result: LineResult) -> None:
        self.lines += 1
        if result.action == REFUSED:
            self.refused += 1
            if len(self.refusals) < DETAILS_KEPT:
                self.refusals.append(result)
            return
        setattr(self, result.action, getattr(self, result.action) + 1)
        if self.changes is not None and result.action != UNCHANGED \
                and len(self.changes) < DETAILS_KEPT:
            self.changes.append(result)

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "dry_run": self.dry_run, "format": self.format, "lines": self.lines,
            "created": self.created, "updated": self.updated, "unchanged": self.unchanged,
            "refused": self.refused, "refusals": [r.to_json() for r in self.refusals],
            "refusals_omitted": self.refused - len(self.refusals),
            "seconds": round(self.seconds, 3),
            "users_per_second": round(self.lines / self.seconds) if self.seconds else None}
        if self.changes is not None:
            found["changes"] = [c.to_json() for c in self.changes]
            found["changes_omitted"] = self.created + self.updated - len(self.changes)
        return found
