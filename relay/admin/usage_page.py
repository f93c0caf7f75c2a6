"""The agent's usage page: what "Manage Command Email" in the CRM embeds for one agent.

The CRM asks for a signed, expiring link (``command-relay usage link USER`` or the admin API's
``POST /v1/users/{user}/usage-link``) and shows it in a panel. The token is the only
credential that opens the page: it names one user, and the page shows that user's figures and
no one else's. An expired or altered link gets a 403 page that says which, and nothing more.

The page is rendered on the server (Jinja2, autoescaped; the six-month chart is inline SVG):
no script, no external resource, so it works in a narrow panel and a full window, under a
strict Content-Security-Policy, and the token never leaves in a Referer.

This module builds the view from the usage report (``relay.decisions.usage``, the same one
``command-relay usage`` prints), so the page, the CLI and the API can never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import structlog
from aiohttp import web

from relay.admin.operations import Admin, AdminError
from relay.admin.usage_links import PURPOSE
from relay.config.policies import Policies
from relay.identity.signed_links import LinkSigner, SignedLinkError

log = structlog.get_logger()

CHART_MONTHS = 6
# What the routes are called on the page; a route not named here shows its policy name.
ROUTE_LABELS = {"command": "Command Email", "mailchimp": "MailChimp"}

_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("relay.admin", "templates"),
    autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)

# No script, no external anything; frames allowed, since embedding is the point.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "base-uri 'none'; form-action 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def _count(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def _month_name(label: str, short: bool = False) -> str:
    month = datetime.strptime(label, "%Y-%m")
    return f"{month:%b}" if short else f"{month:%B %Y}"


def _when(moment: datetime) -> str:
    hour = moment.strftime("%I:%M %p").lstrip("0")
    return f"{moment:%B} {moment.day}, {moment.year} at {hour}"


@dataclass(frozen=True, slots=True)
class Bar:
    period: str
    label: str
    month_name: str
    sends: int
    sends_text: str
    plan_label: str
    limit_text: str
    title: str
    current: bool
    x: float
    y: float
    w: float
    h: float
    limit_y: float | None


def _chart(months: list[dict[str, Any]], policies: Policies) -> dict[str, Any]:
    """Bars of delivered sends, oldest first, each with its own month's limit as a dashed
    line when the report knows it (a past month's terms, not today's)."""
    width, height, top, bottom = 300, 130, 8, 18
    scale = max([1, *(m["sends"] for m in months),
                 *(m["limit"] for m in months if m["limit"])])
    slot = width / len(months)
    bars = []
    for i, m in enumerate(months):
        h = (height - top - bottom) * m["sends"] / scale
        limit_y = (None if not m["limit"] else
                   round(height - bottom - (height - top - bottom) * m["limit"] / scale, 1))
        plan = policies.plans.get(m["plan"]) if m["plan"] else None
        bars.append(Bar(
            period=m["period"], label=_month_name(m["period"], short=True),
            month_name=_month_name(m["period"]), sends=m["sends"],
            sends_text=_count(m["sends"]),
            plan_label=plan.title if plan else (m["plan"] or "—"),
            limit_text=_count(m["limit"]),
            title=f"{_month_name(m['period'])}: {m['sends']:,} sends"
                  + (f" of {m['limit']:,}" if m["limit"] else ""),
            current=m["current"], x=round(i * slot + slot * 0.2, 1),
            y=round(height - bottom - h, 1), w=round(slot * 0.6, 1), h=round(h, 1),
            limit_y=limit_y))
    return {"width": width, "height": height, "bars": bars}


def usage_view(report: Mapping[str, Any], policies: Policies, now: datetime) -> dict[str, Any]:
    """What the template shows, every figure formatted, from ``usage_report``'s answer."""
    limit = report["limit"]
    used = report["used"]
    percent = report["percent"]
    plan = policies.plans.get(report["plan"])
    resets = datetime.fromisoformat(report["resets_at"])
    counted = {r.name: r.counted for r in policies.routing.routes.values()}
    routes = [{"name": name, "label": ROUTE_LABELS.get(name, name),
               "counted": counted.get(name, True), "sends_text": _count(report["routes"].get(
                   name, 0))}
              for name in sorted(set(counted) | set(report["routes"]),
                                 key=lambda n: (not counted.get(n, True), n))]
    pending = report.get("pending_change")
    pending_text = None
    if pending:
        to_plan = policies.plans.get(pending["plan"]) if pending.get("plan") else None
        what = (to_plan.title if to_plan else pending.get("plan")) or "no plan"
        pending_text = (f"Your plan changes to {what} on "
                        f"{_month_name(pending['effective_from'])}'s reset"
                        + (f", with a limit of {pending['custom_limit']:,} sends"
                           if pending.get("custom_limit") else "") + ".")
    history = report.get("history", [])[:CHART_MONTHS - 1]
    months = [{"period": report["period"], "sends": report["delivered"], "limit": limit,
               "plan": report["plan"], "current": True}]
    months += [{"period": h["period"], "sends": h["delivered"], "limit": h.get("limit"),
                "plan": h.get("plan"), "current": False} for h in history]
    forecast = report.get("forecast")
    if isinstance(forecast, Mapping):
        forecast = forecast.get("text")
    suppressed = report.get("suppressed")
    if isinstance(suppressed, Mapping):
        suppressed = suppressed.get("total")
    return {
        "email": report["email"], "plan_label": plan.title if plan else report["plan"],
        "limit": limit, "used": used, "used_text": _count(used), "limit_text": _count(limit),
        "remaining_text": _count(report["remaining"]),
        "percent_text": "—" if percent is None else f"{percent:g}%",
        "bar_percent": 0 if percent is None else min(percent, 100),
        "meter_class": ("stop" if percent is not None and percent >= 100 else
                        "warn" if percent is not None and percent >= 80 else ""),
        "resets_text": _when(resets), "tz": report["tz"],
        "forecast_text": forecast or None, "pending_text": pending_text,
        "routes": routes, "notified": [f"{p}%" for p in report["thresholds_notified"]],
        "in_flight_text": _count(report["in_flight"]),
        "suppressed_text": _count(suppressed if isinstance(suppressed, int) else 0),
        "chart": _chart(list(reversed(months)), policies),
        "now_text": _when(now.astimezone(resets.tzinfo)),
    }


def render_usage(report: Mapping[str, Any], policies: Policies, now: datetime) -> str:
    return _TEMPLATES.get_template("usage.html").render(v=usage_view(report, policies, now))


def render_denied(reason: str) -> str:
    return _TEMPLATES.get_template("denied.html").render(reason=reason)


class UsagePage:
    """``GET /usage/{token}`` on the public listener."""

    name = "usage_page"

    def __init__(self, admin: Admin, signer: LinkSigner) -> None:
        self._admin = admin
        self._signer = signer

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/usage/{token}", self.show)]

    def _denied(self, reason: str) -> web.Response:
        log.info("usage_page.denied", reason=reason)
        return web.Response(status=403, text=render_denied(reason), content_type="text/html",
                            headers=HEADERS)

    async def show(self, request: web.Request) -> web.Response:
        try:
            # The relay's clock, like every other decision about time (tests set it).
            payload = self._signer.verify(PURPOSE, request.match_info["token"],
                                          now=self._admin.clock.now().timestamp())
        except SignedLinkError as exc:
            return self._denied(exc.reason)
        user_id = payload.get("u")
        if not isinstance(user_id, str):
            return self._denied("invalid")
        try:
            report = await self._admin.usage(user_id)
        except AdminError:
            # A user removed after the link was made: nothing to show, nothing to reveal.
            return self._denied("invalid")
        html = render_usage(report, self._admin.policies, self._admin.clock.now())
        log.info("usage_page.shown", user_id=user_id)
        return web.Response(text=html, content_type="text/html", headers=HEADERS)
