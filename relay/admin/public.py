"""The public HTTP listener (``RELAY_PUBLIC_LISTEN``, default 127.0.0.1:8026): what recipients
and mail providers reach from outside, through the HTTPS reverse proxy in front of the relay.

Unlike the admin API (relay/admin/api.py: internal, one bearer token) nothing here has a
token of its own: each route authenticates its request itself, a signed link
(relay/identity/signed_links.py) or a provider's signature. The application is built from
route groups (``RouteGroup``), one per feature: one-click unsubscribe
(relay/admin/unsubscribe.py), the provider webhooks (relay/admin/mandrill.py,
relay/admin/command_events.py); a later page adds a group of its own to ``public_groups``.

Every answer carries headers fit for a page nobody should cache, frame or refer from, and no
error text that says more than its status: the paths hold signed tokens, so neither they nor
the access log are ever logged (a route's template is).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import structlog
from aiohttp import web

from relay.admin.command_events import CommandWebhook
from relay.admin.mandrill import MandrillWebhook
from relay.admin.operations import Admin
from relay.admin.unsubscribe import UnsubscribeRoutes
from relay.admin.usage_page import UsagePage
from relay.admin.webhooks import Intake
from relay.config.endpoints import Endpoint
from relay.config.settings import Settings
from relay.decisions.months import Clock
from relay.decisions.suppression import SuppressionStore
from relay.errors import StoreUnavailableError
from relay.identity.accounts import AccountStore
from relay.identity.signed_links import LinkSigner
from relay.observe.metrics import RelayMetrics
from relay.store.client import RedisClient

log = structlog.get_logger()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Small bodies everywhere (a one-click POST is a few bytes); a webhook reads its own, larger
# body itself, with its own limit (relay/admin/webhooks.py, read_body).
MAX_FORM_BYTES = 64 * 1024
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'",
}


class RouteGroup(Protocol):
    """A feature's routes on the public listener."""

    name: str

    def routes(self) -> Iterable[web.RouteDef]: ...


def _route(request: web.Request) -> str:
    """The matched route's template (``/unsubscribe/{token}``), never the path itself."""
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (unknown path, wrong method, body too large): the reason
        # phrase of the status only.
        response = web.Response(status=exc.status, text=f"{exc.reason}\n")
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except StoreUnavailableError:
        log.warning("public.store_unavailable", route=_route(request))
        response = web.Response(status=503, text="Try again later\n",
                                headers={"Retry-After": "60"})
    except Exception:
        log.exception("public.error", route=_route(request), method=request.method)
        response = web.Response(status=500, text="Internal error\n")
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def make_public_app(groups: Iterable[RouteGroup]) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=MAX_FORM_BYTES)
    for group in groups:
        app.add_routes(list(group.routes()))
    return app


def public_groups(settings: Settings, redis: RedisClient, accounts: AccountStore,
                  metrics: RelayMetrics, clock: Clock, admin: Admin,
                  signer: LinkSigner) -> list[RouteGroup]:
    """The relay's route groups; ``signer`` checks the links they open."""
    store = SuppressionStore(redis)
    intake = Intake(redis, store, accounts, metrics, clock)
    mandrill = None
    if settings.mandrill_webhook_key and settings.mandrill_webhook_url:
        mandrill = (settings.mandrill_webhook_key, settings.mandrill_webhook_url)
    return [UnsubscribeRoutes(signer, store, metrics),
            MandrillWebhook(mandrill, intake, metrics),
            CommandWebhook(settings.command_webhook_secret, intake, metrics, clock),
            # The agent's usage page (relay/admin/usage_page.py), opened by a signed link.
            UsagePage(admin, signer)]


class PublicServer:
    """Runs the public application on the relay's event loop next to the SMTP listener."""

    def __init__(self, endpoint: Endpoint, groups: Iterable[RouteGroup],
                 sock: socket.socket | None = None) -> None:
        groups = list(groups)
        self._names = [g.name for g in groups]
        # shutdown_timeout: a stop waits this long for requests under way (a webhook
        # delivery writing its entries), not aiohttp's default minute.
        self._runner = web.AppRunner(make_public_app(groups), access_log=None,
                                     shutdown_timeout=5)
        self._endpoint = endpoint
        # A socket the worker supervisor bound: every worker serves the listener on it.
        self._sock = sock

    async def start(self) -> None:
        """Raises OSError when the address cannot be bound."""
        await self._runner.setup()
        site: web.BaseSite = (
            web.SockSite(self._runner, self._sock) if self._sock is not None
            else web.TCPSite(self._runner, self._endpoint.host, self._endpoint.port))
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        host, port = self._runner.addresses[0][:2]
        log.info("public.listening", listen=f"{host}:{port}", groups=self._names,
                 **({"shared": True} if self._sock is not None else {}))

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        await self._runner.cleanup()
