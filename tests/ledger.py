"""The ledger: after a scenario, what every client was told, what the upstream captured and
what Redis counts, compared (the standing suite).

Three sources:

* **the clients**: one ``ClientTxn`` per transaction a load client attempted, with the reply
  to each RCPT and the final reply to DATA (or none, when the connection died);
* **the upstream**: one ``Capture`` per message it accepted (``tests/upstream_proc.py``
  writes them), matched to the client's transaction by its ``X-Ledger-Id`` header, so a
  message delivered twice is seen;
* **Redis**: per user and month, ``used`` and ``delivered`` of the usage hash and the open
  reservations, read through ``relay.quota`` and ``relay.keys``.

The four promises as figures (``LedgerReport``):

* ``lost``: recipients a client was told 250 for (RCPT, then 250 after DATA) that the
  upstream does not have;
* ``uncounted``: recipients the upstream has beyond what Redis counts for the user (``used``);
* ``undelivered``: units Redis counts (``used``) beyond what the upstream has;
* ``over_limit``: recipients the upstream has beyond the user's limit.

and the bookkeeping around them: ``duplicates`` (copies the upstream has more than once,
beyond those ``resent``), ``resent`` (extra copies explained by a resubmission: a client
transaction whose outcome was uncertain, then another with the same ledger id, which the
relay sends again and counts once, docs/resubmission.md; each uncertain attempt explains at
most one copy, and a resent copy is not a send the count must hold),
``unsettled`` (``used`` - ``delivered``: units neither committed nor refunded, which the
open reservations must match), ``unacked_delivered`` (the upstream has a recipient whose
client was refused, or never finished DATA) and ``altered`` (a body that differs).

Without a crash of a relay all of them are 0. When a relay process dies, or the upstream
stops answering after taking a message, some transactions end without a definite outcome:
their accepted recipients are ``in_flight``, and only ``undelivered`` and ``unsettled`` may
be above 0, by at most that (the count may be high by what was in flight, never low). A
RCPT whose reply never came counts as in flight too: the relay may have reserved it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from relay.decisions.quota import QuotaStore
from relay.errors import UpstreamOutcomeUnknownError
from relay.store import keys

# The relay's own reply when the upstream connection died after the message was sent: the
# outcome is unknown to the relay too, so such a transaction is in flight, not refused.
OUTCOME_UNKNOWN = UpstreamOutcomeUnknownError().reply
# The "code" of a RCPT sent whose reply never came (the connection died first): the relay
# may have reserved its unit.
NO_REPLY = 0


@dataclass
class ClientTxn:
    """What one client was told in one transaction (a load client fills it in as it goes)."""

    ledger_id: str
    sender: str
    rcpts: list[tuple[str, int]] = field(default_factory=list)  # (address, reply code)
    data_code: int | None = None      # the reply after the final dot; None: none received
    data_reply: str = ""              # its text, after the code
    dot_sent: bool = False            # the whole message, final dot included, was written
    lost_at: str | None = None        # where the connection died or was dropped, if it did
    relay: str = ""                   # which relay process served it
    body_sha256: str = ""

    @property
    def accepted(self) -> list[str]:
        return [address for address, code in self.rcpts if code == 250]

    @property
    def unanswered(self) -> list[str]:
        return [address for address, code in self.rcpts if code == NO_REPLY]

    @property
    def outcome(self) -> str:
        """``acked`` (250 after DATA), ``refused`` (a definite 4xx/5xx, or the transaction
        never finished DATA and the connection lived), ``uncertain`` (the message was sent
        and no definite reply came back) or ``cut`` (the connection died before the end of
        DATA)."""
        if self.data_code == 250:
            return "acked"
        if self.data_code is not None:
            reply = f"{self.data_code} {self.data_reply}"
            return "uncertain" if reply.startswith(OUTCOME_UNKNOWN) else "refused"
        if self.dot_sent:
            return "uncertain"
        return "cut" if self.lost_at else "refused"


@dataclass(frozen=True)
class Capture:
    """One message the upstream accepted."""

    ledger_id: str | None
    mail_from: str
    rcpt_tos: tuple[str, ...]
    size: int = 0
    body_sha256: str = ""


def capture_of(content: bytes, mail_from: str, rcpt_tos: Iterable[str]) -> Capture:
    """A ``Capture`` of a message an in-process upstream accepted (tests/conftest.py's
    ``Captured``), matched by its ``X-Ledger-Id`` like the upstream process's lines."""
    from tests.upstream_proc import body_digest, ledger_id

    return Capture(ledger_id(content), mail_from, tuple(rcpt_tos), len(content),
                   body_digest(content))


def load_captures(path: Path) -> list[Capture]:
    """The upstream process's JSONL file (a line cut by a kill mid-write is skipped: its 250
    was never sent)."""
    found = []
    if not path.exists():
        return found
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        found.append(Capture(record["ledger_id"], record["mail_from"],
                             tuple(record["rcpt_tos"]), record.get("size", 0),
                             record.get("body_sha256", "")))
    return found


@dataclass(frozen=True)
class LedgerUser:
    id: str
    limit: int
    senders: tuple[str, ...]


@dataclass(frozen=True)
class Counts:
    """What Redis holds for one user, summed over the months of the scenario."""

    used: int
    delivered: int
    open_reservations: int


async def read_counts(redis: aioredis.Redis, users: Iterable[LedgerUser],
                      periods: Iterable[str]) -> dict[str, Counts]:
    """``used``/``delivered`` per user through ``QuotaStore.usage``, and the open
    reservations (every ``keys.reservations(user, *)`` hash, one field per unit)."""
    quota = QuotaStore(redis)
    labels = sorted(set(periods))
    counts = {}
    for user in users:
        used = delivered = 0
        for label in labels:
            usage = await quota.usage(user.id, label)
            used, delivered = used + usage.used, delivered + usage.delivered
        open_units = 0
        async for key in redis.scan_iter(match=keys.reservations(user.id, "*"), count=500):
            open_units += int(await redis.hlen(key))
        counts[user.id] = Counts(used, delivered, open_units)
    return counts


@dataclass
class LedgerReport:
    name: str
    transactions: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    acked_rcpts: int = 0
    upstream_messages: int = 0
    upstream_rcpts: int = 0
    used: int = 0
    delivered: int = 0
    open_reservations: int = 0
    # The four promises.
    lost: int = 0
    uncounted: int = 0
    undelivered: int = 0
    over_limit: int = 0
    # Bookkeeping.
    duplicates: int = 0
    resent: int = 0
    unsettled: int = 0
    unacked_delivered: int = 0
    altered: int = 0
    unknown_captures: int = 0
    in_flight: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for test output and the figures of docs/reliability.md."""
        outcomes = ", ".join(f"{n} {k}" for k, n in sorted(self.outcomes.items()))
        extra = "".join(f" · {k} {v}" for k, v in self.extra.items())
        return (f"ledger {self.name}: {self.transactions} txns ({outcomes or 'none'}), "
                f"{self.acked_rcpts} rcpts acked, upstream {self.upstream_rcpts} rcpts in "
                f"{self.upstream_messages} msgs, redis used {self.used} delivered "
                f"{self.delivered} open {self.open_reservations} | lost {self.lost} · "
                f"uncounted {self.uncounted} · undelivered {self.undelivered} "
                f"(in flight {self.in_flight}) · over-limit {self.over_limit} · "
                f"dup {self.duplicates} · unsettled {self.unsettled} · "
                f"unacked-delivered {self.unacked_delivered} · altered {self.altered}"
                f"{f' · resent {self.resent}' if self.resent else ''}{extra}")

    def problems(self, *, crash: bool = False) -> list[str]:
        """Every broken promise. ``crash``: a relay died (or the upstream stopped answering
        after taking messages), so ``undelivered`` and ``unsettled`` may reach ``in_flight``."""
        bound = self.in_flight if crash else 0
        found = [f"{name} {value}" for name, value in [
            ("lost", self.lost), ("uncounted", self.uncounted),
            ("over-limit", self.over_limit), ("duplicates", self.duplicates),
            ("unacked-delivered", self.unacked_delivered), ("altered", self.altered),
            ("unknown captures", self.unknown_captures)] if value]
        found += [f"{name} {value} > {bound}" for name, value in [
            ("undelivered", self.undelivered), ("unsettled", self.unsettled)] if value > bound]
        if self.open_reservations != self.unsettled:
            found.append(f"open reservations {self.open_reservations} != unsettled "
                         f"{self.unsettled}")
        return found

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Ledger:
    """The users of a scenario (id, limit, sender addresses), and the comparison."""

    def __init__(self, users: Iterable[LedgerUser]) -> None:
        self.users = list(users)
        self._by_sender = {s.lower(): u for u in self.users for s in u.senders}

    def user_of(self, sender: str) -> LedgerUser | None:
        return self._by_sender.get(sender.lower())

    def compare(self, name: str, clients: Iterable[ClientTxn], captures: Iterable[Capture],
                counts: dict[str, Counts]) -> LedgerReport:
        clients = list(clients)
        captures = list(captures)
        report = LedgerReport(name, transactions=len(clients))
        report.outcomes = dict(Counter(t.outcome for t in clients))
        # A ledger id may have several attempts: an app resubmitting the same message.
        by_id: dict[str, list[ClientTxn]] = {}
        for txn in clients:
            by_id.setdefault(txn.ledger_id, []).append(txn)
        report.upstream_messages = len(captures)

        delivered_pairs: Counter[tuple[str | None, str]] = Counter()
        pair_user: dict[tuple[str | None, str], str] = {}
        upstream_by_user: Counter[str] = Counter()
        for capture in captures:
            user = self.user_of(capture.mail_from)
            for rcpt in capture.rcpt_tos:
                delivered_pairs[(capture.ledger_id, rcpt.lower())] += 1
                if user is not None:
                    upstream_by_user[user.id] += 1
                    pair_user[(capture.ledger_id, rcpt.lower())] = user.id
            attempts = by_id.get(capture.ledger_id) if capture.ledger_id else None
            if not attempts:
                report.unknown_captures += 1
                continue
            if any(a.body_sha256 and capture.body_sha256 != a.body_sha256 for a in attempts):
                report.altered += 1
        report.upstream_rcpts = sum(delivered_pairs.values())
        for pair, copies in delivered_pairs.items():
            uncertain = sum(1 for a in by_id.get(pair[0] or "", [])
                            if a.outcome == "uncertain" and pair[1] in
                            {r.lower() for r in a.accepted})
            resent = min(copies - 1, uncertain)
            report.resent += resent
            report.duplicates += copies - 1 - resent
            if pair in pair_user:
                upstream_by_user[pair_user[pair]] -= resent

        for txn in clients:
            outcome = txn.outcome
            accepted = {a.lower() for a in txn.accepted}
            if outcome == "acked":
                report.acked_rcpts += len(accepted)
                report.lost += sum(1 for a in accepted if (txn.ledger_id, a) not in
                                   delivered_pairs)
            if outcome in {"uncertain", "cut"}:
                report.in_flight += len(accepted) + len(txn.unanswered)
        for (ident, rcpt), copies in delivered_pairs.items():
            attempts = by_id.get(ident) if ident else None
            if not attempts:
                continue
            told = any(a.outcome in {"acked", "uncertain"} and rcpt in {
                r.lower() for r in a.accepted} for a in attempts)
            if not told:
                report.unacked_delivered += copies

        for user in self.users:
            count = counts.get(user.id, Counts(0, 0, 0))
            sent = upstream_by_user[user.id]
            report.used += count.used
            report.delivered += count.delivered
            report.open_reservations += count.open_reservations
            report.uncounted += max(0, sent - count.used)
            report.undelivered += max(0, count.used - sent)
            report.over_limit += max(0, sent - user.limit)
            report.unsettled += max(0, count.used - count.delivered)
        return report
