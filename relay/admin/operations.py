"""Admin operations shared by the CLI and the admin HTTP API, so both behave the same.

Every method raises ``AdminError`` for a refused request (unknown user, bad plan, bad
period…), with a message fit to show an operator, and StoreUnavailableError when Redis is
unreachable.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

import structlog

from relay.admin.usage_links import LinkLifetimeError, UsageLinks
from relay.config.policies import Policies, check_limit
from relay.config.routing import Route
from relay.config.zones import time_zone_names
from relay.decisions.months import Clock
from relay.decisions.quota import QuotaStore
from relay.decisions.routing import choose_route
from relay.decisions.subscriptions import PlanChangeError, SubscriptionStore, terms_in_force
from relay.decisions.suppression import SuppressionStore
from relay.decisions.usage import usage_report, user_period
from relay.delivery.credentials import CredentialStore, RouteCredentials
from relay.events import stream as events
from relay.events.stream import EventLog
from relay.identity.accounts import (
    ACTIVE,
    DISABLED,
    AccountConflictError,
    AccountError,
    AccountStore,
    App,
    User,
    check_address,
)
from relay.identity.bulk import BulkAccounts
from relay.identity.passwords import hash_password
from relay.store.client import RedisClient

log = structlog.get_logger()


class AdminError(ValueError):
    """A refused admin request; ``not_found`` (404) and ``conflict`` (409: the id or an
    address is taken) distinguish it from a bad request (400) in the API."""

    def __init__(self, message: str, *, not_found: bool = False,
                 conflict: bool = False) -> None:
        super().__init__(message)
        self.not_found = not_found
        self.conflict = conflict


def user_view(user: User, policies: Policies, period: str) -> dict[str, Any]:
    view = asdict(user)
    view["senders"] = sorted(user.senders)
    view["limit"] = terms_in_force(user, period, policies).limit
    return view


class Admin:
    def __init__(self, redis: RedisClient, policies: Policies, clock: Clock,
                 default_tz: str, credentials: CredentialStore | None = None) -> None:
        self.credentials = credentials
        self.redis = redis
        self.accounts = AccountStore(redis)
        self.bulk = BulkAccounts(redis)  # users import (relay/admin/user_import.py)
        self.quota = QuotaStore(redis)
        self.subscriptions = SubscriptionStore(redis)
        self.events = EventLog(redis)
        self.suppressions = SuppressionStore(redis)
        self.policies = policies
        self.clock = clock
        self.default_tz = default_tz
        # Set by whoever knows the link secret and the public URL (wiring, the CLI).
        self.usage_links: UsageLinks | None = None

    async def find(self, ref: str) -> User:
        user = await self.accounts.find_user(ref)
        if user is None:
            raise AdminError(f"no user {ref!r}", not_found=True)
        return user

    def _period_label(self, user: User) -> str:
        return user_period(user, self.clock.now(), self.default_tz).label

    def view(self, user: User) -> dict[str, Any]:
        return user_view(user, self.policies, self._period_label(user))

    async def add_user(self, email: str, *, plan: str | None = None, tz: str | None = None,
                       custom_limit: int | None = None, password: str | None = None,
                       senders: tuple[str, ...] = (), user_id: str | None = None) -> User:
        plan = plan or self.policies.default_plan
        if plan not in self.policies.plans:
            raise AdminError(f"unknown plan {plan!r}; plans: {', '.join(self.policies.plans)}")
        if custom_limit is not None:
            try:
                check_limit(custom_limit)
            except ValueError as exc:
                raise AdminError(str(exc)) from None
        tz = tz or self.default_tz
        if tz not in time_zone_names():
            raise AdminError(f"unknown time zone {tz!r}")
        if password is not None:
            try:
                self.policies.passwords.check(password, app=False)
            except ValueError as exc:
                raise AdminError(str(exc)) from None
        try:
            # A taken address is refused before the password is hashed (tens of ms of CPU);
            # the claim in add_user stays the atomic check.
            if user_id is not None and await self.accounts.find_user(user_id) is not None:
                raise AccountConflictError(f"user id {user_id} already exists")
            for address in (email, *senders):
                normalized = check_address(address)
                if await self.accounts.find_user(normalized) is not None:
                    raise AccountConflictError(f"address {normalized} already belongs "
                                               "to a user")
            # In a thread: the admin API shares its event loop with the SMTP sessions.
            password_hash = None if password is None else \
                await asyncio.to_thread(hash_password, password)
            return await self.accounts.add_user(
                email, plan=plan, tz=tz, custom_limit=custom_limit, senders=senders,
                password_hash=password_hash, user_id=user_id)
        except AccountConflictError as exc:
            raise AdminError(str(exc), conflict=True) from None
        except AccountError as exc:
            raise AdminError(str(exc)) from None

    async def add_app(self, name: str, password: str) -> App:
        """An app credential (``smartplans``, ``campaigns``…); the password must be at least
        ``[passwords] app_min_length`` long."""
        try:
            self.policies.passwords.check(password, app=True)
        except ValueError as exc:
            raise AdminError(str(exc)) from None
        try:
            return await self.accounts.add_app(
                name, password_hash=await asyncio.to_thread(hash_password, password))
        except AccountConflictError as exc:
            raise AdminError(str(exc), conflict=True) from None
        except AccountError as exc:
            raise AdminError(str(exc)) from None

    async def set_status(self, ref: str, *, active: bool) -> User:
        user = await self.find(ref)
        await self.accounts.set_user_status(user.id, ACTIVE if active else DISABLED)
        return await self.find(user.id)

    async def usage(self, ref: str, period: str | None = None) -> dict[str, Any]:
        user = await self.find(ref)
        try:
            month = user_period(user, self.clock.now(), self.default_tz, period)
        except ValueError as exc:
            raise AdminError(str(exc)) from None
        return await usage_report(user, month, quota=self.quota, policies=self.policies,
                                  now=self.clock.now())

    async def usage_link(self, ref: str, ttl: float) -> dict[str, Any]:
        """A signed link to the user's usage page, valid ``ttl`` seconds."""
        if self.usage_links is None:
            raise AdminError("usage links need the public listener (RELAY_PUBLIC_LISTEN)")
        user = await self.find(ref)
        try:
            return {"user_id": user.id, **self.usage_links.make(
                user.id, ttl, self.clock.now().timestamp())}
        except LinkLifetimeError as exc:
            raise AdminError(str(exc)) from None

    async def usage_all(self) -> list[dict[str, Any]]:
        """Every user's current month, highest percentage first."""
        reports = []
        for user in await self.accounts.list_users():
            now = self.clock.now()
            month = user_period(user, now, self.default_tz)
            reports.append(await usage_report(user, month, quota=self.quota,
                                              policies=self.policies, now=now, history=0))
        return sorted(reports, key=lambda r: (-(r["percent"] or 0), r["email"]))

    async def change_plan(self, ref: str, plan: str, *, custom_limit: int | None = None,
                          by: str) -> dict[str, Any]:
        """Apply or schedule a plan change, record it, and publish ``plan.changed``."""
        user = await self.find(ref)
        month = user_period(user, self.clock.now(), self.default_tz)
        try:
            change = await self.subscriptions.change_plan(
                user, plan, custom_limit=custom_limit, by=by, now=self.clock.now(),
                period=month, policies=self.policies)
        except PlanChangeError as exc:
            raise AdminError(str(exc)) from None
        result = {"user_id": user.id, "email": user.email, "outcome": change.outcome,
                  "effective_from": change.effective_from, "old_plan": change.old_plan,
                  "old_limit": change.old_limit, "new_plan": change.new_plan,
                  "new_limit": change.new_limit, "by": by}
        if change.outcome != "unchanged":
            # The change is made and audited; a failed publish must not report it as failed
            # (a retry would find nothing to change and publish nothing). Logged with the
            # whole event instead, for replay.
            await self.events.publish_quietly(events.new_event(
                events.PLAN_CHANGED, user.id, **{k: v for k, v in result.items()
                                                 if k != "user_id"}), log)
        return result

    async def cancel_plan(self, ref: str, *, by: str) -> dict[str, Any]:
        """Cancellation = back to the default (free) plan at the next reset."""
        return await self.change_plan(ref, self.policies.default_plan, by=by)

    async def plan_history(self, ref: str) -> list[dict[str, Any]]:
        user = await self.find(ref)
        return [asdict(entry) for entry in await self.subscriptions.history(user.id)]

    # -- routing ---------------------------------------------------------------------------
    def _route(self, name: str) -> Route:
        route = self.policies.routing.routes.get(name)
        if route is None:
            raise AdminError(f"unknown route {name!r}; routes: "
                             + ", ".join(self.policies.routing.routes))
        return route

    async def set_route(self, ref: str, app: str, route: str | None) -> dict[str, Any]:
        """Save the user's route for ``app`` (None clears it), used by rules with
        ``preference``."""
        user = await self.find(ref)
        if route is not None:
            self._route(route)
        await self.accounts.set_preference(user.id, app, route)
        return {"user_id": user.id, "app": app, "route": route}

    async def save_credentials(self, ref: str, route: str, username: str,
                               secret: str) -> dict[str, Any]:
        user = await self.find(ref)
        if self._route(route).credentials != "user":
            raise AdminError(f"route {route} uses the upstream's credentials, not the user's")
        if not secret:
            raise AdminError("the secret is empty")
        assert self.credentials is not None
        await self.credentials.save(user.id, route, RouteCredentials(username, secret))
        return {"user_id": user.id, "route": route, "username": username}

    async def delete_credentials(self, ref: str, route: str) -> bool:
        user = await self.find(ref)
        self._route(route)
        assert self.credentials is not None
        return await self.credentials.delete(user.id, route)

    async def explain(self, *, app: str, ref: str | None, header: str,
                      preference: str | None) -> dict[str, Any]:
        """Which rule picks which route for (app, user's saved preference, X-KW-Route)."""
        routing = self.policies.routing
        user = await self.find(ref) if ref else None
        if preference is None and user is not None:
            preference = user.preferences.get(app)
        decision = choose_route(routing, app=app, preference=preference, header=header)
        policy = routing.app(app)
        result: dict[str, Any] = {
            "app": app, "known_app": app in routing.apps, "preference": preference,
            "header": header,
            "header_ignored": bool(header) and not policy.route_header,
            "rule": decision.rule, "refused": decision.refusal,
            "route": decision.route.name if decision.route else None,
            "counted": decision.route.counted if decision.route else None,
            "decided_at": "data" if policy.decided_at_data else "rcpt",
            "timeline": policy.timeline,
            "stripped_headers": list(routing.stripped_prefixes(decision.route))
            if decision.route else [],
            "failover": decision.route.failover if decision.route else None,
        }
        if user is not None and decision.route is not None \
                and decision.route.credentials == "user" and self.credentials is not None:
            result["user_has_credentials"] = \
                await self.credentials.load(user.id, decision.route.name) is not None
        return result
