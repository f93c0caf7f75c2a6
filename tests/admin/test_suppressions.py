"""The suppression list through the admin API (``/v1/suppressions``), on a relay started by
RelayApp against the real redis-server: add, replace, list, remove, import (streamed, with
line-numbered refusals) and export, the export read back by the import, every refusal, and
every answer's status documented in openapi.json."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from relay.admin.suppressions import IMPORT_BATCH, MAX_REFUSALS_LISTED
from relay.config.endpoints import Endpoint
from relay.decisions.suppression import SuppressionReason, SuppressionStore
from relay.process.wiring import RelayApp
from relay.store import keys
from relay.store.client import connect_redis
from tests.admin.test_api import TOKEN, Api, operation
from tests.conftest import CapturingUpstream, RedisServer, RelayFactory, add_user

NOW = "2026-11-15T12:00:00+00:00"  # the test clock's
HEADER = "address,scope,reason,source,time\n"


@pytest.fixture
async def api_relay(make_relay: RelayFactory, upstream: CapturingUpstream) -> RelayApp:
    app: RelayApp = await make_relay(upstream=upstream, admin_token=TOKEN,
                                     admin_listen=Endpoint("127.0.0.1", 0))
    return app


@pytest.fixture
async def api(api_relay: RelayApp) -> AsyncIterator[Api]:
    assert api_relay.admin_server is not None
    async with aiohttp.ClientSession() as session:
        yield Api(session, api_relay.admin_server.port)


async def export(api: Api, user: str | None = None) -> tuple[int, str]:
    """GET /v1/suppressions/export: (status, body); a 200 is text/csv, as documented."""
    params = {"user": user} if user is not None else None
    async with api.session.get(api.base + "/v1/suppressions/export", params=params,
                               headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        _, op = operation("GET", "/v1/suppressions/export")
        assert str(response.status) in op["responses"]
        if response.status == 200:
            assert response.content_type == "text/csv"
        return response.status, await response.text()


async def import_csv(api: Api, body: str | bytes) -> Any:
    return await api.call("POST", "/v1/suppressions/import", data=body)


async def test_suppressions_add_list_and_remove(api, accounts, redis_client):
    """POST adds an entry to the global list or a user's (named by id or email) and answers
    201 with it; the same address again replaces it (200, the latest reason wins); GET lists
    the global list then each user's, or one scope with ?user= (`*`: global); DELETE takes
    an address off one list and answers the entry removed."""
    user = await add_user(accounts)
    added = await api.call("POST", "/v1/suppressions",
                           json={"address": "Bounced@Example.test", "reason": "bounce"})
    assert (added.status, added.body) == (201, {
        "address": "bounced@example.test", "scope": "*", "reason": "bounce", "source": "api",
        "time": NOW})
    mine = await api.call("POST", "/v1/suppressions", json={
        "address": "left@example.test", "reason": "unsubscribe", "user": "agent@kw.test",
        "source": "command"})
    assert (mine.status, mine.body["scope"], mine.body["source"]) == (201, user.id, "command")
    again = await api.call("POST", "/v1/suppressions", json={
        "address": "bounced@example.test", "reason": "complaint", "user": "*"})
    assert (again.status, again.body["reason"]) == (200, "complaint")

    everything = await api.call("GET", "/v1/suppressions")
    assert everything.status == 200
    assert [(e["scope"], e["address"], e["reason"]) for e in everything.body] == [
        ("*", "bounced@example.test", "complaint"),
        (user.id, "left@example.test", "unsubscribe")]
    for ref in (user.id, "AGENT@kw.test"):
        only = await api.call("GET", "/v1/suppressions", params={"user": ref})
        assert [e["address"] for e in only.body] == ["left@example.test"]
    glob = await api.call("GET", "/v1/suppressions", params={"user": "*"})
    assert [e["address"] for e in glob.body] == ["bounced@example.test"]

    # Taken off the user's list only: the same address elsewhere stays.
    await api.call("POST", "/v1/suppressions", json={"address": "left@example.test",
                                                     "reason": "bounce"})
    removed = await api.call("DELETE", "/v1/suppressions/LEFT@example.test",
                             params={"user": user.id})
    assert (removed.status, removed.body["scope"], removed.body["reason"]) == \
        (200, user.id, "unsubscribe")
    gone = await api.call("DELETE", "/v1/suppressions/left@example.test",
                          params={"user": user.id})
    assert gone.status == 404 and "not on the list of user" in gone.body["error"]
    store = SuppressionStore(redis_client)
    assert await store.get("left@example.test", user_id=user.id) is None
    assert (await store.get("left@example.test", user_id=None)) is not None
    # No ?user=: the global list.
    assert (await api.call("DELETE", "/v1/suppressions/left@example.test")).status == 200
    assert await store.get("left@example.test", user_id=None) is None


async def test_suppressions_delete_takes_any_address_in_the_path(api):
    """An address with characters that need escaping in a path ('/', '%', '?', '+') is
    removed by its percent-encoded form."""
    address = "a/b%c?d+e@example.test"
    assert (await api.call("POST", "/v1/suppressions",
                           json={"address": address, "reason": "manual"})).status == 201
    async with api.session.delete(
            api.base + "/v1/suppressions/a%2Fb%25c%3Fd%2Be@example.test",
            headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 200
        assert (await response.json())["address"] == address
    assert (await api.call("GET", "/v1/suppressions")).body == []


@pytest.mark.parametrize(("body", "status", "error"), [
    ({"address": "nobody", "reason": "bounce"}, 400, "not an email address: 'nobody'"),
    ({"address": " a@x.test", "reason": "bounce"}, 400, "not an email address"),
    ({"address": "a" * 250 + "@x.test", "reason": "bounce"}, 400, "over 254 characters"),
    ({"address": "a@x.test", "reason": "spam"}, 400, "unknown reason 'spam'; reasons: "
                                                     "unsubscribe, complaint, bounce, manual"),
    ({"address": "a@x.test"}, 400, "'reason' is required"),
    ({"reason": "bounce"}, 400, "'address' is required"),
    ({"address": "a@x.test", "reason": "bounce", "scope": "*"}, 400, "unknown field 'scope'"),
    ({"address": "a@x.test", "reason": "bounce", "source": ""}, 400, "source must be"),
    ({"address": "a@x.test", "reason": "bounce", "source": "a b"}, 400, "source must be"),
    ({"address": "a@x.test", "reason": "bounce", "source": None}, 400, "'source' must be"),
    ({"address": "a@x.test", "reason": "bounce", "user": 7}, 400, "'user' must be"),
    ({"address": "a@x.test", "reason": "bounce", "user": "nobody@kw.test"}, 404,
     "no user 'nobody@kw.test'"),
])
async def test_suppressions_add_refusals_change_nothing(api, redis_client, body, status, error):
    """A bad address, reason, source or field is 400 and an unknown user 404, each with an
    error saying what is wrong; nothing is written."""
    reply = await api.call("POST", "/v1/suppressions", json=body)
    assert reply.status == status
    assert error in reply.body["error"]
    assert await redis_client.keys("relay:supp*") == []


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/suppressions"),
                                              ("DELETE", "/v1/suppressions/a@x.test")])
async def test_suppressions_unknown_user_is_404(api, method, path):
    reply = await api.call(method, path, params={"user": "nobody"})
    assert (reply.status, reply.body) == (404, {"error": "no user 'nobody'"})
    status, text = await export(api, "nobody")
    assert status == 404 and "no user 'nobody'" in text


def _import_file(lines: int, bad_every: int, user_id: str) -> tuple[str, dict[int, str]]:
    """A CSV of ``lines`` entries (half global, half the user's) where every
    ``bad_every``-th line is broken in turn in one of several ways; the bad line numbers
    (the header is line 1) with the error each must get."""
    breakages = [("not-an-address", "*", "bounce", "", "", "not an email address"),
                 ("{n}@x.test", "nobody", "bounce", "", "", "scope: no user 'nobody'"),
                 ("{n}@x.test", "*", "spam", "", "", "unknown reason 'spam'"),
                 ("{n}@x.test", "*", "bounce", "", "last tuesday", "time is not ISO-8601"),
                 ("{n}@x.test", "", "bounce", "", "", "scope is empty")]
    rows, bad = [HEADER], {}
    for n in range(lines):
        number = n + 2
        if n % bad_every == bad_every - 1:
            *fields, error = breakages[len(bad) % len(breakages)]
            rows.append(",".join(fields).format(n=n) + "\n")
            bad[number] = error
        else:
            scope = "*" if n % 2 else user_id
            rows.append(f"r{n}@x.test,{scope},bounce,provider,2026-11-0{1 + n % 9}T00:00:00Z\n")
    return "".join(rows), bad


async def test_suppressions_import_of_thousands_of_lines_lists_the_bad_ones(
        api, accounts, redis_client):
    """A 3,000-line import (over 64 KiB: the body is streamed, not refused as too large, and
    written in several batches) adds every good line and refuses every bad one with its
    line number and the reason; the summary adds up."""
    user = await add_user(accounts)
    body, bad = _import_file(3000, 97, user.id)
    assert len(body) > 64 * 1024 and 3000 > 2 * IMPORT_BATCH
    reply = await import_csv(api, body)
    assert reply.status == 200
    good = 3000 - len(bad)
    assert (reply.body["added"], reply.body["replaced"], reply.body["refused"],
            reply.body["refusals_not_listed"]) == (good, 0, len(bad), 0)
    assert [r["line"] for r in reply.body["refusals"]] == sorted(bad)
    for refusal in reply.body["refusals"]:
        assert bad[refusal["line"]] in refusal["error"], refusal
    stored = (await redis_client.hlen(keys.global_suppressions())
              + await redis_client.hlen(keys.suppressions(user.id)))
    assert stored == good
    entry = await SuppressionStore(redis_client).get("r3@x.test", user_id=None)
    assert entry is not None
    assert (entry.reason, entry.source, entry.at) == (SuppressionReason.BOUNCE, "provider",
                                                      1_793_750_400)  # 2026-11-04

    # Idempotent: the same file again replaces what it added and leaves the same list.
    before = (await api.call("GET", "/v1/suppressions")).body
    again = await import_csv(api, body)
    assert (again.body["added"], again.body["replaced"], again.body["refused"]) == \
        (0, good, len(bad))
    assert (await api.call("GET", "/v1/suppressions")).body == before


async def test_suppressions_export_read_back_by_import_gives_the_same_list(
        api, accounts, redis_client):
    """The export of every list (global first, then each user's) imported into an emptied
    store gives the same list and the same export, reasons, sources and times included;
    ?user= exports one list."""
    first = await add_user(accounts, "one@kw.test")
    second = await add_user(accounts, "two@kw.test")
    await import_csv(api, HEADER
                     + "a@x.test,*,bounce,mandrill,2026-01-02T03:04:05Z\n"
                     + f"b@x.test,{first.id},unsubscribe,one-click,2026-02-03T04:05:06Z\n"
                     + "c@x.test,two@kw.test,complaint,,\n"
                     + f'"d,q""uoted@x.test",{second.id},manual,cli,2026-03-04T00:00:00Z\n')
    status, text = await export(api)
    assert status == 200
    assert text.splitlines()[0] == HEADER.strip()
    assert f"c@x.test,{second.id},complaint,import,{NOW}" in text.splitlines()
    assert f'"d,q""uoted@x.test",{second.id},manual,cli,2026-03-04T00:00:00+00:00' in \
        text.splitlines()
    listed = (await api.call("GET", "/v1/suppressions")).body
    assert len(listed) == 4

    for key in await redis_client.keys("relay:supp*"):
        await redis_client.delete(key)
    assert (await api.call("GET", "/v1/suppressions")).body == []
    summary = await import_csv(api, text)
    assert summary.body == {"added": 4, "replaced": 0, "refused": 0, "refusals": [],
                            "refusals_not_listed": 0}
    assert (await api.call("GET", "/v1/suppressions")).body == listed
    assert (await export(api))[1] == text

    status, one = await export(api, "one@kw.test")
    assert (status, one) == (200, HEADER + f"b@x.test,{first.id},unsubscribe,one-click,"
                             "2026-02-03T04:05:06+00:00\n")
    assert (await export(api, "*"))[1] == HEADER + "a@x.test,*,bounce,mandrill," \
        "2026-01-02T03:04:05+00:00\n"


@pytest.mark.parametrize(("body", "error"), [
    ("", "the file is empty"),
    ("a@x.test,*,bounce,,\n", "line 1 is not a header row address,scope,reason,source,time"),
    ("address,reason\na@x.test,bounce\n", "line 1 is not a header row"),
    (b"\xff\xfe\n", "line 1: not UTF-8 text"),
])
async def test_suppressions_import_without_the_header_row_writes_nothing(
        api, redis_client, body, error):
    """A file whose first line is not the header row is refused whole (400): nothing is
    written, not even its good lines."""
    reply = await import_csv(api, body)
    assert reply.status == 400 and error in reply.body["error"]
    assert await redis_client.keys("relay:supp*") == []


async def test_suppressions_import_refusals_are_listed_up_to_a_bound(api, redis_client):
    """With more refused lines than MAX_REFUSALS_LISTED, the first ones are listed and the
    rest counted; blank lines, a BOM and CRLF line ends are no refusals."""
    many = MAX_REFUSALS_LISTED + 5
    body = "\ufeff" + HEADER.replace("\n", "\r\n") + "\r\n" + "bad\r\n" * many \
        + "ok@x.test,*,manual,,\r\n"
    reply = await import_csv(api, body.encode())
    assert (reply.body["added"], reply.body["refused"], reply.body["refusals_not_listed"]) == \
        (1, many, 5)
    assert len(reply.body["refusals"]) == MAX_REFUSALS_LISTED
    assert reply.body["refusals"][0] == {"line": 3, "error": "expected 5 fields "
                                         "(address,scope,reason,source,time), got 1"}
    assert await redis_client.hkeys(keys.global_suppressions()) == ["ok@x.test"]


async def test_suppressions_routes_need_the_token(api, redis_client):
    """Without the bearer token every suppression route is 401 and nothing is written."""
    for method, path, body in [("GET", "/v1/suppressions", None),
                               ("POST", "/v1/suppressions", {"address": "a@x.test",
                                                             "reason": "bounce"}),
                               ("DELETE", "/v1/suppressions/a@x.test", None),
                               ("POST", "/v1/suppressions/import", None),
                               ("GET", "/v1/suppressions/export", None)]:
        reply = await api.call(method, path, json=body, token=None)
        assert reply.status == 401, (method, path)
    assert await redis_client.keys("relay:supp*") == []


async def test_suppressions_redis_down_is_503(make_relay, upstream, tmp_path):
    """With Redis unreachable every suppression route answers 503."""
    server = RedisServer(tmp_path / "doomed-redis")
    server.start()
    client = connect_redis(server.url, timeout=1)
    try:
        app = await make_relay(upstream=upstream, redis=client, admin_token=TOKEN,
                               admin_listen=Endpoint("127.0.0.1", 0))
        async with aiohttp.ClientSession() as session:
            api = Api(session, app.admin_server.port)
            assert (await api.call("GET", "/v1/suppressions")).status == 200
            server.stop()
            for method, path, body, data in [
                    ("GET", "/v1/suppressions", None, None),
                    ("POST", "/v1/suppressions", {"address": "a@x.test", "reason": "bounce"},
                     None),
                    ("DELETE", "/v1/suppressions/a@x.test", None, None),
                    ("POST", "/v1/suppressions/import", None, HEADER + "a@x.test,*,bounce,,\n"),
                    ("GET", "/v1/suppressions/export", None, None)]:
                reply = await api.call(method, path, json=body, data=data)
                assert (method, path, reply.status) == (method, path, 503)
                assert "Redis" in reply.body["error"]
    finally:
        server.stop()
        await client.aclose()
