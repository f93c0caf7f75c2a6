"""Candidate policies trialled in shadow (docs/shadow.md): the files of the shadow folder
(``RELAY_SHADOW_POLICIES_DIR``) laid over the live ``Policies``.

The folder may hold any of ``plans.toml``, ``routing.toml`` and ``notifications.toml``, in
the formats of ``policies/``; each file it holds replaces what the live file of that name
decides, each it does not hold is the live one's. A folder that holds none of them trials
nothing. Another ``*.toml`` in it (``plan.toml``, a typo) is an error rather than a trial
that quietly compares the live policies with themselves. Reads files: call it off the event
loop once serving.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from relay.config.policies import (
    NOTIFICATIONS_FILE,
    PLANS_FILE,
    Policies,
    PolicyError,
    load_notifications,
    load_plans,
)
from relay.config.routing import ROUTING_FILE, load_routing
from relay.config.sources import TomlSource

# What a candidate can do differently (the ``kind`` of ``shadow.differs``, the metric's
# label, the report's rows).
ROUTE = "route"
REFUSAL = "refusal"
NOTICE = "notice"
KINDS = (ROUTE, REFUSAL, NOTICE)
SHADOW_FILES = (PLANS_FILE, ROUTING_FILE, NOTIFICATIONS_FILE)


@dataclass(frozen=True, slots=True)
class Candidate:
    """The policies a trial evaluates: the live ones with the shadow folder's files laid
    over them. ``files``: the files the folder holds (what the candidate changes)."""

    policies: Policies
    files: tuple[str, ...]


def load_candidate(directory: Path, live: Policies) -> Candidate | None:
    """The shadow folder over ``live``; None when the folder holds no policy file. Raises
    PolicyError (file, line and key, as for ``policies/``) for a bad file or a missing
    folder."""
    if not directory.is_dir():
        raise PolicyError(f"{directory}: the shadow policies folder does not exist")
    unknown = sorted(p.name for p in directory.glob("*.toml") if p.name not in SHADOW_FILES)
    if unknown:
        raise PolicyError(f"{directory / unknown[0]}: not a policy file; a shadow folder "
                          f"holds {', '.join(SHADOW_FILES)} (any of them)")
    files = tuple(name for name in SHADOW_FILES if (directory / name).is_file())
    if not files:
        return None
    policies = live
    if PLANS_FILE in files:
        plans = load_plans(directory / PLANS_FILE)
        policies = replace(policies, plans=plans.plans, default_plan=plans.default_plan,
                           over_limit=plans.over_limit)
    if ROUTING_FILE in files:
        policies = replace(policies, routing=load_routing(TomlSource(directory / ROUTING_FILE)))
    if NOTIFICATIONS_FILE in files:
        policies = replace(policies,
                           notifications=load_notifications(directory / NOTIFICATIONS_FILE))
    return Candidate(policies, files)
