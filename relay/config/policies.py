"""Policies: ``policies/*.toml`` -> a frozen ``Policies`` (STYLE §5).

What the business wants (plans and their limits, the over-limit reply) is operator-edited
TOML. Unknown or missing keys and wrong types are errors that name the file, the line and
the key; nothing is silently ignored. A reload builds a whole new ``Policies``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from relay.config.routing import ROUTING_FILE, Routing, load_routing
from relay.config.sources import PolicyError as PolicyError
from relay.config.sources import TomlSource
from relay.errors import OverLimitReply

PLANS_FILE = "plans.toml"
NOTIFICATIONS_FILE = "notifications.toml"
EVENT_KINDS = ("quota.threshold", "quota.reached", "quota.rejected", "plan.changed",
               "timeline.email_failed")
_PLAN_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# The highest monthly limit (a plan's or a user's): commit.lua compares delivered x 100 with
# limit x percent in Lua's numbers (doubles, exact up to 2**53) and formats the limit into
# keys and audit entries with 14 significant digits. Up to 2**53 // 100 both are exact.
MAX_MONTHLY_LIMIT = 2**53 // 100  # 90,071,992,547,409


def check_limit(limit: int, what: str = "the custom limit") -> None:
    """Raises ValueError unless ``limit`` is a monthly limit the quota scripts hold exactly."""
    if not 1 <= limit <= MAX_MONTHLY_LIMIT:
        raise ValueError(f"{what} must be a positive integer of at most "
                         f"{MAX_MONTHLY_LIMIT:,} (2**53 / 100), got {limit:,}")
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    title: str
    monthly_limit: int


@dataclass(frozen=True, slots=True)
class Channel:
    enabled: bool
    kinds: frozenset[str]


@dataclass(frozen=True, slots=True)
class Notifications:
    thresholds: tuple[int, ...]
    notify_limit_reached: bool
    in_app: Channel
    in_app_timeout: float
    timeline: Channel
    timeline_timeout: float
    email: Channel
    email_from: str
    max_attempts: int
    backoff_base: float
    backoff_max: float
    reclaim_idle: float
    concurrency: int

    @property
    def threshold_argument(self) -> str:
        """The thresholds as commit.lua takes them: ascending percents, 100 = reached."""
        return " ".join(str(p) for p in (*self.thresholds,
                                         *((100,) if self.notify_limit_reached else ())))


@dataclass(frozen=True, slots=True)
class Passwords:
    """The shortest SMTP password accepted for a new credential, in characters."""

    user_min_length: int = 12
    app_min_length: int = 24

    def check(self, password: str, *, app: bool) -> None:
        """Raises ValueError saying what is wrong (never repeating the password)."""
        key, minimum = (("app_min_length", self.app_min_length) if app else
                        ("user_min_length", self.user_min_length))
        if len(password) < minimum:
            raise ValueError(
                f"the password is too short: {len(password)} characters, "
                f"{'an app' if app else 'a user'} password needs at least {minimum} "
                f"({PLANS_FILE} [passwords] {key})")


@dataclass(frozen=True, slots=True)
class Policies:
    plans: Mapping[str, Plan]
    default_plan: str
    over_limit: OverLimitReply
    notifications: Notifications
    routing: Routing
    passwords: Passwords = Passwords()

    def plan_limits(self) -> list[str | int]:
        """Flat ``[name, limit, name, limit, …]`` as the quota script takes it."""
        return [item for plan in self.plans.values() for item in (plan.name, plan.monthly_limit)]


def load_policies(directory: Path) -> Policies:
    """Load and validate every policy file in ``directory``; raises PolicyError."""
    plans = load_plans(directory / PLANS_FILE)
    return Policies(
        plans=plans.plans, default_plan=plans.default_plan, over_limit=plans.over_limit,
        notifications=load_notifications(directory / NOTIFICATIONS_FILE),
        routing=load_routing(TomlSource(directory / ROUTING_FILE)),
        passwords=plans.passwords,
    )


@dataclass(frozen=True, slots=True)
class PlanFile:
    """What ``plans.toml`` holds (the shadow trial lays one over the live policies)."""

    plans: Mapping[str, Plan]
    default_plan: str
    over_limit: OverLimitReply
    passwords: Passwords


def load_plans(path: Path) -> PlanFile:
    """Load and validate ``plans.toml``; raises PolicyError."""
    source = TomlSource(path)
    data = source.data
    for section in data:
        if section not in {"defaults", "plans", "over_limit", "passwords"}:
            raise source.error(section, None, "unknown section")
    for section in ("defaults", "plans", "over_limit"):
        if not isinstance(data.get(section), dict):
            raise PolicyError(f"{source.path}: missing section [{section}]")

    plans: dict[str, Plan] = {}
    for name, body in data["plans"].items():
        table = f"plans.{name}"
        if not _PLAN_NAME.match(name):
            raise source.error(table, None, "plan names are lower-case letters, digits, - and _")
        if not isinstance(body, dict):
            raise source.error("plans", name, "expected a table")
        fields = source.table(body, table, {"title": str, "monthly_limit": int})
        if fields["monthly_limit"] <= 0:
            raise source.error(table, "monthly_limit", "must be greater than 0")
        if fields["monthly_limit"] > MAX_MONTHLY_LIMIT:
            raise source.error(table, "monthly_limit",
                               f"must be at most {MAX_MONTHLY_LIMIT} (2**53 / 100: what the "
                               "quota scripts count exactly)")
        plans[name] = Plan(name, fields["title"], fields["monthly_limit"])
    if not plans:
        raise source.error("plans", None, "define at least one plan")

    defaults = source.table(data["defaults"], "defaults", {"plan": str})
    if defaults["plan"] not in plans:
        raise source.error("defaults", "plan", f"no plan named {defaults['plan']!r}")

    over = source.table(data["over_limit"], "over_limit", {"code": int, "status": str, "text": str})
    if not (400 <= over["code"] < 600):
        raise source.error("over_limit", "code", "must be a 4xx or 5xx reply code")
    if not _STATUS.match(over["status"]) or over["status"][0] != str(over["code"])[0]:
        raise source.error("over_limit", "status",
                           "must be an enhanced status code whose class matches the code")
    try:
        over["text"].format(used=0, limit=0, resets_on="")
    # {limit.x} raises AttributeError and {limit[0]} TypeError: refuse those too.
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
        raise source.error(
            "over_limit", "text",
            f"bad placeholder {exc}; use {{used}}, {{limit}}, {{resets_on}}") from None
    if any(ord(c) < 32 for c in over["text"]):
        raise source.error("over_limit", "text", "must be one line")

    return PlanFile(
        plans=MappingProxyType(plans),
        default_plan=defaults["plan"],
        over_limit=OverLimitReply(over["code"], over["status"], over["text"]),
        passwords=_load_passwords(source, data.get("passwords", {})),
    )


def _load_passwords(source: TomlSource, section: object) -> Passwords:
    """``[passwords]``: optional, and so is each key (the defaults are Passwords')."""
    if not isinstance(section, dict):
        raise source.error("passwords", None, "expected a table")
    defaults = Passwords()
    found = {}
    for key in ("user_min_length", "app_min_length"):
        if key in section:
            found[key] = source.table({key: section[key]}, "passwords", {key: int})[key]
        else:
            found[key] = getattr(defaults, key)
        if not 1 <= found[key] <= 1024:
            raise source.error("passwords", key, "must be between 1 and 1024")
    unknown = sorted(set(section) - set(found))
    if unknown:
        raise source.error("passwords", unknown[0], "unknown key")
    return Passwords(**found)


def load_notifications(path: Path) -> Notifications:
    """Load and validate ``notifications.toml``; raises PolicyError."""
    source = TomlSource(path)
    data = source.data
    sections = ("thresholds", "in_app", "timeline", "email", "delivery")
    for section in data:
        if section not in sections:
            raise source.error(section, None, "unknown section")
    for section in sections:
        if not isinstance(data.get(section), dict):
            raise PolicyError(f"{source.path}: missing section [{section}]")
    thresholds = source.table(data["thresholds"], "thresholds",
                              {"percent": list, "notify_limit_reached": bool})
    percents = thresholds["percent"]
    if (not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 100
                for p in percents) or list(percents) != sorted(set(percents))):
        raise source.error("thresholds", "percent",
                           "must be ascending whole percentages between 1 and 99")
    channels = {}
    for name, extra in (("in_app", {"timeout_seconds": float}),
                        ("timeline", {"timeout_seconds": float}), ("email", {"from": str})):
        fields = source.table(data[name], name, {"enabled": bool, "kinds": list, **extra})
        unknown = [k for k in fields["kinds"] if k not in EVENT_KINDS]
        if unknown:
            raise source.error(
                name, "kinds",
                f"unknown event kind {unknown[0]!r}; kinds: {', '.join(EVENT_KINDS)}")
        channels[name] = (Channel(fields["enabled"], frozenset(fields["kinds"])), fields)
    for name in ("in_app", "timeline"):
        if channels[name][1]["timeout_seconds"] <= 0:
            raise source.error(name, "timeout_seconds", "must be greater than 0")
    if "@" not in channels["email"][1]["from"]:
        raise source.error("email", "from", "must contain an email address")
    delivery = source.table(data["delivery"], "delivery", {
        "max_attempts": int, "backoff_base_seconds": float, "backoff_max_seconds": float,
        "reclaim_idle_seconds": float, "concurrency": int})
    for key, value in delivery.items():
        if value <= 0:
            raise source.error("delivery", key, "must be greater than 0")
    return Notifications(
        thresholds=tuple(percents),
        notify_limit_reached=thresholds["notify_limit_reached"],
        in_app=channels["in_app"][0],
        in_app_timeout=channels["in_app"][1]["timeout_seconds"],
        timeline=channels["timeline"][0],
        timeline_timeout=channels["timeline"][1]["timeout_seconds"],
        email=channels["email"][0],
        email_from=channels["email"][1]["from"],
        max_attempts=delivery["max_attempts"],
        backoff_base=delivery["backoff_base_seconds"],
        backoff_max=delivery["backoff_max_seconds"],
        reclaim_idle=delivery["reclaim_idle_seconds"],
        concurrency=delivery["concurrency"],
    )
