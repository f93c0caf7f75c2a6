"""``POST /v1/user-imports``, the bulk onboarding endpoint, on the admin API that RelayApp
starts: CSV and NDJSON bodies, the summary it answers, ``dry_run`` and ``changes``, a body
far over the other routes' 64 KiB, and its refusals (every status checked against
relay/admin/openapi.json by tests.admin.test_api.Api)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from relay.config.endpoints import Endpoint
from relay.identity.accounts import AccountStore
from relay.process.wiring import RelayApp
from relay.store import keys
from relay.store.client import connect_redis
from tests.admin.test_api import TOKEN, Api, operation
from tests.conftest import CapturingUpstream, RedisServer, RelayFactory, add_user

PATH = "/v1/user-imports"


@pytest.fixture
async def api(make_relay: RelayFactory, upstream: CapturingUpstream) -> AsyncIterator[Api]:
    app: RelayApp = await make_relay(upstream=upstream, admin_token=TOKEN,
                                     admin_listen=Endpoint("127.0.0.1", 0))
    assert app.admin_server is not None
    async with aiohttp.ClientSession() as session:
        yield Api(session, app.admin_server.port)


async def post(api: Api, body: str, content_type: str = "text/csv",
               params: dict[str, str] | None = None, token: str | None = TOKEN
               ) -> tuple[int, dict[str, object]]:
    """POST the body with its media type; the status (documented, checked) and JSON."""
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with api.session.post(api.base + PATH, data=body.encode(), params=params,
                                headers=headers) as response:
        assert response.content_type == "application/json"
        status, answer = response.status, await response.json()
    _, op = operation("POST", PATH)
    assert str(status) in op["responses"], status
    return status, answer


def csv_body(count: int, plan: str = "plus") -> str:
    return "email,id,plan,tz,senders\n" + "".join(
        f"agent{n:05d}@kw.test,u-{n:05d},{plan},Europe/Paris,team{n:05d}@kw.test\n"
        for n in range(count))


async def test_import_api_csv_body_far_over_64_kib(api, redis_client):
    """5,000 users (about 300 KB, five times client_max_size) in one CSV body: created, and
    the summary says so; sent again, every line is unchanged."""
    body = csv_body(5000)
    assert len(body) > 4 * 64 * 1024
    status, summary = await post(api, body)
    assert status == 200
    assert {k: summary[k] for k in ("dry_run", "format", "lines", "created", "updated",
                                    "unchanged", "refused", "refusals")} == \
        {"dry_run": False, "format": "csv", "lines": 5000, "created": 5000, "updated": 0,
         "unchanged": 0, "refused": 0, "refusals": []}
    assert "changes" not in summary
    assert await redis_client.scard(keys.users_index()) == 5000
    user = await AccountStore(redis_client).find_user("team04999@kw.test")
    assert user is not None and (user.id, user.plan, user.tz) == \
        ("u-04999", "plus", "Europe/Paris")
    status, again = await post(api, body)
    assert (status, again["unchanged"], again["created"]) == (200, 5000, 0)


async def test_import_api_ndjson_with_refusals_and_changes(api, accounts):
    """NDJSON, one object a line; a refused line is listed with its number and reason in a
    200 answer (the other lines are imported); changes=true lists what changed, with the
    outcome of a plan change."""
    await add_user(accounts, "owner@kw.test", senders=("shared@kw.test",), user_id="u-owner",
                   plan="free")
    body = "\n".join(json.dumps(line) for line in [
        {"email": "new@kw.test", "id": "u-new", "plan": "pro"},
        {"email": "thief@kw.test", "senders": ["shared@kw.test"]},
        {"email": "owner@kw.test", "plan": "team"},
        {"email": "bad", "plan": "pro"},
    ]) + "\n"
    status, summary = await post(api, body, "application/x-ndjson",
                                 params={"changes": "true", "by": "billing"})
    assert status == 200
    assert (summary["format"], summary["created"], summary["updated"], summary["refused"]) \
        == ("jsonl", 1, 1, 2)
    assert summary["refusals"] == [
        {"line": 2, "reason": "address shared@kw.test already belongs to user u-owner"},
        {"line": 4, "reason": "not an email address: 'bad'"}]
    assert summary["changes"] == [
        {"line": 1, "action": "created", "user_id": "u-new", "email": "new@kw.test"},
        {"line": 3, "action": "updated", "user_id": "u-owner", "email": "owner@kw.test",
         "fields": ["plan"], "plan_change": "upgrade"}]
    owner = await accounts.get_user("u-owner")
    assert owner is not None and owner.plan == "team"


async def test_import_api_dry_run_writes_nothing(api, redis_client):
    status, summary = await post(api, csv_body(50), params={"dry_run": "true"})
    assert (status, summary["dry_run"], summary["created"]) == (200, True, 50)
    assert await redis_client.dbsize() == 0


@pytest.mark.parametrize(("content_type", "body", "params", "status", "error"), [
    ("application/json", '{"email": "a@kw.test"}', None, 415, "text/csv"),
    ("text/plain", "email\na@kw.test\n", None, 415, "application/x-ndjson"),
    ("text/csv", "", None, 400, "the body is empty"),
    ("text/csv", "email\na@kw.test\n", {"dry_run": "yes"}, 400, "'dry_run' must be true or "
                                                               "false"),
    ("text/csv", "email\na@kw.test\n", {"changes": "1"}, 400, "'changes' must be true"),
])
async def test_import_api_refusals(api, redis_client, content_type, body, params, status,
                                   error):
    """Another media type is 415, an empty body or a bad flag 400; nothing is written."""
    got, answer = await post(api, body, content_type, params=params)
    assert got == status and error in str(answer["error"])
    assert await redis_client.dbsize() == 0


async def test_import_api_needs_the_token(api, redis_client):
    status, answer = await post(api, csv_body(2), token=None)
    assert status == 401 and answer == {"error": "missing or wrong bearer token"}
    assert await redis_client.dbsize() == 0


async def test_import_api_a_bad_header_is_a_refusal_in_a_200(api, redis_client):
    """A CSV header that cannot be used is line 1's refusal; no line after it is read."""
    status, summary = await post(api, "mail,plan\na@kw.test,free\n")
    assert (status, summary["lines"], summary["refused"]) == (200, 1, 1)
    [refusal] = summary["refusals"]
    assert refusal["line"] == 1 and "unknown column 'mail'" in refusal["reason"]
    assert await redis_client.dbsize() == 0


async def test_import_api_redis_down_is_503(make_relay, upstream, tmp_path):
    """With Redis unreachable the import answers 503 (sending it again later finishes it)."""
    server = RedisServer(tmp_path / "doomed-redis")
    server.start()
    client = connect_redis(server.url, timeout=1)
    try:
        app = await make_relay(upstream=upstream, redis=client, admin_token=TOKEN,
                               admin_listen=Endpoint("127.0.0.1", 0))
        async with aiohttp.ClientSession() as session:
            api = Api(session, app.admin_server.port)
            server.stop()
            status, answer = await post(api, csv_body(3))
            assert status == 503 and "Redis" in str(answer["error"])
    finally:
        server.stop()
        await client.aclose()
