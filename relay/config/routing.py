"""Routing: which upstream carries a message, and whether it is counted (STYLE §1 step 4).

``choose_route`` is a pure function of the routing policy (``policies/routing.toml``), the
sending app, the user's saved preference and the ``X-KW-Route`` header: no I/O, so it is
tested with plain tables and explained by ``command-relay route explain``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from relay.config.sources import PolicyError, TomlSource

ROUTING_FILE = "routing.toml"
ANY_HEADER = "*"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    counted: bool
    upstream: str  # "default" or "setting"
    credentials: str  # "upstream" or "user"
    pass_headers: tuple[str, ...]  # lower-case prefixes
    failover: str | None
    # Optional per-route overrides of RELAY_UPSTREAM_POOL_SIZE / RELAY_UPSTREAM_TIMEOUT
    # (pool_size is per user for routes with the user's own credentials).
    pool_size: int | None = None
    timeout: float | None = None


class UnsubscribePolicy(Enum):
    """What the relay does about an app's one-click unsubscribe headers (RFC 8058), carried
    out by relay/smtp/unsubscribe.py: nothing, log them missing, refuse without them, or
    add them."""

    OFF = "off"
    CHECKS = "checks"
    REFUSES = "refuses"
    ADDS = "adds"


@dataclass(frozen=True, slots=True)
class AppPolicy:
    name: str
    timeline: bool
    route_header: bool
    unsubscribe: UnsubscribePolicy = UnsubscribePolicy.OFF

    @property
    def decided_at_data(self) -> bool:
        """Whether this app's messages wait for their headers before anything is decided."""
        return self.timeline or self.route_header


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    apps: frozenset[str] | None
    header: str | None  # None: any; "": absent; "*": present with any value
    preference: str | None
    route: str | None
    refuse: str | None

    def matches(self, app: str, preference: str | None, header: str) -> bool:
        if self.apps is not None and app not in self.apps:
            return False
        if self.header is not None:
            if self.header == ANY_HEADER:
                if not header:
                    return False
            elif self.header != header:
                return False
        return self.preference is None or self.preference == preference


@dataclass(frozen=True, slots=True)
class Routing:
    routes: Mapping[str, Route]
    apps: Mapping[str, AppPolicy]
    rules: tuple[Rule, ...]

    def app(self, name: str) -> AppPolicy:
        """The policy of ``name``; an app not listed is treated like a direct user login."""
        return self.apps.get(name) or AppPolicy(name, timeline=False, route_header=False)

    def stripped_prefixes(self, route: Route) -> tuple[str, ...]:
        """Header prefixes another route passes and ``route`` does not: removed on it."""
        others = {p for r in self.routes.values() if r is not route for p in r.pass_headers}
        return tuple(sorted(others - set(route.pass_headers)))


def _unsubscribe_policy(source: TomlSource, table: str,
                        fields: Mapping[str, str]) -> UnsubscribePolicy:
    """The optional ``unsubscribe`` key of an app ("off" when absent)."""
    try:
        return UnsubscribePolicy(fields.get("unsubscribe", "off"))
    except ValueError:
        raise source.error(table, "unsubscribe",
                           'must be "off", "checks", "refuses" or "adds"') from None


def load_routing(source: TomlSource) -> Routing:
    """Validate ``routing.toml``; raises PolicyError naming file, line and key."""
    data = source.data
    for section in data:
        if section not in {"routes", "apps", "rules"}:
            raise source.error(section, None, "unknown section")
    for section, kind in (("routes", dict), ("apps", dict), ("rules", list)):
        if not isinstance(data.get(section), kind):
            raise PolicyError(f"{source.path}: missing section [{section}]")

    routes: dict[str, Route] = {}
    for name, body in data["routes"].items():
        table = f"routes.{name}"
        if not isinstance(body, dict):
            raise source.error("routes", name, "expected a table")
        optional = {k: v for k, v in body.items() if k in ("pool_size", "timeout_seconds")}
        required = {k: v for k, v in body.items() if k not in optional}
        f = source.table(required, table, {"counted": bool, "upstream": str, "credentials": str,
                                       "pass_headers": list, "failover": str})
        limits = source.table(optional, table, {k: t for k, t in (("pool_size", int),
                                                                   ("timeout_seconds", float))
                                                if k in optional})
        for key, value in limits.items():
            if value <= 0:
                raise source.error(table, key, "must be greater than 0")
        if f["upstream"] not in {"default", "setting"}:
            raise source.error(table, "upstream", 'must be "default" or "setting"')
        if f["credentials"] not in {"upstream", "user"}:
            raise source.error(table, "credentials", 'must be "upstream" or "user"')
        if not all(isinstance(h, str) and h for h in f["pass_headers"]):
            raise source.error(table, "pass_headers", "must be a list of header prefixes")
        routes[name] = Route(name, f["counted"], f["upstream"], f["credentials"],
                             tuple(h.lower() for h in f["pass_headers"]), f["failover"] or None,
                             limits.get("pool_size"), limits.get("timeout_seconds"))
    defaults = [r.name for r in routes.values() if r.upstream == "default"]
    if len(defaults) != 1:
        # Point at the second default route, if any: the first one is usually the intended one.
        at_table, at_key = (f"routes.{defaults[1]}", "upstream") if len(defaults) > 1 \
            else ("routes", None)
        raise source.error(at_table, at_key, 'exactly one route must have upstream = "default"')
    for route in routes.values():
        if route.failover is not None and (route.failover not in routes
                                           or route.failover == route.name):
            raise source.error(f"routes.{route.name}", "failover",
                               f"must name another route, got {route.failover!r}")
        if route.failover is not None and routes[route.failover].counted != route.counted:
            # Otherwise an unreachable (or mis-credentialed) uncounted route would quietly
            # turn a user's sends into counted ones, or the other way round.
            raise source.error(f"routes.{route.name}", "failover",
                               "must name a route that is counted the same way")

    apps: dict[str, AppPolicy] = {}
    for name, body in data["apps"].items():
        if not isinstance(body, dict):
            raise source.error("apps", name, "expected a table")
        table = f"apps.{name}"
        optional = {k: v for k, v in body.items() if k == "unsubscribe"}
        f = source.table({k: v for k, v in body.items() if k not in optional}, table,
                         {"timeline": bool, "route_header": bool})
        unsubscribe = source.table(optional, table, {"unsubscribe": str} if optional else {})
        apps[name] = AppPolicy(name, f["timeline"], f["route_header"],
                               _unsubscribe_policy(source, table, unsubscribe))

    rules: list[Rule] = []
    for index, body in enumerate(data["rules"]):
        where = source.nth("rules", index)
        if not isinstance(body, dict):
            raise where.error(None, "expected a table")
        f = where.fields(body, required={"name": str},
                         optional={"apps": list, "header": str, "preference": str,
                                   "route": str, "refuse": str})
        if ("route" in f) == ("refuse" in f):
            raise where.error(None, "give exactly one of route or refuse")
        if not all(isinstance(app, str) for app in f.get("apps", [])):
            raise where.error("apps", "must be a list of app names")
        if "route" in f and f["route"] not in routes:
            raise where.error("route", f"no route named {f['route']!r}")
        for app in f.get("apps", []):
            if app not in apps:
                raise where.error("apps", f"no app named {app!r} under [apps]")
        if f.get("preference") is not None and f["preference"] not in routes:
            raise where.error("preference", f"no route named {f['preference']!r}")
        header = f.get("header")
        if header not in (None, "", ANY_HEADER) and header not in routes:
            raise where.error("header", 'must be a route name, "" (absent) or "*" (any)')
        rules.append(Rule(f["name"], frozenset(f["apps"]) if "apps" in f else None,
                          header.lower() if header else header, f.get("preference"),
                          f.get("route"), f.get("refuse")))
    if not any(r.apps is None and r.header is None and r.preference is None and r.route
               for r in rules):
        reason = "no catch-all rule: add a last rule with no conditions and a route"
        if rules:  # point at the last [[rules]] table, where the catch-all belongs
            raise source.nth("rules", len(rules) - 1).error(None, reason)
        raise source.error("rules", None, reason)
    return Routing(MappingProxyType(routes), MappingProxyType(apps), tuple(rules))
