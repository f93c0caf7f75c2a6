"""SIGHUP: reload ``policies/`` while the relay runs, all files or none (STYLE §5).

This module is the pure half (read, validate, diff); ``RelayApp.reload_policies`` swaps.

Every file is read and validated into a new ``Policies`` first. If any file is bad, nothing
changes: the error (``plans.toml:31: plans.free.monthly_limit: …``) is logged as
``policies.reload_failed`` and the relay keeps the policies it has. Otherwise the new
policies are swapped in at once: new transactions use them, a transaction already open keeps
the policies (and routes) it started with. When ``routing.toml`` changed the routes are
rebuilt; a route whose upstream and pool settings did not change keeps its pool (and its
warm connections), the pools nobody uses any more are closed once their connections come
back.
"""

from __future__ import annotations

from pathlib import Path

from relay.config.policies import (
    NOTIFICATIONS_FILE,
    PLANS_FILE,
    Policies,
    load_policies,
)
from relay.config.routing import ROUTING_FILE


def changed_files(old: Policies, new: Policies) -> list[str]:
    """The policy files whose content differs, by what they hold."""
    changed = []
    if (old.plans, old.default_plan, old.over_limit) != \
            (new.plans, new.default_plan, new.over_limit):
        changed.append(PLANS_FILE)
    if old.notifications != new.notifications:
        changed.append(NOTIFICATIONS_FILE)
    if old.routing != new.routing:
        changed.append(ROUTING_FILE)
    return changed


def read_policies(directory: Path) -> Policies:
    """Every policy file of ``directory`` read and validated into new Policies, or
    PolicyError naming the first bad file and line. Reads files: call it off the loop."""
    return load_policies(directory)
