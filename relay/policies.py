"""Policies: ``policies/*.toml`` -> a frozen ``Policies`` (STYLE §5).

What the business wants (plans and their limits, the over-limit reply) is operator-edited
TOML. Unknown or missing keys and wrong types are errors that name the file, the line and
the key; nothing is silently ignored. A reload builds a whole new ``Policies``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from relay.errors import OverLimitReply

PLANS_FILE = "plans.toml"
_PLAN_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


class PolicyError(ValueError):
    """A policy file is unreadable or invalid; the message names file, line and key."""


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    title: str
    monthly_limit: int


@dataclass(frozen=True, slots=True)
class Policies:
    plans: Mapping[str, Plan]
    default_plan: str
    over_limit: OverLimitReply

    def plan_limits(self) -> list[str | int]:
        """Flat ``[name, limit, name, limit, …]`` as the quota script takes it."""
        return [item for plan in self.plans.values() for item in (plan.name, plan.monthly_limit)]


class _Source:
    """One parsed file, with enough of its text to point at the line of a key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read: {exc.strerror}") from None
        try:
            self.data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{path}: {exc}") from None

    def line_of(self, table: str, key: str | None = None) -> int | None:
        """Best-effort line number of ``[table]`` or of ``key`` inside it (1-based)."""
        lines = self.text.splitlines()
        header = re.compile(rf"^\s*\[\s*{re.escape(table)}\s*\]")
        start = next((i for i, line in enumerate(lines) if header.match(line)), None)
        if start is None:
            return None
        if key is None:
            return start + 1
        key_re = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for i in range(start + 1, len(lines)):
            if lines[i].lstrip().startswith("["):
                break
            if key_re.match(lines[i]):
                return i + 1
        return start + 1

    def error(self, table: str, key: str | None, reason: str) -> PolicyError:
        line = self.line_of(table, key)
        where = f"{self.path}:{line}" if line else str(self.path)
        name = f"{table}.{key}" if key else table
        return PolicyError(f"{where}: {name}: {reason}")

    def table(self, data: Mapping[str, Any], table: str,
              keys: Mapping[str, type]) -> dict[str, Any]:
        """Check ``data`` has exactly ``keys`` with the given types; returns it as a dict."""
        for key in data:
            if key not in keys:
                raise self.error(table, key, "unknown key")
        out: dict[str, Any] = {}
        for key, kind in keys.items():
            if key not in data:
                raise self.error(table, None, f"missing key {key!r}")
            value = data[key]
            # bool is an int in Python; a limit of `true` is still a type error.
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise self.error(table, key,
                                 f"expected {kind.__name__}, got {type(value).__name__}")
            out[key] = value
        return out


def load_policies(directory: Path) -> Policies:
    """Load and validate every policy file in ``directory``; raises PolicyError."""
    source = _Source(directory / PLANS_FILE)
    data = source.data
    for section in data:
        if section not in {"defaults", "plans", "over_limit"}:
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

    return Policies(
        plans=MappingProxyType(plans),
        default_plan=defaults["plan"],
        over_limit=OverLimitReply(over["code"], over["status"], over["text"]),
    )
