"""The ledger of the fault scenarios (tests/ledger.py): each figure from hand-made client
records, captures and counts, and the Redis side read from a real redis-server."""

from __future__ import annotations

import json
from pathlib import Path

import redis.asyncio as aioredis

from relay.decisions.quota import QuotaStore
from relay.identity.accounts import AccountStore
from tests.conftest import add_user
from tests.ledger import (
    NO_REPLY,
    OUTCOME_UNKNOWN,
    Capture,
    ClientTxn,
    Counts,
    Ledger,
    LedgerReport,
    LedgerUser,
    load_captures,
    read_counts,
)
from tests.upstream_proc import body_digest, ledger_id

USER = LedgerUser("u-1", 10, ("agent@kw.test",))
OTHER = LedgerUser("u-2", 2, ("small@kw.test",))


def acked(ident: str, *rcpts: str, sender: str = "agent@kw.test", sha: str = "") -> ClientTxn:
    return ClientTxn(ident, sender, [(r, 250) for r in rcpts], 250, "2.0.0 OK", True,
                     body_sha256=sha)


def captured(ident: str, *rcpts: str, sender: str = "agent@kw.test",
             sha: str = "") -> Capture:
    return Capture(ident, sender, rcpts, 100, sha)


def compare(clients: list[ClientTxn], captures: list[Capture],
            counts: dict[str, Counts]) -> LedgerReport:
    return Ledger([USER, OTHER]).compare("case", clients, captures, counts)


def test_ledger_all_zero_when_the_three_sources_agree() -> None:
    """Acknowledged, captured and counted alike: every figure 0, no problem, one line."""
    report = compare([acked("a", "x@e.test", "y@e.test"), acked("b", "z@e.test")],
                     [captured("a", "x@e.test", "y@e.test"), captured("b", "z@e.test")],
                     {"u-1": Counts(3, 3, 0)})
    assert report.problems() == []
    assert (report.acked_rcpts, report.upstream_rcpts, report.used) == (3, 3, 3)
    line = report.summary()
    assert "\n" not in line
    assert "lost 0 · uncounted 0 · undelivered 0 (in flight 0) · over-limit 0" in line


def test_ledger_lost_counts_acknowledged_recipients_the_upstream_lacks() -> None:
    """A 250 after DATA whose message (or one of whose recipients) never arrived is lost."""
    report = compare([acked("a", "x@e.test", "y@e.test"), acked("b", "z@e.test")],
                     [captured("a", "x@e.test")], {"u-1": Counts(1, 1, 0)})
    assert report.lost == 2
    assert report.problems() == ["lost 2"]


def test_ledger_uncounted_and_undelivered_compare_used_with_the_upstream() -> None:
    """More delivered than ``used`` is uncounted; more ``used`` than delivered undelivered."""
    clients = [acked("a", "x@e.test", "y@e.test")]
    captures = [captured("a", "x@e.test", "y@e.test")]
    assert compare(clients, captures, {"u-1": Counts(1, 1, 0)}).uncounted == 1
    report = compare(clients, captures, {"u-1": Counts(5, 2, 3)})
    assert (report.undelivered, report.unsettled, report.open_reservations) == (3, 3, 3)
    assert report.problems() == ["undelivered 3 > 0", "unsettled 3 > 0"]


def test_ledger_crash_bound_is_what_was_in_flight() -> None:
    """With a crash, ``undelivered`` and ``unsettled`` may reach the accepted (or unanswered)
    recipients of transactions without a definite outcome, and no more."""
    cut = ClientTxn("c", "agent@kw.test", [("x@e.test", 250), ("y@e.test", NO_REPLY)],
                    lost_at="rcpt")
    unknown = ClientTxn("u", "agent@kw.test", [("z@e.test", 250)], 451,
                        OUTCOME_UNKNOWN.partition(" ")[2], True)
    clients = [cut, unknown, acked("a", "w@e.test")]
    report = compare(clients, [captured("a", "w@e.test")], {"u-1": Counts(4, 1, 3)})
    assert report.in_flight == 3
    assert report.problems(crash=True) == []
    assert report.problems() == ["undelivered 3 > 0", "unsettled 3 > 0"]
    report = compare(clients, [captured("a", "w@e.test")], {"u-1": Counts(5, 1, 4)})
    assert report.problems(crash=True) == ["undelivered 4 > 3", "unsettled 4 > 3"]


def test_ledger_over_limit_counts_deliveries_past_the_users_limit() -> None:
    """The small user's limit is 2: a third delivered recipient is over the limit, even when
    Redis counts it (and so is not uncounted)."""
    clients = [acked("a", "x@e.test", "y@e.test", "z@e.test", sender="small@kw.test")]
    captures = [captured("a", "x@e.test", "y@e.test", "z@e.test", sender="small@kw.test")]
    report = compare(clients, captures, {"u-2": Counts(3, 3, 0)})
    assert (report.over_limit, report.uncounted) == (1, 0)
    assert report.problems() == ["over-limit 1"]


def test_ledger_duplicates_and_unacked_deliveries() -> None:
    """A message captured twice is a duplicate; a recipient refused at RCPT, or a message
    refused at DATA, that the upstream has anyway is an unacknowledged delivery."""
    partly = ClientTxn("p", "agent@kw.test", [("x@e.test", 250), ("no@e.test", 550)], 250,
                       "2.0.0 OK", True)
    refused = ClientTxn("r", "agent@kw.test", [("y@e.test", 250)], 554, "5.6.0 No", True)
    report = compare([acked("a", "w@e.test"), partly, refused],
                     [captured("a", "w@e.test"), captured("a", "w@e.test"),
                      captured("p", "x@e.test", "no@e.test"), captured("r", "y@e.test")],
                     {"u-1": Counts(5, 5, 0)})
    assert (report.duplicates, report.unacked_delivered) == (1, 2)
    assert report.problems() == ["duplicates 1", "unacked-delivered 2"]


def test_ledger_outcomes_of_a_transaction() -> None:
    """250 acked; the relay's outcome-unknown 451, or a dot without a reply, uncertain; a
    connection gone before the dot cut; any other reply refused."""
    assert acked("a", "x@e.test").outcome == "acked"
    unknown = ClientTxn("u", "s", [("x", 250)], 451, OUTCOME_UNKNOWN.partition(" ")[2], True)
    assert unknown.outcome == "uncertain"
    assert ClientTxn("d", "s", [("x", 250)], dot_sent=True, lost_at="dot").outcome == \
        "uncertain"
    assert ClientTxn("b", "s", [("x", 250)], lost_at="body").outcome == "cut"
    timeout = ClientTxn("t", "s", [("x", 250)], 421, "4.4.2 Timeout, closing connection")
    assert timeout.outcome == "refused"
    assert ClientTxn("n", "s", [("x", 550)]).outcome == "refused"


def test_ledger_altered_body_and_unknown_captures() -> None:
    """A body whose digest differs from the client's is altered; a capture whose ledger id
    no client sent is unknown; reservations that do not match used - delivered show."""
    report = compare([acked("a", "x@e.test", sha="s1")],
                     [captured("a", "x@e.test", sha="s2"), captured("zz", "y@e.test")],
                     {"u-1": Counts(2, 2, 1)})
    assert (report.altered, report.unknown_captures) == (1, 1)
    assert report.problems() == ["altered 1", "unknown captures 1",
                                 "open reservations 1 != unsettled 0"]


def test_ledger_captures_file_skips_a_line_cut_by_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "captured.jsonl"
    line = {"ledger_id": "a", "mail_from": "s@e.test", "rcpt_tos": ["x@e.test"], "size": 5,
            "body_sha256": "d"}
    path.write_text(json.dumps(line) + "\n" + json.dumps(line)[:20])
    assert load_captures(path) == [Capture("a", "s@e.test", ("x@e.test",), 5, "d")]
    assert load_captures(tmp_path / "missing.jsonl") == []


def test_ledger_upstream_reads_the_ledger_id_and_digests_the_body() -> None:
    content = b"Subject: s\r\nX-Ledger-Id: L1-2\r\n\r\nX-Ledger-Id: not this\r\nbody\r\n"
    assert ledger_id(content) == "L1-2"
    assert ledger_id(b"Subject: s\r\n\r\nX-Ledger-Id: body\r\n") is None
    assert body_digest(content) == body_digest(b"Other: h\r\n\r\nX-Ledger-Id: not this\r\n"
                                               b"body\r\n")


async def test_ledger_reads_counts_and_open_reservations_from_redis(
        redis_client: aioredis.Redis, accounts: AccountStore) -> None:
    """``read_counts`` sums used and delivered over the months given and counts every unit of
    every open reservation of the user, and nobody else's."""
    user = await add_user(accounts, "agent@kw.test")
    other = await add_user(accounts, "other@kw.test")
    quota = QuotaStore(redis_client)
    limits: list[str | int] = ["free", 5000]
    for period in ("2026-11", "2026-12"):
        await quota.reserve(user.id, period, f"t-{period}", [1, 2], limits)
        await quota.commit(user.id, period, f"t-{period}")
    await quota.reserve(user.id, "2026-12", "open", [1, 2, 3], limits)
    await quota.reserve(other.id, "2026-12", "theirs", 1, limits)
    users = [LedgerUser(user.id, 5000, ("agent@kw.test",)),
             LedgerUser(other.id, 5000, ("other@kw.test",))]
    counts = await read_counts(redis_client, users, ["2026-11", "2026-12", "2026-12"])
    assert counts[user.id] == Counts(7, 4, 3)
    assert counts[other.id] == Counts(1, 0, 1)


def test_ledger_resubmissions_share_a_ledger_id() -> None:
    """An app resubmitting after a lost reply: the attempts share the ledger id. A copy the
    relay sent again after an uncertain attempt is resent (counted once, not a duplicate);
    a copy no uncertain attempt explains is a duplicate; an acknowledged resubmission that
    the relay did not send again leaves one copy."""
    unknown = ClientTxn("m", "agent@kw.test", [("x@e.test", 250)], 451,
                        OUTCOME_UNKNOWN.partition(" ")[2], True)
    resent = compare([unknown, acked("m", "x@e.test")],
                     [captured("m", "x@e.test"), captured("m", "x@e.test")],
                     {"u-1": Counts(1, 1, 0)})
    assert (resent.resent, resent.duplicates, resent.uncounted) == (1, 0, 0)
    assert resent.problems() == []
    assert resent.summary().endswith("altered 0 · resent 1")
    twice = compare([unknown, acked("m", "x@e.test")],
                    [captured("m", "x@e.test")] * 3, {"u-1": Counts(1, 1, 0)})
    assert (twice.resent, twice.duplicates) == (1, 1)
    assert twice.problems() == ["uncounted 1", "duplicates 1"]
    duplicate = compare([acked("m", "x@e.test"), acked("m", "x@e.test")],
                        [captured("m", "x@e.test")], {"u-1": Counts(1, 1, 0)})
    assert duplicate.problems() == []
    sent_twice = compare([acked("m", "x@e.test"), acked("m", "x@e.test")],
                         [captured("m", "x@e.test")] * 2, {"u-1": Counts(2, 2, 0)})
    assert sent_twice.problems() == ["duplicates 1"]
