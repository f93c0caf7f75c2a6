"""The admin HTTP API, started for real by RelayApp next to the SMTP listener: bearer
authentication, every route, the error answers, and relay/admin/openapi.json matching what is
registered and what is answered (every status a test sees must be documented)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import aiosmtplib
import jsonschema
import pytest

from relay.admin.api import make_app, openapi_document
from relay.admin.operations import Admin
from relay.config.endpoints import Endpoint
from relay.config.policies import MAX_MONTHLY_LIMIT
from relay.process.wiring import RelayApp
from relay.store import keys
from relay.store.client import connect_redis
from tests.conftest import (
    PASSWORD,
    POLICIES,
    CapturingUpstream,
    MutableClock,
    RedisServer,
    RelayFactory,
    add_user,
    free_port,
    message,
    smtp_client,
)

TOKEN = "t" * 32
DOCUMENT = openapi_document()
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "options", "head"}


def operation(method: str, path: str) -> tuple[str, dict[str, Any]]:
    """The documented path template and operation serving ``method path``."""
    for template, item in DOCUMENT["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in item:
            return template, item[method.lower()]
    raise AssertionError(f"{method} {path} is not in openapi.json")


@dataclasses.dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


class Api:
    """A client of the running API. Every answer's status is checked against openapi.json."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"

    async def call(self, method: str, path: str, *, token: str | None = TOKEN,
                   json: Any = None, data: str | None = None,
                   params: dict[str, str] | None = None,
                   authorization: str | None = None) -> Reply:
        headers = {}
        if authorization is not None:
            headers["Authorization"] = authorization
        elif token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.session.request(method, self.base + path, json=json, data=data,
                                        params=params, headers=headers) as response:
            assert response.content_type == "application/json"
            reply = Reply(response.status, await response.json(), dict(response.headers))
        template, op = operation(method, path)
        assert str(reply.status) in op["responses"], \
            f"{method} {template} answered {reply.status}, not documented in openapi.json"
        return reply


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


# -- authentication ---------------------------------------------------------------------------
@pytest.mark.parametrize("authorization", [None, f"Bearer {'x' * 32}", f"Bearer {TOKEN}x",
                                           TOKEN, f"Basic {TOKEN}", "Bearer "])
async def test_adminapi_refuses_a_missing_or_wrong_token(api, accounts, authorization):
    """Without the exact bearer token every route answers 401 with WWW-Authenticate, and
    nothing is done (no user created)."""
    for method, path, body in [("GET", "/v1/users", None),
                               ("POST", "/v1/users", {"email": "x@kw.test"}),
                               ("GET", "/v1/users/nobody", None),
                               ("PUT", "/v1/users/nobody/plan", {"plan": "plus"}),
                               ("GET", "/v1/events", None)]:
        reply = await api.call(method, path, json=body, token=None, authorization=authorization)
        assert reply.status == 401
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        assert reply.body == {"error": "missing or wrong bearer token"}
    assert await accounts.list_users() == []


async def test_adminapi_openapi_document_needs_no_token(api, api_relay):
    """/v1/openapi.json is served without a token: relay/admin/openapi.json with this relay's time
    zones filled in (the shipped file already states the shipped plans and password
    length)."""
    reply = await api.call("GET", "/v1/openapi.json", token=None)
    assert reply.status == 200
    assert reply.body == openapi_document(api_relay.policies)
    served = reply.body["components"]["schemas"]
    assert "UTC" in served["NewUser"]["properties"]["tz"]["enum"]
    del served["NewUser"]["properties"]["tz"]["enum"]
    assert reply.body == DOCUMENT


async def test_adminapi_openapi_document_states_this_relays_policies(make_relay, upstream,
                                                                     tmp_path):
    """The served document lists the plans and the password length of the relay's own
    policies (not the shipped ones), so a client validating against it is never refused."""
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    plans = policies / "plans.toml"
    plans.write_text(plans.read_text().replace("[plans.team]", "[plans.gold]")
                     .replace("user_min_length = 12", "user_min_length = 20"))
    app = await make_relay(upstream=upstream, admin_token=TOKEN, policies_dir=policies,
                           admin_listen=Endpoint("127.0.0.1", 0))
    async with aiohttp.ClientSession() as session:
        api = Api(session, app.admin_server.port)
        schemas = (await api.call("GET", "/v1/openapi.json", token=None)).body[
            "components"]["schemas"]
        assert schemas["NewUser"]["properties"]["plan"]["enum"] == \
            ["free", "gold", "plus", "pro"]
        assert schemas["PlanChangeRequest"]["properties"]["plan"]["enum"] == \
            ["free", "gold", "plus", "pro"]
        assert schemas["NewUser"]["properties"]["password"]["minLength"] == 20
        short = await api.call("POST", "/v1/users", json={"email": "a@kw.test",
                                                          "password": "exactly-20-chars-pw"})
        assert short.status == 400 and "at least 20" in short.body["error"]
        long_enough = await api.call("POST", "/v1/users", json={
            "email": "a@kw.test", "password": "exactly-20-chars-pw!"})
        assert long_enough.status == 201


async def test_adminapi_not_started_without_a_token(make_relay, upstream):
    """With admin_token unset there is no admin server and nothing listens on its port."""
    port = free_port()
    app = await make_relay(upstream=upstream, admin_listen=Endpoint("127.0.0.1", port))
    assert app.admin_server is None
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


# -- users --------------------------------------------------------------------------------------
async def test_adminapi_add_user_then_smtp_auth_works(api, api_relay, upstream):
    """POST /v1/users answers 201 with the user (no password in it); the password given
    then works for SMTP AUTH, and the extra sender may be used."""
    reply = await api.call("POST", "/v1/users", json={
        "email": "new@kw.test", "password": "a-long-password", "plan": "plus",
        "tz": "America/Chicago", "senders": ["alias@kw.test"], "id": "u-new"})
    assert reply.status == 201
    user = reply.body
    assert (user["id"], user["email"], user["plan"], user["tz"], user["status"]) == \
        ("u-new", "new@kw.test", "plus", "America/Chicago", "active")
    assert user["limit"] == 10_000 and user["custom_limit"] is None
    assert user["senders"] == ["alias@kw.test", "new@kw.test"]
    assert user["pending"] is None
    assert not any("pass" in key for key in user)
    async with smtp_client(api_relay, login="new@kw.test", password="a-long-password") as c:
        errors, _ = await c.sendmail("alias@kw.test", ["a@example.test"],
                                     message(sender="alias@kw.test"))
    assert errors == {} and len(upstream.messages) == 1
    again = await api.call("POST", "/v1/users", json={"email": "new@kw.test"})
    assert again.status == 409 and "already belongs" in again.body["error"]


async def test_adminapi_add_user_defaults(api):
    """Only an email: the default plan (free, 5,000), the relay's default zone, active."""
    reply = await api.call("POST", "/v1/users", json={"email": "plain@kw.test",
                                                     "custom_limit": 250})
    assert reply.status == 201
    assert (reply.body["plan"], reply.body["tz"], reply.body["limit"],
            reply.body["custom_limit"]) == ("free", "UTC", 250, 250)


async def test_adminapi_lists_and_finds_users_by_id_and_address(api, accounts):
    """GET /v1/users lists everyone; GET /v1/users/{user} takes the id, the email or any
    sender address of the user."""
    first = await add_user(accounts, "one@kw.test", senders=("team@kw.test",))
    second = await add_user(accounts, "two@kw.test", plan="pro")
    listed = await api.call("GET", "/v1/users")
    assert listed.status == 200
    assert sorted(u["email"] for u in listed.body) == ["one@kw.test", "two@kw.test"]
    for ref in (first.id, "one@kw.test", "team@kw.test"):
        found = await api.call("GET", f"/v1/users/{ref}")
        assert found.status == 200 and found.body["id"] == first.id
    found = await api.call("GET", f"/v1/users/{second.id}")
    assert (found.body["plan"], found.body["limit"]) == ("pro", 25_000)


async def test_adminapi_disable_and_enable_control_smtp_auth(api, api_relay, accounts):
    """A disabled user's SMTP AUTH fails (535); enabled again, it works."""
    user = await add_user(accounts)
    reply = await api.call("POST", f"/v1/users/{user.email}/disable")
    assert reply.status == 200 and reply.body["status"] == "disabled"
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
        async with smtp_client(api_relay):
            pass
    assert refused.value.code == 535
    reply = await api.call("POST", f"/v1/users/{user.id}/enable")
    assert reply.status == 200 and reply.body["status"] == "active"
    async with smtp_client(api_relay, password=PASSWORD) as client:
        errors, _ = await client.sendmail("agent@kw.test", ["a@example.test"], message())
    assert errors == {}


# -- usage --------------------------------------------------------------------------------------
async def test_adminapi_usage_for_a_user_and_a_named_month(api, api_relay, accounts,
                                                           redis_client):
    """GET /v1/users/{user}/usage reports the current month (sends counted); ?period=
    names another month."""
    user = await add_user(accounts)
    await redis_client.hset(keys.usage(user.id, "2026-10"), mapping={"used": 7,
                                                                     "delivered": 7})
    async with smtp_client(api_relay) as client:
        await client.sendmail("agent@kw.test", ["a@example.test", "b@example.test"], message())
    now = await api.call("GET", f"/v1/users/{user.email}/usage")
    assert now.status == 200
    assert set(now.body) == set(DOCUMENT["components"]["schemas"]["Usage"]["required"])
    assert (now.body["period"], now.body["used"], now.body["delivered"], now.body["limit"],
            now.body["remaining"]) == ("2026-11", 2, 2, 5000, 4998)
    assert now.body["resets_at"] == "2026-12-01T00:00:00+00:00"
    assert now.body["history"][0] == {"period": "2026-10", "used": 7, "delivered": 7,
                                      "routes": {}, "plan": "free", "custom_limit": None,
                                      "limit": 5000, "terms_source": "fallback"}
    october = await api.call("GET", f"/v1/users/{user.id}/usage", params={"period": "2026-10"})
    assert october.status == 200
    assert (october.body["period"], october.body["used"]) == ("2026-10", 7)


async def test_adminapi_usage_has_the_forecast_and_each_months_own_terms(
        api, api_relay, accounts, redis_client, clock):
    """The usage answer carries the forecast (4,000 of 5,000 delivered by November 15,
    12:00: 5,000 after 18.125 days, November 19) and, for October, the plus plan recorded
    for it (a downgrade to free then took effect in November); the answers match the
    document's Usage schema."""
    user = await add_user(accounts, plan="plus")
    clock.current = datetime(2026, 10, 7, tzinfo=UTC)
    assert (await api.call("PUT", f"/v1/users/{user.id}/plan",
                           json={"plan": "free", "by": "billing"})).status == 200
    clock.current = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
    await redis_client.hset(keys.usage(user.id, "2026-11"),
                            mapping={"used": 4000, "delivered": 4000})
    reply = await api.call("GET", f"/v1/users/{user.id}/usage")
    assert reply.status == 200
    assert reply.body["forecast"] == {
        "limit": 5000, "reaches_at": "2026-11-19T03:00:00+00:00", "date": "2026-11-19",
        "text": "At this pace you will reach your 5,000-send limit around November 19."}
    assert (reply.body["plan"], reply.body["terms_source"]) == ("free", "in_force")
    october = reply.body["history"][0]
    assert (october["period"], october["plan"], october["limit"], october["terms_source"]) \
        == ("2026-10", "plus", 10_000, "recorded")
    schema = {"$ref": "#/components/schemas/Usage", "components": DOCUMENT["components"]}
    jsonschema.validate(reply.body, schema)
    past = await api.call("GET", f"/v1/users/{user.id}/usage", params={"period": "2026-10"})
    assert (past.body["limit"], past.body["forecast"]) == (10_000, None)
    jsonschema.validate(past.body, schema)


async def test_adminapi_usage_of_everyone_highest_percentage_first(api, accounts,
                                                                   redis_client):
    """GET /v1/usage lists every user's current month, highest percentage first."""
    low = await add_user(accounts, "low@kw.test")
    high = await add_user(accounts, "high@kw.test", limit=100)
    await redis_client.hset(keys.usage(low.id, "2026-11"), "used", 10)
    await redis_client.hset(keys.usage(high.id, "2026-11"), "used", 50)
    reply = await api.call("GET", "/v1/usage")
    assert reply.status == 200
    assert [(r["email"], r["percent"]) for r in reply.body] == \
        [("high@kw.test", 50.0), ("low@kw.test", 0.2)]


# -- plans and events -------------------------------------------------------------------------
async def test_adminapi_upgrade_applies_at_once(api, api_relay, accounts, redis_client):
    """A user blocked at 5,000 of 5,000 is upgraded through PUT plan and can send at once."""
    user = await add_user(accounts)
    await redis_client.hset(keys.usage(user.id, "2026-11"), "used", 5000)
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        async with smtp_client(api_relay) as client:
            await client.sendmail("agent@kw.test", ["a@example.test"], message())
    reply = await api.call("PUT", f"/v1/users/{user.email}/plan",
                           json={"plan": "plus", "by": "billing"})
    assert reply.status == 200
    assert reply.body == {"user_id": user.id, "email": user.email, "outcome": "upgrade",
                          "effective_from": "2026-11", "old_plan": "free", "old_limit": 5000,
                          "new_plan": "plus", "new_limit": 10_000, "by": "billing"}
    async with smtp_client(api_relay) as client:
        errors, _ = await client.sendmail("agent@kw.test", ["a@example.test"], message())
    assert errors == {}
    usage = await api.call("GET", f"/v1/users/{user.id}/usage")
    assert (usage.body["used"], usage.body["limit"]) == (5001, 10_000)


async def test_adminapi_downgrade_waits_for_next_month_and_is_audited(api, accounts):
    """A downgrade answers effective_from = next month, shows as pending, and appears in
    the plan history and as a plan.changed event (as does the upgrade before it)."""
    user = await add_user(accounts)
    up = await api.call("PUT", f"/v1/users/{user.id}/plan", json={"plan": "pro"})
    assert (up.status, up.body["outcome"], up.body["by"]) == (200, "upgrade", "api")
    down = await api.call("PUT", f"/v1/users/{user.id}/plan",
                          json={"plan": "free", "by": "support"})
    assert down.status == 200
    assert (down.body["outcome"], down.body["effective_from"], down.body["new_limit"]) == \
        ("downgrade", "2026-12", 5000)
    shown = await api.call("GET", f"/v1/users/{user.id}")
    assert (shown.body["plan"], shown.body["limit"]) == ("pro", 25_000)
    assert shown.body["pending"] == {"plan": "free", "custom_limit": None,
                                     "effective_from": "2026-12"}
    history = await api.call("GET", f"/v1/users/{user.email}/plan/history")
    assert history.status == 200
    assert [(h["by"], h["outcome"], h["old_plan"], h["new_plan"], h["effective_from"])
            for h in history.body] == [("api", "upgrade", "free", "pro", "2026-11"),
                                       ("support", "downgrade", "pro", "free", "2026-12")]
    events = await api.call("GET", "/v1/events", params={"kind": "plan.changed"})
    assert events.status == 200
    assert [(e["kind"], e["user_id"], e["outcome"]) for e in events.body] == \
        [("plan.changed", user.id, "upgrade"), ("plan.changed", user.id, "downgrade")]
    assert all(e["stream_id"] and e["id"] for e in events.body)


async def test_adminapi_events_count_and_kind_filter(api, api_relay, accounts, redis_client):
    """GET /v1/events returns the newest `count` events, oldest first; kind filters."""
    user = await add_user(accounts, limit=10)
    await redis_client.hset(keys.usage(user.id, "2026-11"),
                            mapping={"used": 7, "delivered": 7})  # 7 sent already
    async with smtp_client(api_relay) as client:
        await client.sendmail("agent@kw.test", ["a@example.test"], message())  # 80 %
    await api.call("PUT", f"/v1/users/{user.id}/plan", json={"plan": "plus"})
    everything = await api.call("GET", "/v1/events")
    assert [e["kind"] for e in everything.body] == ["quota.threshold", "plan.changed"]
    newest = await api.call("GET", "/v1/events", params={"count": "1"})
    assert [e["kind"] for e in newest.body] == ["plan.changed"]
    thresholds = await api.call("GET", "/v1/events", params={"kind": "quota.threshold"})
    assert [(e["percent"], e["used"]) for e in thresholds.body] == [(80, 8)]


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/v1/users/nobody@kw.test", None),
    ("POST", "/v1/users/nobody/disable", None),
    ("POST", "/v1/users/nobody/enable", None),
    ("GET", "/v1/users/nobody/usage", None),
    ("PUT", "/v1/users/nobody/plan", {"plan": "plus"}),
    ("GET", "/v1/users/nobody/plan/history", None),
])
async def test_adminapi_unknown_user_is_404(api, method, path, body):
    """Every per-user route answers 404 with an error naming the user."""
    reply = await api.call(method, path, json=body)
    assert reply.status == 404
    assert "nobody" in reply.body["error"]


@pytest.mark.parametrize(("method", "path", "data"), [
    ("POST", "/v1/users", "{not json"),
    ("POST", "/v1/users", ""),
    ("POST", "/v1/users", '["a list"]'),
    ("PUT", "/v1/users/agent@kw.test/plan", "plus"),
    ("PUT", "/v1/users/agent@kw.test/plan", '"plus"'),
])
async def test_adminapi_body_not_a_json_object_is_400(api, accounts, method, path, data):
    """A body that is not JSON, or JSON but not an object, is refused with 400."""
    await add_user(accounts)
    reply = await api.call(method, path, data=data)
    assert reply.status == 400
    assert reply.body == {"error": "the body must be a JSON object"}


@pytest.mark.parametrize(("method", "path", "body", "error"), [
    ("POST", "/v1/users", {"email": "x@kw.test", "pasword": "typo"}, "unknown field 'pasword'"),
    ("POST", "/v1/users", {"plan": "free"}, "'email' is required"),
    ("POST", "/v1/users", {"email": 5}, "'email' must be of type str"),
    ("POST", "/v1/users", {"email": "x@kw.test", "custom_limit": "10"},
     "'custom_limit' must be of type int"),
    ("POST", "/v1/users", {"email": "x@kw.test", "custom_limit": True},
     "'custom_limit' must be of type int"),
    ("POST", "/v1/users", {"email": "x@kw.test", "custom_limit": 0}, "positive"),
    ("POST", "/v1/users", {"email": "x@kw.test", "senders": "a@kw.test"},
     "'senders' must be of type list"),
    ("POST", "/v1/users", {"email": "x@kw.test", "senders": [1]}, "'senders' must be a list"),
    ("POST", "/v1/users", {"email": "x@kw.test", "plan": "gold"}, "unknown plan 'gold'"),
    ("POST", "/v1/users", {"email": "x@kw.test", "tz": "Mars/Base"}, "unknown time zone"),
    ("PUT", "/v1/users/agent@kw.test/plan", {"plan": "plus", "when": "now"},
     "unknown field 'when'"),
    ("PUT", "/v1/users/agent@kw.test/plan", {}, "'plan' is required"),
    ("PUT", "/v1/users/agent@kw.test/plan", {"plan": 3}, "'plan' must be of type str"),
    ("PUT", "/v1/users/agent@kw.test/plan", {"plan": "plus", "custom_limit": 1.5},
     "'custom_limit' must be of type int"),
    ("PUT", "/v1/users/agent@kw.test/plan", {"plan": "plus", "by": ["x"]},
     "'by' must be of type str"),
    ("PUT", "/v1/users/agent@kw.test/plan", {"plan": "gold"}, "unknown plan 'gold'"),
])
async def test_adminapi_refused_fields_are_400(api, accounts, method, path, body, error):
    """Unknown fields, missing or wrongly typed fields and bad values answer 400 with an
    error that says what is wrong; nothing changes."""
    await add_user(accounts)
    reply = await api.call(method, path, json=body)
    assert reply.status == 400
    assert error in reply.body["error"]
    users = await accounts.list_users()
    assert [(u.email, u.plan, u.pending) for u in users] == [("agent@kw.test", "free", None)]


@pytest.mark.parametrize(("method", "field"), [("PUT", "custom_limit"), ("POST", "custom_limit")])
@pytest.mark.parametrize("limit", [776287861482925568, MAX_MONTHLY_LIMIT + 1, 2**63, 1e300])
async def test_adminapi_limit_beyond_what_lua_counts_exactly_is_400_and_changes_nothing(
        api, accounts, redis_client, method, field, limit):
    """A custom limit over 2**53 / 100 (what reserve.lua counts exactly) is refused with 400
    at PUT plan and POST users, naming the bound; nothing is stored, no audit entry or event
    is written, and the plan history still answers 200."""
    user = await add_user(accounts)
    if method == "PUT":
        reply = await api.call("PUT", f"/v1/users/{user.id}/plan",
                               json={"plan": "plus", field: limit})
    else:
        reply = await api.call("POST", "/v1/users", json={"email": "new@kw.test", field: limit})
    assert reply.status == 400
    assert f"at most {MAX_MONTHLY_LIMIT:,}" in reply.body["error"]
    assert [(u.email, u.plan, u.custom_limit) for u in await accounts.list_users()] == \
        [("agent@kw.test", "free", None)]
    assert await redis_client.xlen(keys.audit(user.id)) == 0
    assert await redis_client.xlen(keys.events()) == 0
    history = await api.call("GET", f"/v1/users/{user.id}/plan/history")
    assert (history.status, history.body) == (200, [])


async def test_adminapi_the_highest_limit_is_stored_and_read_back_exactly(api, accounts):
    """The bound itself is accepted and comes back exactly from the plan change, the user,
    the usage report and the audit trail (the Lua step does not round it)."""
    user = await add_user(accounts)
    reply = await api.call("PUT", f"/v1/users/{user.id}/plan",
                           json={"plan": "plus", "custom_limit": MAX_MONTHLY_LIMIT, "by": "b"})
    assert (reply.status, reply.body["new_limit"]) == (200, MAX_MONTHLY_LIMIT)
    assert (await api.call("GET", f"/v1/users/{user.id}")).body["limit"] == MAX_MONTHLY_LIMIT
    usage = await api.call("GET", f"/v1/users/{user.id}/usage")
    assert usage.body["limit"] == MAX_MONTHLY_LIMIT
    [entry] = (await api.call("GET", f"/v1/users/{user.id}/plan/history")).body
    assert entry["new_limit"] == MAX_MONTHLY_LIMIT


@pytest.mark.parametrize(("body", "error"), [
    ({"plan": "plus", "by": None}, "'by' must be of type str"),
    ({"plan": None}, "'plan' must be of type str"),
    ({"plan": "plus", "custom_limit": 10.5}, "'custom_limit' must be of type int or null"),
])
async def test_adminapi_null_only_where_the_document_allows_it(api, accounts, body, error):
    """``null`` is refused for a field whose schema is a plain string ("by", "plan"); it is
    accepted for custom_limit, whose schema allows it (the plan's own limit), and 5.0 is
    the integer 5."""
    user = await add_user(accounts)
    reply = await api.call("PUT", f"/v1/users/{user.id}/plan", json=body)
    assert (reply.status, reply.body["error"]) == (400, error)
    assert (await accounts.get_user(user.id)).plan == "free"
    ok = await api.call("PUT", f"/v1/users/{user.id}/plan",
                        json={"plan": "plus", "custom_limit": None, "by": "x"})
    assert (ok.status, ok.body["new_limit"]) == (200, 10_000)
    whole = await api.call("PUT", f"/v1/users/{user.id}/plan",
                           json={"plan": "plus", "custom_limit": 20000.0})
    assert (whole.status, whole.body["new_limit"]) == (200, 20_000)


async def test_adminapi_taken_address_or_id_is_409(api, accounts):
    """POST /v1/users for an address or id another user holds answers 409 (documented), not
    400: the request was well formed."""
    user = await add_user(accounts)
    for body in ({"email": "AGENT@kw.test"}, {"email": "x@kw.test", "id": user.id},
                 {"email": "y@kw.test", "senders": ["agent@kw.test"]}):
        reply = await api.call("POST", "/v1/users", json=body)
        assert reply.status == 409, body
    assert len(await accounts.list_users()) == 1


@pytest.mark.parametrize("body", [
    {"email": " agent@kw.test"}, {"email": "agent@kw.test\n"}, {"email": "a b@kw.test"},
    {"email": "agent@kw.test", "id": ""}, {"email": "agent@kw.test", "id": "x\n"},
    {"email": "agent@kw.test", "tz": "posixrules"}, {"email": "agent@kw.test\u00a0"},
])
async def test_adminapi_values_the_document_refuses_are_400(api, accounts, body):
    """What the document's patterns and enums refuse (spaces around an address, a trailing
    newline, an empty id, a zone name outside the list) the server refuses too, and
    creates nothing."""
    reply = await api.call("POST", "/v1/users", json=body)
    assert reply.status == 400, reply.body
    assert await accounts.list_users() == []


async def test_adminapi_body_with_a_lone_surrogate_or_nan_is_400(api, accounts):
    """JSON text that is not text (a lone \\ud800) or not JSON (NaN) is refused with 400."""
    for data in ('{"email": "a\\ud800@kw.test"}', '{"email": "a@kw.test", "custom_limit": NaN}'):
        reply = await api.call("POST", "/v1/users", data=data)
        assert reply.status == 400, data
    assert await accounts.list_users() == []


@pytest.mark.parametrize("period", ["2026-13", "november", "2026/11", "", "2026-00",
                                    "1969-12", "3000-01", "\u0662\u0660\u0662\u0666-11",
                                    "2026-11\n"])
async def test_adminapi_bad_period_is_400(api, accounts, period):
    """?period= that is not a YYYY-MM month is refused with 400."""
    await add_user(accounts)
    reply = await api.call("GET", "/v1/users/agent@kw.test/usage", params={"period": period})
    assert reply.status == 400
    assert "YYYY-MM" in reply.body["error"]


@pytest.mark.parametrize("count", ["0", "1001", "-5", "ten", "1.5", "1_0", " 5", "\u0665"])
async def test_adminapi_events_count_out_of_range_is_400(api, count):
    """count must be an integer from 1 to 1000."""
    reply = await api.call("GET", "/v1/events", params={"count": count})
    assert reply.status == 400
    assert "'count'" in reply.body["error"]


async def test_adminapi_body_over_64_kib_is_413(api, accounts):
    """A body over client_max_size is refused with 413, as JSON like every error."""
    await add_user(accounts)
    for method, path in [("POST", "/v1/users"), ("PUT", "/v1/users/agent@kw.test/plan")]:
        reply = await api.call(method, path, json={"plan": "plus", "by": "x" * 70_000})
        assert reply.status == 413 and "error" in reply.body
    assert len(await accounts.list_users()) == 1


async def test_adminapi_unknown_path_and_wrong_method_answer_json(api):
    """aiohttp's own refusals keep the API's error shape: 404 for an unknown path, 405 (with
    Allow) for a method a path does not take; both still need the token first."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with api.session.get(api.base + "/v1/nothing", headers=headers) as response:
        assert (response.status, await response.json()) == (404, {"error": "Not Found"})
    async with api.session.delete(api.base + "/v1/users", headers=headers) as response:
        assert response.status == 405
        assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}
        assert (await response.json()) == {"error": "Method Not Allowed"}
    async with api.session.get(api.base + "/v1/nothing") as response:
        assert response.status == 401


async def test_adminapi_redis_down_is_503(make_relay, upstream, tmp_path):
    """With Redis unreachable every route that needs it answers 503 (and says so)."""
    server = RedisServer(tmp_path / "doomed-redis")
    server.start()
    client = connect_redis(server.url, timeout=1)
    try:
        app = await make_relay(upstream=upstream, redis=client, admin_token=TOKEN,
                               admin_listen=Endpoint("127.0.0.1", 0))
        async with aiohttp.ClientSession() as session:
            api = Api(session, app.admin_server.port)
            assert (await api.call("GET", "/v1/users")).status == 200
            server.stop()
            for method, path, body in [
                    ("GET", "/v1/users", None),
                    ("POST", "/v1/users", {"email": "x@kw.test"}),
                    ("GET", "/v1/users/agent@kw.test", None),
                    ("POST", "/v1/users/agent@kw.test/disable", None),
                    ("GET", "/v1/users/agent@kw.test/usage", None),
                    ("PUT", "/v1/users/agent@kw.test/plan", {"plan": "plus"}),
                    ("GET", "/v1/users/agent@kw.test/plan/history", None),
                    ("GET", "/v1/usage", None),
                    ("GET", "/v1/events", None)]:
                reply = await api.call(method, path, json=body)
                assert (method, path, reply.status) == (method, path, 503)
                assert "Redis" in reply.body["error"]
            assert (await api.call("GET", "/v1/openapi.json", token=None)).status == 200
    finally:
        server.stop()
        await client.aclose()


# -- the OpenAPI description ------------------------------------------------------------------
def _registered(redis_client, clock: MutableClock, policies) -> set[tuple[str, str]]:
    app = make_app(Admin(redis_client, policies, clock, "UTC"), TOKEN)
    # aiohttp registers a HEAD route next to every GET by itself; it is not part of the API.
    return {(route.method, route.resource.canonical) for route in app.router.routes()
            if route.resource is not None and route.method != "HEAD"}


def _documented() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in DOCUMENT["paths"].items()
            for method in item if method in HTTP_METHODS}


async def test_adminapi_openapi_paths_match_the_registered_routes(redis_client, clock,
                                                                  api_relay):
    """Every route make_app registers is documented with the same method, and every
    documented path and method is registered."""
    registered = _registered(redis_client, clock, api_relay.policies)
    assert len(registered) == 18
    assert registered == _documented()


def test_adminapi_openapi_documents_auth_and_unavailable_on_every_guarded_route():
    """Each operation but the description documents 401 and 503; each $ref resolves."""
    for path, item in DOCUMENT["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            if path == "/v1/openapi.json":
                assert op["security"] == [] and set(op["responses"]) == {"200"}
                continue
            assert {"401", "503"} <= set(op["responses"]), (method, path)
            assert any(code.startswith("2") for code in op["responses"]), (method, path)
    text = str(DOCUMENT)
    for ref in set(re.findall(r"'\$ref': '#/([^']+)'", text)):
        node: Any = DOCUMENT
        for part in ref.split("/"):
            node = node[part]
        assert node, ref
