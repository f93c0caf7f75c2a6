"""``command-relay`` (also ``python -m relay``): parses arguments, calls ``app.py`` or the stores.

Operators script these commands, so output is stable: ``--json`` prints one JSON document,
errors go to stderr as ``command-relay: error: …`` with exit status 1 (2 for bad usage).
Admin commands use the same settings as ``serve``, so ``RELAY_REDIS_URL=… command-relay users
add …`` acts on the Redis that ``serve`` uses (or on the embedded development one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from relay.accounts import ACTIVE, DISABLED, AccountError, AccountStore, User
from relay.app import StartupError, redis_for, serve, wait_for_redis
from relay.embedded import EmbeddedRedisError
from relay.errors import StoreUnavailableError
from relay.logs import configure_logging
from relay.passwords import hash_password
from relay.period import SystemClock, UnknownTimeZoneError, period_at, period_named, zone
from relay.policies import Policies, PolicyError, load_policies
from relay.quota import QuotaStore
from relay.settings import Settings, SettingsError, load_settings

PROG = "command-relay"


class CommandError(Exception):
    """A clear, expected failure of a command: printed without a traceback, exit 1."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Command Email SMTP relay")
    parser.add_argument("--config", type=Path, help="TOML settings file (also RELAY_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("serve", help="run the SMTP relay")
    sub.add_parser("check-config", help="validate settings and policies/ without serving")

    users = sub.add_parser("users", help="manage users (agents)").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    add = users.add_parser("add", help="create a user")
    add.add_argument("email")
    add.add_argument("--password-stdin", action="store_true",
                     help="read an SMTP password for this user from standard input")
    add.add_argument("--plan", help="plan name from policies/plans.toml (default: [defaults])")
    add.add_argument("--limit", type=int, help="custom monthly limit, replacing the plan's")
    add.add_argument("--tz", help="IANA time zone of the user's month (default: RELAY_DEFAULT_TZ)")
    add.add_argument("--sender", action="append", default=[], metavar="ADDRESS",
                     help="another sender address the user owns (repeatable)")
    add.add_argument("--id", dest="user_id", help="user id (default: generated)")
    lst = users.add_parser("list", help="list users")
    lst.add_argument("--json", action="store_true")
    show = users.add_parser("show", help="show one user")
    show.add_argument("user", help="user id or email")
    show.add_argument("--json", action="store_true")
    for action in ("disable", "enable"):
        p = users.add_parser(action, help=f"{action} a user")
        p.add_argument("user", help="user id or email")

    apps = sub.add_parser("apps", help="manage application credentials").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    app_add = apps.add_parser("add", help="create an app credential (smartplans, campaigns…)")
    app_add.add_argument("name")
    app_add.add_argument("--password-stdin", action="store_true", required=True,
                         help="read the app's SMTP password from standard input")
    app_list = apps.add_parser("list", help="list app credentials")
    app_list.add_argument("--json", action="store_true")

    usage = sub.add_parser("usage", help="a user's sends this month")
    usage.add_argument("user", help="user id or email")
    usage.add_argument("--json", action="store_true")
    usage.add_argument("--period", help="month as YYYY-MM (default: the current one)")
    return parser


def _read_password() -> str:
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CommandError("no password on standard input")
    return password


def _user_view(user: User, policies: Policies) -> dict[str, Any]:
    view = asdict(user)
    view["senders"] = sorted(user.senders)
    view["limit"] = _limit_of(user, policies)
    return view


def _limit_of(user: User, policies: Policies) -> int | None:
    if user.custom_limit is not None:
        return user.custom_limit
    plan = policies.plans.get(user.plan)
    return plan.monthly_limit if plan else None


async def _find(accounts: AccountStore, ref: str) -> User:
    user = await accounts.find_user(ref)
    if user is None:
        raise CommandError(f"no user {ref!r}")
    return user


async def _users(args: argparse.Namespace, settings: Settings, policies: Policies,
                 accounts: AccountStore, quota: QuotaStore) -> None:
    if args.action == "add":
        plan = args.plan or policies.default_plan
        if plan not in policies.plans:
            raise CommandError(f"unknown plan {plan!r}; plans: {', '.join(policies.plans)}")
        if args.limit is not None and args.limit <= 0:
            raise CommandError("--limit must be a positive integer")
        tz = args.tz or settings.default_tz
        try:
            zone(tz)
        except UnknownTimeZoneError as exc:
            raise CommandError(str(exc)) from None
        password_hash = hash_password(_read_password()) if args.password_stdin else None
        user = await accounts.add_user(args.email, plan=plan, tz=tz, custom_limit=args.limit,
                                       password_hash=password_hash,
                                       senders=tuple(args.sender), user_id=args.user_id)
        print(json.dumps(_user_view(user, policies)))
    elif args.action == "list":
        users = await accounts.list_users()
        if args.json:
            print(json.dumps([_user_view(u, policies) for u in users]))
        else:
            print(f"{'ID':<14} {'EMAIL':<32} {'PLAN':<8} {'LIMIT':>7} {'TZ':<20} STATUS")
            for u in users:
                limit = _limit_of(u, policies)
                print(f"{u.id:<14} {u.email:<32} {u.plan:<8} {limit or '?':>7} {u.tz:<20} "
                      f"{u.status}")
    elif args.action == "show":
        view = _user_view(await _find(accounts, args.user), policies)
        if args.json:
            print(json.dumps(view))
        else:
            for key, value in view.items():
                print(f"{key + ':':<14}{', '.join(value) if isinstance(value, list) else value}")
    elif args.action in ("disable", "enable"):
        user = await _find(accounts, args.user)
        await accounts.set_user_status(user.id, DISABLED if args.action == "disable" else ACTIVE)
        print(f"user {user.id} {args.action}d")


async def _apps(args: argparse.Namespace, settings: Settings, policies: Policies,
                accounts: AccountStore, quota: QuotaStore) -> None:
    if args.action == "add":
        app = await accounts.add_app(args.name, password_hash=hash_password(_read_password()))
        print(json.dumps(asdict(app)))
    else:
        apps = await accounts.list_apps()
        if args.json:
            print(json.dumps([asdict(a) for a in apps]))
        else:
            print(f"{'NAME':<20} {'STATUS':<9} CREATED")
            for a in apps:
                print(f"{a.name:<20} {a.status:<9} {a.created_at}")


async def _usage(args: argparse.Namespace, settings: Settings, policies: Policies,
                 accounts: AccountStore, quota: QuotaStore) -> None:
    user = await _find(accounts, args.user)
    try:
        tz = zone(user.tz)
    except UnknownTimeZoneError:
        tz = zone(settings.default_tz)
    try:
        period = (period_named(args.period, tz) if args.period is not None
                  else period_at(SystemClock().now(), tz))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    usage = await quota.usage(user.id, period.label)
    limit = _limit_of(user, policies)
    report = {
        "user_id": user.id, "email": user.email, "plan": user.plan, "status": user.status,
        "period": period.label, "tz": user.tz, "limit": limit, "used": usage.used,
        "remaining": max(limit - usage.used, 0) if limit is not None else None,
        "percent": round(100 * usage.used / limit, 1) if limit else None,
        "delivered": usage.delivered, "in_flight": usage.in_flight,
        "resets_at": period.resets_at.isoformat(),
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{user.email} ({user.id}), plan {user.plan}, {period.label} ({user.tz})")
    print(f"  used {usage.used:,} of {limit if limit is None else f'{limit:,}'} "
          f"({report['percent']}%), {report['remaining']} remaining")
    print(f"  resets {period.resets_at.isoformat()}")
    if usage.in_flight:
        print(f"  {usage.in_flight} reserved, not yet confirmed delivered")


Admin = Callable[[argparse.Namespace, Settings, Policies, AccountStore, QuotaStore],
                 Awaitable[None]]
_ADMIN: dict[str, Admin] = {"users": _users, "apps": _apps, "usage": _usage}


async def _run_admin(command: Admin, args: argparse.Namespace, settings: Settings) -> None:
    policies = load_policies(settings.policies_dir)
    async with redis_for(settings, share=True) as redis:
        await wait_for_redis(redis, 2)
        await command(args, settings, policies, AccountStore(redis), QuotaStore(redis))


def _check_config(settings: Settings) -> None:
    policies = load_policies(settings.policies_dir)
    for path in (settings.tls_cert, settings.tls_key, settings.upstream_ca_file):
        if path is not None and not path.is_file():
            raise CommandError(f"file not found: {path}")
    print(f"settings OK: listen {settings.listen}, "
          f"redis {'embedded' if not settings.redis_url else 'configured'}, "
          f"upstream {settings.upstream or 'capture folder (development)'}")
    print(f"policies OK: {settings.policies_dir}: plans "
          + ", ".join(f"{p.name}={p.monthly_limit}" for p in policies.plans.values()))


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        settings = load_settings(config_file=args.config)
        # Admin commands print their results on stdout (one JSON document with --json), so
        # their warnings and errors are logged to stderr.
        serving = args.command == "serve"
        configure_logging(settings.log_format, settings.log_level if serving else "warning",
                          stream=sys.stdout if serving else sys.stderr)
        if args.command == "serve":
            asyncio.run(serve(settings))
        elif args.command == "check-config":
            _check_config(settings)
        else:
            asyncio.run(_run_admin(_ADMIN[args.command], args, settings))
    except (SettingsError, PolicyError, AccountError, CommandError, StartupError,
            EmbeddedRedisError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except StoreUnavailableError:
        print(f"{PROG}: error: Redis is unreachable", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
