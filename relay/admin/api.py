"""The admin HTTP API for the billing system and operators (aiohttp; described by
``relay/admin/openapi.json``, served at ``/v1/openapi.json``).

Bound to loopback by default; every route but the description needs
``Authorization: Bearer <RELAY_ADMIN_TOKEN>``. The API is off when no token is configured.
"""

from __future__ import annotations

import hmac
import json
import re
import socket
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any

import structlog
from aiohttp import web

from relay.admin.import_rows import CSV, JSON_LINES
from relay.admin.operations import Admin, AdminError
from relay.admin.suppressions import SuppressionOps, entry_view
from relay.admin.usage_links import DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS
from relay.admin.user_import import UserImport
from relay.config.endpoints import Endpoint
from relay.config.policies import EVENT_KINDS, Policies
from relay.config.zones import time_zone_names
from relay.decisions.months import PERIOD_PATTERN
from relay.errors import StoreUnavailableError

log = structlog.get_logger()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_PERIOD = re.compile(PERIOD_PATTERN)
_INTEGER = re.compile(r"^-?[0-9]{1,12}$(?!\n)")
ADMIN_KEY = web.AppKey("admin", Admin)
TOKEN_KEY = web.AppKey("token", str)


def openapi_document(policies: Policies | None = None) -> dict[str, Any]:
    """relay/admin/openapi.json; with ``policies``, as this relay serves it: the plans, the time
    zones and the minimum password length it accepts filled in, so that the document states
    every constraint the server enforces (and nothing it does not)."""
    text = files("relay.admin").joinpath("openapi.json").read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    if policies is not None:
        schemas = document["components"]["schemas"]
        plans = sorted(policies.plans)
        schemas["NewUser"]["properties"]["plan"]["enum"] = plans
        schemas["PlanChangeRequest"]["properties"]["plan"]["enum"] = plans
        schemas["NewUser"]["properties"]["tz"]["enum"] = sorted(time_zone_names())
        schemas["NewUser"]["properties"]["password"]["minLength"] = \
            policies.passwords.user_min_length
    return document


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path != "/v1/openapi.json":
        supplied = request.headers.get("Authorization", "")
        expected = "Bearer " + request.app[TOKEN_KEY]
        if not hmac.compare_digest(supplied.encode(), expected.encode()):
            log.warning("admin.unauthorized", path=request.path, peer=request.remote)
            refusal = _error(401, "missing or wrong bearer token")
            refusal.headers["WWW-Authenticate"] = 'Bearer realm="command-relay"'
            return refusal
    try:
        response = await handler(request)
    except AdminError as exc:
        return _error(404 if exc.not_found else 409 if exc.conflict else 400, str(exc))
    except StoreUnavailableError:
        return _error(503, "Redis is unreachable, try again")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (unknown path, wrong method, body over client_max_size)
        # answer JSON too, like every other error of the API.
        refusal = _error(exc.status, exc.reason)
        if "Allow" in exc.headers:
            refusal.headers["Allow"] = exc.headers["Allow"]
        return refusal
    log.info("admin.request", method=request.method, path=request.path,
             status=response.status)
    return response


def _not_json(constant: str) -> Any:
    # Python's json reads NaN and Infinity, which JSON does not have.
    raise ValueError(constant)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.text(), parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError):
        raise AdminError("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise AdminError("the body must be a JSON object")
    try:
        # JSON's \ud800 escapes can spell lone surrogates, which no text (nor Redis) holds.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise AdminError("the body holds a lone surrogate (\\ud800-\\udfff): not text") from None
    return body


def _field(body: dict[str, Any], name: str, kind: type, *, required: bool = False,
           nullable: bool = False) -> Any:
    """``body[name]`` checked against its schema type. An absent field is None; ``null`` is
    refused unless the schema allows it (``nullable``). An integer may be written 5.0 (JSON
    does not tell them apart)."""
    if name not in body or (nullable and body[name] is None):
        if required:
            raise AdminError(f"{name!r} is required")
        return None
    value = body[name]
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AdminError(f"{name!r} must be of type {kind.__name__}"
                         + (" or null" if nullable else ""))
    return value


def _check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise AdminError(f"unknown field {unknown[0]!r}")


def _admin(request: web.Request) -> Admin:
    return request.app[ADMIN_KEY]


async def list_users(request: web.Request) -> web.Response:
    admin = _admin(request)
    return web.json_response([admin.view(u) for u in await admin.accounts.list_users()])


async def add_user(request: web.Request) -> web.Response:
    body = await _json_body(request)
    _check_fields(body, {"email", "plan", "tz", "custom_limit", "password", "senders", "id"})
    senders = _field(body, "senders", list) or []
    if not all(isinstance(s, str) for s in senders):
        raise AdminError("'senders' must be a list of addresses")
    admin = _admin(request)
    user = await admin.add_user(
        _field(body, "email", str, required=True), plan=_field(body, "plan", str),
        tz=_field(body, "tz", str),
        custom_limit=_field(body, "custom_limit", int, nullable=True),
        password=_field(body, "password", str), senders=tuple(senders),
        user_id=_field(body, "id", str))
    return web.json_response(admin.view(user), status=201)


async def get_user(request: web.Request) -> web.Response:
    admin = _admin(request)
    return web.json_response(admin.view(await admin.find(request.match_info["user"])))


async def _set_status(request: web.Request, *, active: bool) -> web.Response:
    admin = _admin(request)
    user = await admin.set_status(request.match_info["user"], active=active)
    return web.json_response(admin.view(user))


async def disable_user(request: web.Request) -> web.Response:
    return await _set_status(request, active=False)


async def enable_user(request: web.Request) -> web.Response:
    return await _set_status(request, active=True)


async def get_usage(request: web.Request) -> web.Response:
    period = request.query.get("period")
    if period is not None and not _PERIOD.match(period):
        # Checked before the user is looked up: a malformed request is 400 for anyone.
        raise AdminError(f"period must look like YYYY-MM, a month from 1970-01 to 2999-12, "
                         f"got {period!r}")
    report = await _admin(request).usage(request.match_info["user"], period)
    return web.json_response(report)


async def usage_link(request: web.Request) -> web.Response:
    body = await _json_body(request)
    _check_fields(body, {"ttl_seconds"})
    ttl = _field(body, "ttl_seconds", int)
    ttl = DEFAULT_TTL_SECONDS if ttl is None else ttl
    if not 1 <= ttl <= MAX_TTL_SECONDS:
        raise AdminError(f"'ttl_seconds' must be between 1 and {MAX_TTL_SECONDS}")
    return web.json_response(await _admin(request).usage_link(request.match_info["user"], ttl))


async def all_usage(request: web.Request) -> web.Response:
    return web.json_response(await _admin(request).usage_all())


async def set_plan(request: web.Request) -> web.Response:
    body = await _json_body(request)
    _check_fields(body, {"plan", "custom_limit", "by"})
    result = await _admin(request).change_plan(
        request.match_info["user"], _field(body, "plan", str, required=True),
        custom_limit=_field(body, "custom_limit", int, nullable=True),
        by=_field(body, "by", str) or "api")
    return web.json_response(result)


async def plan_history(request: web.Request) -> web.Response:
    return web.json_response(await _admin(request).plan_history(request.match_info["user"]))


async def list_events(request: web.Request) -> web.Response:
    text = request.query.get("count", "100")
    # Digits only: Python's int() would also take " 5", "1_0" and other scripts' digits.
    if not _INTEGER.match(text):
        raise AdminError("'count' must be an integer")
    count = int(text)
    if not 1 <= count <= 1000:
        raise AdminError("'count' must be between 1 and 1000")
    kind = request.query.get("kind")
    if kind is not None and kind not in EVENT_KINDS:
        raise AdminError(f"'kind' must be one of {', '.join(EVENT_KINDS)}")
    found = await _admin(request).events.recent(count, frozenset({kind}) if kind else None)
    return web.json_response([{"stream_id": stream_id, **json.loads(event.to_json())}
                              for stream_id, event in found])


# -- the suppression list (relay/admin/suppressions.py) ---------------------------------------
# Request bodies of an import are read as a stream, CHUNK bytes at a time (client_max_size
# applies to whole-body reads only), so a long file is never held in memory.
_IMPORT_CHUNK = 64 * 1024


async def list_suppressions(request: web.Request) -> web.Response:
    entries = await SuppressionOps(_admin(request)).listing(request.query.get("user"))
    return web.json_response([entry_view(e) for e in entries])


async def add_suppression(request: web.Request) -> web.Response:
    body = await _json_body(request)
    _check_fields(body, {"address", "user", "reason", "source"})
    entry, created = await SuppressionOps(_admin(request)).add(
        _field(body, "address", str, required=True), user=_field(body, "user", str),
        reason=_field(body, "reason", str, required=True),
        source=_field(body, "source", str) if "source" in body else "api")
    return web.json_response(entry_view(entry), status=201 if created else 200)


async def remove_suppression(request: web.Request) -> web.Response:
    entry = await SuppressionOps(_admin(request)).remove(
        request.match_info["address"], user=request.query.get("user"))
    return web.json_response(entry_view(entry))


async def import_suppressions(request: web.Request) -> web.Response:
    summary = await SuppressionOps(_admin(request)).import_csv(
        request.content.iter_chunked(_IMPORT_CHUNK))
    return web.json_response(summary.as_dict())


async def export_suppressions(request: web.Request) -> web.Response:
    # Built whole before the answer starts: a Redis failure half-way is a 503, never a
    # truncated file that looks complete.
    text = "".join([chunk async for chunk in
                    SuppressionOps(_admin(request)).export_csv(request.query.get("user"))])
    return web.Response(text=text, content_type="text/csv", charset="utf-8")


_IMPORT_FORMATS = {"text/csv": CSV, "application/x-ndjson": JSON_LINES}


def _flag(request: web.Request, name: str) -> bool:
    text = request.query.get(name, "false")
    if text not in ("true", "false"):
        raise AdminError(f"{name!r} must be true or false")
    return text == "true"


async def import_users(request: web.Request) -> web.Response:
    """Bulk onboarding (relay/admin/user_import.py): the body is read as it arrives, a
    batch of lines at a time, so its size is not limited by client_max_size."""
    fmt = _IMPORT_FORMATS.get(request.content_type)
    if fmt is None:
        return _error(415, "send the users as text/csv (a header row, then a user a line) "
                           "or application/x-ndjson (a JSON object a line)")
    dry_run, changes = _flag(request, "dry_run"), _flag(request, "changes")
    if not request.body_exists:
        raise AdminError("the body is empty: send the users, a user a line")
    run = UserImport(_admin(request), dry_run=dry_run, by=request.query.get("by") or "api",
                     keep_changes=changes)
    summary = await run.run(request.content.iter_chunked(_IMPORT_CHUNK), fmt)
    return web.json_response(summary.to_json())


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(_admin(request).policies))


def make_app(admin: Admin, token: str) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=64 * 1024)
    app[ADMIN_KEY] = admin
    app[TOKEN_KEY] = token
    app.add_routes([
        web.get("/v1/openapi.json", openapi),
        web.get("/v1/users", list_users),
        web.post("/v1/users", add_user),
        web.post("/v1/user-imports", import_users),
        web.get("/v1/users/{user}", get_user),
        web.post("/v1/users/{user}/disable", disable_user),
        web.post("/v1/users/{user}/enable", enable_user),
        web.get("/v1/users/{user}/usage", get_usage),
        web.post("/v1/users/{user}/usage-link", usage_link),
        web.put("/v1/users/{user}/plan", set_plan),
        web.get("/v1/users/{user}/plan/history", plan_history),
        web.get("/v1/usage", all_usage),
        web.get("/v1/events", list_events),
        web.get("/v1/suppressions", list_suppressions),
        web.post("/v1/suppressions", add_suppression),
        # An address has an "@": the path of a DELETE is never /import or /export (whose
        # Allow header would then name DELETE too).
        web.delete("/v1/suppressions/{address:[^/]*@[^/]*}", remove_suppression),
        web.post("/v1/suppressions/import", import_suppressions),
        web.get("/v1/suppressions/export", export_suppressions),
    ])
    return app


class AdminServer:
    """Runs the API on the relay's event loop next to the SMTP listener."""

    def __init__(self, admin: Admin, token: str, endpoint: Endpoint,
                 sock: socket.socket | None = None) -> None:
        self._runner = web.AppRunner(make_app(admin, token), access_log=None)
        self._endpoint = endpoint
        # A socket the worker supervisor bound: every worker serves the API on it.
        self._sock = sock
        self._site: web.BaseSite | None = None

    async def start(self) -> None:
        await self._runner.setup()
        if self._sock is not None:
            self._site = web.SockSite(self._runner, self._sock)
        else:
            self._site = web.TCPSite(self._runner, self._endpoint.host, self._endpoint.port)
        await self._site.start()
        host, port = self._runner.addresses[0][:2]
        log.info("admin_api.listening", listen=f"{host}:{port}",
                 **({"shared": True} if self._sock is not None else {}))

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        await self._runner.cleanup()
