"""Bulk onboarding (relay/admin/user_import.py) on a real redis-server: thousands of lines
with bad ones among them, idempotence, updates that take effect, a dry run that writes
nothing and reports what the real run does, addresses never moved from another user, lines
applied in file order whatever the batch size, and two imports racing for one address."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from relay.admin import user_import
from relay.admin.import_summary import ImportSummary
from relay.admin.operations import Admin
from relay.admin.user_import import UserImport
from relay.config.policies import load_policies
from relay.errors import StoreUnavailableError, UnknownSenderError, UserDisabledError
from relay.events.stream import PLAN_CHANGED, EventLog
from relay.identity.accounts import AccountStore, AppPrincipal
from relay.store import keys
from relay.store.client import connect_redis
from tests.conftest import POLICIES, MutableClock, add_user
from tests.replyproxy import ReplyDroppingProxy

HEADER = "email,id,plan,limit,tz,senders,status"


@pytest.fixture
def admin(redis_client: aioredis.Redis, clock: MutableClock) -> Admin:
    return Admin(redis_client, load_policies(POLICIES), clock, "UTC")


async def chunks(text: str, size: int = 4096) -> AsyncIterator[bytes]:
    data = text.encode()
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def run(admin: Admin, text: str, *, fmt: str | None = None, dry_run: bool = False,
              batch_size: int = 500, **options: Any) -> ImportSummary:
    return await UserImport(admin, dry_run=dry_run, batch_size=batch_size, by="test-import",
                            **options).run(chunks(text), fmt)


async def snapshot(redis: aioredis.Redis) -> dict[str, Any]:
    """Every key and its value: what "nothing written" and "nothing changed" compare."""
    found: dict[str, Any] = {}
    async for key in redis.scan_iter(count=1000):
        kind = await redis.type(key)
        if kind == "hash":
            found[key] = await redis.hgetall(key)
        elif kind == "set":
            found[key] = await redis.smembers(key)
        elif kind == "string":
            found[key] = await redis.get(key)
        elif kind == "stream":
            found[key] = await redis.xrange(key)
        else:  # pragma: no cover - the import writes no other type
            raise AssertionError(f"{key}: {kind}")
    return found


def refusals(summary: ImportSummary) -> list[tuple[int, str]]:
    return [(r.line, r.reason or "") for r in summary.refusals]


BAD_LINES = {
    # line number in the file -> (line, the start of the reason)
    101: ("not-an-email,u-x1,free,,,,", "not an email address"),
    502: ("bad1@kw.test,u-x2,gold,,,,", "unknown plan 'gold'"),
    903: ("bad2@kw.test,u-x3,pro,-1,,,", "limit must be a positive whole number"),
    1304: ("bad3@kw.test,u-x4,pro,,Mars/Olympus,,", "unknown time zone 'Mars/Olympus'"),
    1705: ("bad4@kw.test,u-x5,pro,,,,maybe", "status must be active or disabled"),
    2106: ("bad5@kw.test,u x6,pro,,,,", "user id must be"),
    2507: ("bad6@kw.test,u-x7,pro,,,", "6 cells where the header has 7"),
    2908: ("agent0010@kw.test,u-x8,pro,,,,", "address agent0010@kw.test already belongs to "
                                             "user u-0010"),
}


def big_file(count: int = 3000) -> str:
    """A header, then ``count`` users with every kind of field, with BAD_LINES among them."""
    lines = [HEADER]
    n = 0
    while len(lines) < count + 1:
        number = len(lines) + 1
        if number in BAD_LINES:
            lines.append(BAD_LINES[number][0])
            continue
        tz = ("America/Chicago", "Europe/Paris", "")[n % 3]
        plan = ("free", "plus", "pro", "team")[n % 4]
        limit = str(1000 + n) if n % 7 == 0 else ""
        status = "disabled" if n % 11 == 0 else "active"
        lines.append(f"agent{n:04d}@kw.test,u-{n:04d},{plan},{limit},{tz},"
                     f"team{n:04d}@kw.test;alias{n:04d}@kw.test,{status}")
        n += 1
    return "\n".join(lines) + "\n"


async def test_import_thousands_of_lines_refuses_the_bad_ones_by_number(admin, redis_client):
    """3,000 lines: every good one creates its user (record, senders, index entries), every
    bad one is refused with its line number and reason, and a line whose address another
    user owns is refused without a trace (no user, no claim)."""
    summary = await run(admin, big_file())
    assert (summary.lines, summary.created, summary.updated, summary.unchanged,
            summary.refused) == (3000, 2992, 0, 0, 8)
    assert [line for line, _ in refusals(summary)] == sorted(BAD_LINES)
    for (line, reason), (_, expected) in zip(refusals(summary), BAD_LINES.values(),
                                            strict=True):
        assert reason.startswith(expected), (line, reason)
    assert await redis_client.scard(keys.users_index()) == 2992
    accounts = AccountStore(redis_client)
    user = await accounts.get_user("u-0014")
    assert user is not None
    assert (user.email, user.plan, user.custom_limit, user.tz, user.status) == \
        ("agent0014@kw.test", "pro", 1014, "UTC", "active")
    assert user.senders == {"agent0014@kw.test", "team0014@kw.test", "alias0014@kw.test"}
    disabled = await accounts.get_user("u-0011")
    assert disabled is not None and disabled.status == "disabled"
    assert disabled.tz == "UTC" and disabled.custom_limit is None
    for n in (0, 1234, 2991):
        for address in (f"agent{n:04d}@kw.test", f"alias{n:04d}@kw.test"):
            assert await redis_client.get(keys.sender_index(address)) == f"u-{n:04d}"
    assert await accounts.get_user("u-x8") is None
    assert await redis_client.get(keys.sender_index("bad1@kw.test")) is None


async def test_import_twice_the_second_run_is_all_unchanged_and_writes_nothing(
        admin, redis_client):
    """Idempotence: the same file again changes no key, and says so line by line."""
    text = big_file(1200)
    first = await run(admin, text)
    before = await snapshot(redis_client)
    second = await run(admin, text)
    assert (second.created, second.updated, second.unchanged, second.refused) == \
        (0, 0, first.created, first.refused)
    assert refusals(second) == refusals(first)
    assert await snapshot(redis_client) == before


async def test_import_by_email_without_ids_is_idempotent_too(admin, redis_client):
    """Lines without an id find their user by email: created with a generated id once,
    unchanged after."""
    text = "email,plan\n" + "".join(f"a{n}@kw.test,plus\n" for n in range(300))
    first = await run(admin, text)
    assert first.created == 300
    before = await snapshot(redis_client)
    second = await run(admin, text)
    assert (second.created, second.unchanged) == (0, 300)
    assert await snapshot(redis_client) == before
    user = await AccountStore(redis_client).find_user("a7@kw.test")
    assert user is not None and user.id.startswith("u-") and user.plan == "plus"


async def test_import_updates_take_effect(admin, redis_client, clock):
    """An update of plan, limit, tz, status and senders shows as updated, with the fields it
    changes, and takes effect: the new sender resolves to the user, the dropped one to
    nobody, an upgrade applies now, a downgrade waits for the reset (audited, with a
    plan.changed event), a disabled user cannot send."""
    await run(admin, f"{HEADER}\n"
                     "one@kw.test,u-1,free,,UTC,old@kw.test,active\n"
                     "two@kw.test,u-2,pro,,UTC,,active\n"
                     "three@kw.test,u-3,plus,,UTC,,active\n")
    summary = await run(admin, f"{HEADER}\n"
                               "one@kw.test,u-1,pro,,America/Chicago,new@kw.test,active\n"
                               "two@kw.test,u-2,free,,UTC,,active\n"
                               "three@kw.test,u-3,plus,20000,UTC,,disabled\n",
                        keep_changes=True)
    assert (summary.updated, summary.unchanged) == (3, 0)
    assert summary.changes is not None
    assert [(c.user_id, c.fields, c.plan_change) for c in summary.changes] == [
        ("u-1", ("plan", "tz", "senders"), "upgrade"),
        ("u-2", ("plan",), "downgrade"),
        ("u-3", ("limit", "status"), "upgrade")]
    accounts = AccountStore(redis_client)
    app = AppPrincipal("smartplans")
    one = await accounts.resolve_sender(app, "new@kw.test")
    assert (one.id, one.plan, one.tz) == ("u-1", "pro", "America/Chicago")
    with pytest.raises(UnknownSenderError):
        await accounts.resolve_sender(app, "old@kw.test")
    assert admin.view(await admin.find("u-1"))["limit"] == 25_000
    two = await admin.find("u-2")
    assert two.plan == "pro" and two.pending is not None
    assert (two.pending.plan, two.pending.effective_from) == ("free", "2026-12")
    with pytest.raises(UserDisabledError):
        await accounts.resolve_sender(app, "three@kw.test")
    assert admin.view(await admin.find("u-3"))["limit"] == 20_000
    history = await admin.plan_history("u-2")
    assert [(h["by"], h["outcome"], h["new_plan"]) for h in history] == \
        [("test-import", "downgrade", "free")]
    published = await EventLog(redis_client).recent(10, frozenset({PLAN_CHANGED}))
    assert sorted(e.user_id for _, e in published) == ["u-1", "u-2", "u-3"]
    # Asked again, the pending downgrade is what the user is headed for: unchanged.
    again = await run(admin, f"{HEADER}\ntwo@kw.test,u-2,free,,UTC,,active\n")
    assert again.unchanged == 1
    # Back to pro: the pending downgrade is cancelled.
    back = await run(admin, "email,id,plan\ntwo@kw.test,u-2,pro\n", keep_changes=True)
    assert back.changes is not None and back.changes[0].plan_change == "unchanged"
    assert (await admin.find("u-2")).pending is None


async def test_import_columns_left_out_are_left_alone(admin, redis_client):
    """A file with only email and tz changes the tz of an existing user and nothing else:
    plan, custom limit, senders and status stay."""
    await run(admin, f"{HEADER}\none@kw.test,u-1,pro,777,UTC,x@kw.test,disabled\n")
    summary = await run(admin, "email,tz\none@kw.test,Asia/Tokyo\n", keep_changes=True)
    assert summary.changes is not None and summary.changes[0].fields == ("tz",)
    user = await admin.find("u-1")
    assert (user.plan, user.custom_limit, user.tz, user.status, user.senders) == \
        ("pro", 777, "Asia/Tokyo", "disabled", {"one@kw.test", "x@kw.test"})


async def test_import_dry_run_writes_nothing_and_reports_what_the_run_does(
        admin, redis_client):
    """A dry run leaves every key as it was, and its summary (counts, refusals, changes)
    is the real run's, with conflicts between lines of the file included."""
    await add_user(admin.accounts, "owner@kw.test", senders=("taken@kw.test",),
                   user_id="u-owner")
    await run(admin, f"{HEADER}\nkeep@kw.test,u-keep,free,,UTC,moving@kw.test,active\n")
    text = big_file(600) + "\n".join([
        "dup@kw.test,u-dup,free,,,,",
        "dup@kw.test,u-dup,pro,,,,",                    # the same user again: the last wins
        "keep@kw.test,u-keep,free,,UTC,,active",        # gives moving@ back...
        "mover@kw.test,u-mover,free,,,moving@kw.test,",  # ...which this line then takes
        "first@kw.test,u-f1,free,,,shared@kw.test,",
        "second@kw.test,u-f2,free,,,shared@kw.test,",   # refused: u-f1 has it now
        "thief@kw.test,u-thief,free,,,taken@kw.test,",  # refused: u-owner has it
        "nolabel@kw.test,,plus,,,,",
        "nolabel@kw.test,,team,,,,",                    # found by email: an update
    ]) + "\n"
    before = await snapshot(redis_client)
    dry = await run(admin, text, dry_run=True, keep_changes=True)
    assert await snapshot(redis_client) == before
    real = await run(admin, text, keep_changes=True)
    assert dry.dry_run and not real.dry_run
    counts = ("lines", "created", "updated", "unchanged", "refused")
    assert [getattr(dry, c) for c in counts] == [getattr(real, c) for c in counts]
    assert refusals(dry) == refusals(real)
    assert dry.changes is not None and real.changes is not None
    assert [(c.line, c.action, c.fields, c.plan_change) for c in dry.changes] == \
        [(c.line, c.action, c.fields, c.plan_change) for c in real.changes]
    tail = {r.line - 602: r.reason for r in real.refusals if r.line > 602}
    assert tail == {5: "address shared@kw.test already belongs to user u-f1",
                    6: "address taken@kw.test already belongs to user u-owner"}
    assert (await admin.find("u-dup")).plan == "pro"
    assert (await admin.find("moving@kw.test")).id == "u-mover"
    assert (await admin.find("nolabel@kw.test")).plan == "team"
    # The dry run names no id for a user it would create without one; the run does.
    [dry_new] = [c for c in dry.changes if c.email == "nolabel@kw.test" and c.action ==
                 "created"]
    [real_new] = [c for c in real.changes if c.email == "nolabel@kw.test" and c.action ==
                  "created"]
    assert dry_new.user_id is None and real_new.user_id is not None


@pytest.mark.parametrize("batch_size", [1, 2, 3, 500])
async def test_import_lines_apply_in_file_order_whatever_the_batch(admin, redis_client,
                                                                   batch_size):
    """The result does not depend on where batches end: a line sees every earlier line."""
    text = "\n".join([
        HEADER,
        "a@kw.test,u-a,free,,,one@kw.test;two@kw.test,",
        "b@kw.test,u-b,free,,,three@kw.test,",
        "a@kw.test,u-a,plus,,,two@kw.test,",           # drops one@
        "c@kw.test,u-c,free,,,one@kw.test,",           # so c may take it
        "d@kw.test,u-d,free,,,three@kw.test,",         # b still has three@: refused
        "b@kw.test,u-b,free,,,,",                      # b drops three@
        "d@kw.test,u-d,free,,,three@kw.test,",         # now d may have it
    ]) + "\n"
    summary = await run(admin, text, batch_size=batch_size)
    assert (summary.created, summary.updated, summary.refused) == (4, 2, 1)
    assert refusals(summary) == [(6, "address three@kw.test already belongs to user u-b")]
    owners = {a: await redis_client.get(keys.sender_index(a))
              for a in ("one@kw.test", "two@kw.test", "three@kw.test")}
    assert owners == {"one@kw.test": "u-c", "two@kw.test": "u-a", "three@kw.test": "u-d"}
    assert await redis_client.smembers(keys.user_senders("u-b")) == {"b@kw.test"}


async def test_import_refuses_an_address_another_user_owns(admin, redis_client):
    """An address (as email or sender) of another user is refused for that line, never
    moved; a line with an id keeps its email; an id-less line whose email is another user's
    sender is refused. The refused lines leave no claim behind."""
    await add_user(admin.accounts, "owner@kw.test", senders=("shared@kw.test",),
                   user_id="u-owner")
    summary = await run(admin, "\n".join([
        HEADER,
        "new@kw.test,u-new,free,,,fresh@kw.test;shared@kw.test,",
        "owner@kw.test,u-other,free,,,,",
        "shared@kw.test,,free,,,,",
        "renamed@kw.test,u-owner,free,,,,",
    ]) + "\n")
    assert refusals(summary) == [
        (2, "address shared@kw.test already belongs to user u-owner"),
        (3, "address owner@kw.test already belongs to user u-owner"),
        (4, "address shared@kw.test already belongs to user u-owner"),
        (5, "user u-owner has the email owner@kw.test, not renamed@kw.test (an import "
            "does not change a user's email)")]
    for address in ("new@kw.test", "fresh@kw.test"):
        assert await redis_client.get(keys.sender_index(address)) is None
    assert await redis_client.get(keys.sender_index("shared@kw.test")) == "u-owner"
    assert await redis_client.exists(keys.user("u-new"), keys.user("u-other")) == 0


async def test_import_completes_a_user_whose_claims_an_interrupted_run_left(admin,
                                                                            redis_client):
    """An index entry naming the line's own id (a run stopped between claim and write)
    counts as the user's own: the import finishes creating the user."""
    await redis_client.set(keys.sender_index("half@kw.test"), "u-half")
    summary = await run(admin, "email,id\nhalf@kw.test,u-half\n")
    assert summary.created == 1
    assert (await admin.find("half@kw.test")).id == "u-half"


async def test_two_imports_racing_for_one_address_exactly_one_gets_it(admin, redis_client):
    """SET NX decides: of two concurrent imports giving one address to different users,
    one line is imported and the other refused, and the loser keeps no claim."""
    for _ in range(5):
        await redis_client.flushdb()
        first = run(admin, "email,id,senders\nx@kw.test,u-x,prize@kw.test;x2@kw.test\n")
        second = run(admin, "email,id,senders\ny@kw.test,u-y,prize@kw.test;y2@kw.test\n")
        results = await asyncio.gather(first, second)
        assert sorted((r.created, r.refused) for r in results) == [(0, 1), (1, 0)]
        winner = await redis_client.get(keys.sender_index("prize@kw.test"))
        loser = "y" if winner == "u-x" else "x"
        assert await redis_client.exists(keys.sender_index(f"{loser}@kw.test"),
                                         keys.sender_index(f"{loser}2@kw.test"),
                                         keys.user(f"u-{loser}")) == 0


async def test_import_json_lines_and_a_bad_header(admin, redis_client):
    """JSON lines are read by their first line; a CSV header that cannot be used is line
    1's refusal and nothing after it is read."""
    summary = await run(admin, '{"email": "j@kw.test", "id": "u-j", "senders": ["k@kw.test"]}\n'
                               '{"email": "l@kw.test", "plan": "pro", "tz": null}\n')
    assert (summary.format, summary.created) == ("jsonl", 2)
    assert (await admin.find("k@kw.test")).id == "u-j"
    bad = await run(admin, "mail,plan\nm@kw.test,free\n")
    assert (bad.lines, bad.refused, bad.created) == (1, 1, 0)
    assert bad.refusals[0].line == 1 and "unknown column 'mail'" in (bad.refusals[0].reason
                                                                      or "")


async def test_import_summary_lists_at_most_a_thousand_refusals(admin):
    """The summary stays small for any file: the first 1,000 refusals, and how many more."""
    summary = await run(admin, "email\n" + "nope\n" * 1500)
    assert summary.refused == 1500 and len(summary.refusals) == 1000
    assert summary.to_json()["refusals_omitted"] == 500


async def test_import_retries_a_batch_redis_fails_then_stops_and_a_rerun_finishes(
        admin, redis_client, monkeypatch):
    """A batch that Redis fails (here a key of the wrong type, so every attempt fails at
    its reads) is run again RETRIES times, each logged, then the import stops with
    StoreUnavailableError; the batches before it stay written, and once Redis is sound the
    same file finishes the work."""
    monkeypatch.setattr(user_import, "RETRY_FIRST", 0.0)
    await redis_client.set(keys.user_senders("u-3"), "not a set")
    text = "email,id\n" + "".join(f"a{n}@kw.test,u-{n}\n" for n in range(6))
    with capture_logs() as logs, pytest.raises(StoreUnavailableError):
        await run(admin, text, batch_size=2)
    retried = [e for e in logs if e["event"] == "users.import_retried"]
    assert [(e["attempt"], e["first_line"]) for e in retried] == [(1, 4), (2, 4), (3, 4)]
    assert await redis_client.exists(keys.user("u-0"), keys.user("u-1")) == 2
    assert await redis_client.exists(*(keys.user(f"u-{n}") for n in range(2, 6))) == 0
    await redis_client.delete(keys.user_senders("u-3"))
    summary = await run(admin, text, batch_size=2, keep_changes=True)
    assert (summary.created, summary.updated, summary.unchanged) == (4, 0, 2)
    assert summary.changes is not None
    assert [(c.line, c.action) for c in summary.changes] == \
        [(4, "created"), (5, "created"), (6, "created"), (7, "created")]
    assert (await admin.find("a3@kw.test")).senders == {"a3@kw.test"}


async def test_import_a_lost_reply_is_retried_and_reported_as_what_was_done(
        redis_server, redis_client, clock, monkeypatch):
    """Redis runs a batch's writes and the reply is lost (tests/replyproxy.py: a real
    proxy that drops it, then Redis is unreachable until healed; redis-py's own retry
    meets the outage too): the import runs the batch again once Redis is back, finds the
    users written, reports them as created (what this import did, not unchanged) and
    completes the users index."""
    monkeypatch.setattr(user_import, "RETRY_FIRST", 0.0)
    proxy = await ReplyDroppingProxy(redis_server.port).start()
    client = connect_redis(proxy.url, timeout=2)
    try:
        admin = Admin(client, load_policies(POLICIES), clock, "UTC")
        proxy.drop_reply_to(b"local n = tonumber(ARGV[1])")  # write_user.lua's first line

        def heal_on_retry(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
            if event["event"] == "users.import_retried":
                proxy.heal()  # before the retry runs: it then finds Redis back
            return event

        with capture_logs(processors=[heal_on_retry]) as logs:
            summary = await run(admin, "email,id,senders\n"
                                       "a@kw.test,u-a,a2@kw.test\nb@kw.test,u-b,\n")
        assert proxy.dropped.is_set()
        assert [e["attempt"] for e in logs if e["event"] == "users.import_retried"] == [1]
        assert (summary.created, summary.unchanged) == (2, 0)
        assert await redis_client.smembers(keys.users_index()) == {"u-a", "u-b"}
        assert (await admin.find("a2@kw.test")).id == "u-a"
    finally:
        await client.aclose()
        await proxy.close()
