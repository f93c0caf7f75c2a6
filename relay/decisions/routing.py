"""The routing decision, pure: which route an app's message takes (STYLE §1 step 4).

The policy types and their file live in ``relay.config.routing``; this module only decides.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config.routing import Route, Routing


@dataclass(frozen=True, slots=True)
class Decision:
    rule: str
    route: Route | None  # None when refused
    refusal: str | None


def choose_route(routing: Routing, *, app: str, preference: str | None,
                 header: str) -> Decision:
    """The first rule that holds for (app, saved preference, X-KW-Route value or "").

    The header only counts for apps whose policy allows it (``route_header``); for the
    others it is treated as absent.
    """
    if not routing.app(app).route_header:
        header = ""
    for rule in routing.rules:
        if rule.matches(app, preference, header.strip().lower()):
            route = routing.routes[rule.route] if rule.route else None
            return Decision(rule.name, route, rule.refuse)
    raise AssertionError("routing.toml has a catch-all rule (checked on load)")

