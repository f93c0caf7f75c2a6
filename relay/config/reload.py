"""SIGHUP: reload ``policies/`` while the relay runs, all files or none (STYLE §5).

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

import asyncio
from typing import TYPE_CHECKING

import structlog

from relay.config.policies import (
    NOTIFICATIONS_FILE,
    PLANS_FILE,
    Policies,
    PolicyError,
    load_policies,
)
from relay.config.routing import ROUTING_FILE

if TYPE_CHECKING:
    from relay.process.wiring import RelayApp

log = structlog.get_logger()


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


async def reload_policies(app: RelayApp) -> bool:
    """Load ``app``'s policy folder and swap it in, or keep the old policies and log why.
    Returns whether the new policies are in force. Never raises for a bad file."""
    directory = app.settings.policies_dir
    async with app.reload_lock:
        try:
            # A few small files, but file I/O all the same: off the event loop.
            policies = await asyncio.to_thread(load_policies, directory)
        except PolicyError as exc:
            log.error("policies.reload_failed", directory=str(directory), error=str(exc),
                      note="the previous policies stay in force")
            return False
        if app.draining:
            log.info("policies.reload_skipped", reason="draining")
            return False
        old_policies, old_routes = app.policies, app.routes
        changed = changed_files(old_policies, policies)
        routes = old_routes
        if policies.routing != old_policies.routing:
            routes = app.routes_for(policies, old_routes)
        app.use_policies(policies, routes)
        if routes is not old_routes:
            await old_routes.close(successor=routes)
        log.info("policies.reloaded", directory=str(directory), changed=changed,
                 plans={p.name: p.monthly_limit for p in policies.plans.values()})
        return True
