"""The operator commands (users, apps, usage, plan, events, route, check-config): parse
nothing, print results; the work itself is in ``relay.admin.operations``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict

import structlog

from relay.admin.operations import Admin
from relay.admin.usage_links import LinkLifetimeError, UsageLinks, parse_ttl
from relay.cli.shadow import describe_shadow, report_from_redis
from relay.cli.usage import format_months, format_report
from relay.cli.user_import import import_users, open_import
from relay.config.declare import as_text
from relay.config.policies import load_policies
from relay.config.settings import SETTINGS, Settings
from relay.errors import StoreUnavailableError
from relay.events.stream import Event, format_event
from relay.identity.signed_links import LinkSigner, load_link_secret

log = structlog.get_logger()
# events tail -f: seconds between attempts while Redis is unreachable (doubling).
FOLLOW_RETRY_FIRST = 0.2
FOLLOW_RETRY_MAX = 5.0


class CommandError(Exception):
    """A clear, expected failure of a command: printed without a traceback, exit 1."""


def _read_password() -> str:
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CommandError("no password on standard input")
    return password


def _show(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _operator() -> str:
    """Who an audit entry names for a change made with the CLI."""
    return f"cli:{getpass.getuser()}"


async def _users(args: argparse.Namespace, settings: Settings, admin: Admin) -> None:
    if args.action == "add":
        if not args.password_stdin and not args.no_password:
            raise CommandError("give the user an SMTP password with --password-stdin, or "
                               "pass --no-password for a user who sends only through app "
                               "credentials")
        user = await admin.add_user(
            args.email, plan=args.plan, tz=args.tz, custom_limit=args.limit,
            password=_read_password() if args.password_stdin else None,
            senders=tuple(args.sender), user_id=args.user_id)
        print(json.dumps(admin.view(user)))
    elif args.action == "list":
        users = [admin.view(u) for u in await admin.accounts.list_users()]
        if args.json:
            print(json.dumps(users))
            return
        print(f"{'ID':<14} {'EMAIL':<32} {'PLAN':<8} {'LIMIT':>7} {'TZ':<20} STATUS")
        for u in users:
            print(f"{u['id']:<14} {u['email']:<32} {u['plan']:<8} {u['limit'] or '?':>7} "
                  f"{u['tz']:<20} {u['status']}")
    elif args.action == "show":
        view = admin.view(await admin.find(args.user))
        if args.json:
            print(json.dumps(view))
            return
        for key, value in view.items():
            print(f"{key + ':':<14}{_show(value)}")
    elif args.action in ("disable", "enable"):
        user = await admin.set_status(args.user, active=args.action == "enable")
        print(f"user {user.id} {args.action}d")
    elif args.action == "import":
        try:
            source = open_import(args.file)
        except OSError as exc:
            raise CommandError(f"cannot read {args.file}: {exc.strerror or exc}") from None
        with source:
            summary = await import_users(args, admin, source, by=args.by or _operator())
        if summary.refused:
            raise CommandError(f"{summary.refused:,} of {summary.lines:,} lines "
                               + ("would be refused" if args.dry_run
                                  else "refused, the others imported"))


async def _apps(args: argparse.Namespace, settings: Settings, admin: Admin) -> None:
    if args.action == "add":
        app = await admin.add_app(args.name, _read_password())
        print(json.dumps(asdict(app)))
        return
    apps = await admin.accounts.list_apps()
    if args.json:
        print(json.dumps([asdict(a) for a in apps]))
        return
    print(f"{'NAME':<20} {'STATUS':<9} CREATED")
    for a in apps:
        print(f"{a.name:<20} {a.status:<9} {a.created_at}")


async def _usage(args: argparse.Namespace, settings: Settings, admin: Admin) -> None:
    if args.user == "link":
        if not args.link_user or args.all or args.period is not None:
            raise CommandError("usage link takes one USER (and --ttl)")
        try:
            ttl = parse_ttl(args.ttl)
        except LinkLifetimeError as exc:
            raise CommandError(str(exc)) from None
        admin.usage_links = UsageLinks(
            LinkSigner(load_link_secret(settings.link_secret, settings.state_dir)),
            settings.public_url)
        link = await admin.usage_link(args.link_user, ttl)
        print(json.dumps(link) if args.json else link["url"])
        return
    if args.link_user:
        raise CommandError("usage takes one USER")
    if args.all:
        if args.user or args.period is not None:
            raise CommandError("--all takes no USER or --period")
        reports = await admin.usage_all()
        if args.json:
            print(json.dumps(reports))
            return
        print(f"{'EMAIL':<32} {'PLAN':<8} {'USED':>8} {'LIMIT':>8} {'%':>6} {'PERIOD':<8} "
              "PENDING")
        for r in reports:
            pending = r["pending_change"]
            limit = f"{r['limit']:,}" if r["limit"] is not None else "?"
            print(f"{r['email']:<32} {r['plan']:<8} {r['used']:>8,} {limit:>8} "
                  f"{r['percent'] if r['percent'] is not None else '?':>6} {r['period']:<8} "
                  + (f"{pending['plan']} from {pending['effective_from']}" if pending else ""))
        return
    assert args.user  # main() refuses a usage without USER or --all
    report = await admin.usage(args.user, args.period)
    print(json.dumps(report) if args.json else format_report(report))


async def _plan(args: argparse.Namespace, settings: Settings, admin: Admin) -> None:
    if args.action == "history":
        entries = await admin.plan_history(args.user)
        if args.json:
            print(json.dumps(entries))
            return
        for e in entries:
            print(f"{e['at']}  {e['by']:<20} {e['outcome']:<9} {e['old_plan']} "
                  f"({e['old_limit']}) -> {e['new_plan']} ({e['new_limit']}) "
                  f"from {e['effective_from']}")
        # The terms each month was governed by (docs/plans.md, "History").
        print("plan and limit by month:")
        print("\n".join(format_months(await admin.usage(args.user))))
        return
    by = args.by or _operator()
    if args.action == "set":
        result = await admin.change_plan(args.user, args.plan, custom_limit=args.limit, by=by)
    else:
        result = await admin.cancel_plan(args.user, by=by)
    if args.json:
        print(json.dumps(result))
        return
    when = ("at the reset to " if result["outcome"] == "downgrade" else "now, in ") \
        + result["effective_from"]
    print(f"{result['email']}: {result['outcome']} {result['old_plan']} ({result['old_limit']})"
          f" -> {result['new_plan']} ({result['new_limit']}), {when}")


async def _events(args: argparse.Namespace, settings: Settings, admin: Admin) -> None:
    def show(stream_id: str, event: Event) -> None:
        if args.json:
            print(json.dumps({"stream_id": stream_id, **json.loads(event.to_json())}),
                  flush=True)
        else:
            print(format_event(event), flush=True)

    if args.action == "tail":
        kinds = frozenset(args.kind) if args.kind else None
        last = "0-0"
        for stream_id, event in await admin.events.recent(args.count, kinds):
            show(stream_id, event)
            last = stream_id
        if not args.follow:
            return
        if last == "0-0":
            last = await admin.events.last_id()
        await _follow(admin, last, kinds, show, settings.redis_timeout)
    elif args.action == "dead":
        letters = await admin.events.dead()
        if args.json:
            print(json.dumps([{"stream_id": d.stream_id, "channel": d.channel,
                               "error": d.error, "attempts": d.attempts,
                               "event": json.loads(d.event.to_json())} for d in letters]))
            return
        if not letters:
            print("no dead letters: every event was delivered, or is still being retried")
            return
        for d in letters:
            print(f"{d.stream_id}  {d.channel:<7} attempts={d.attempts} error={d.error!r}  "
                  f"{format_event(d.event)}")
    elif args.action == "retry":
        if not args.all and not args.ids:
            raise CommandError("name dead-letter ids (see `events dead`), or use --all")
        count = await admin.events.retry(None if args.all else list(args.ids))
        if args.ids and count < len(set(args.ids)):
            raise CommandError(f"re-queued {count} of {len(set(args.ids))}: some ids are not "
                               "in the dead-letter stream (see `events dead`)")
        print(f"re-queued {count} event(s)")


async def _follow(admin: Admin, last: str, kinds: frozenset[str] | None,
                  show: Callable[[str, Event], None], redis_timeout: float) -> None:
    """``events tail -f``: print events as they come, until Ctrl-C. Each read blocks for less
    than the Redis client's socket timeout (a longer block would read as Redis being gone);
    when Redis is unreachable it says so once, retries with backoff, and goes on from the
    last event it printed once Redis is back."""
    block_ms = max(100, int(redis_timeout * 500))
    delay, down = FOLLOW_RETRY_FIRST, False
    # Ctrl-C (or SIGTERM) ends the loop between two reads, at most one short block later:
    # cancelling a task in the middle of redis-py's blocking read is not reliably seen.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        try:
            found = await admin.events.wait_after(last, block_ms=block_ms)
        except StoreUnavailableError:
            if not down:
                log.warning("events.redis_unavailable",
                            note="Redis is unreachable; retrying until it is back (Ctrl-C "
                                 "to stop)")
                down = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, FOLLOW_RETRY_MAX)
            continue
        if down:
            log.warning("events.redis_back", note="Redis answers again; following")
            delay, down = FOLLOW_RETRY_FIRST, False
        for stream_id, event in found:
            last = stream_id
            if kinds is None or event.kind in kinds:
                show(stream_id, event)
    raise KeyboardInterrupt  # exit status 130, as for any Ctrl-C


async def _route(args: argparse.Namespace, settings: Settings, admin: Admin) -> None:
    if args.action == "set":
        if args.clear == (args.route is not None):
            raise CommandError("give a ROUTE, or --clear")
        result = await admin.set_route(args.user, args.app, None if args.clear else args.route)
        print(json.dumps(result))
    elif args.action == "credentials":
        if args.delete:
            removed = await admin.delete_credentials(args.user, args.route)
            print(f"credentials {'removed' if removed else 'not found'}")
            return
        if not args.secret_stdin:
            raise CommandError("pass the secret on standard input with --secret-stdin")
        print(json.dumps(await admin.save_credentials(args.user, args.route, args.username,
                                                      _read_password())))
    else:
        result = await admin.explain(app=args.app, ref=args.user, header=args.header,
                                     preference=args.preference)
        if args.json:
            print(json.dumps(result))
            return
        outcome = (f"refused: {result['refused']}" if result["refused"] else
                   f"route {result['route']} ({'counted' if result['counted'] else 'not counted'})")
        print(f"app {result['app']}, preference {result['preference']}, "
              f"header {result['header'] or '(none)'}"
              + (" (ignored: the app may not choose)" if result["header_ignored"] else ""))
        print(f"  rule {result['rule']}: {outcome}; decided at {result['decided_at'].upper()}")
        if result["stripped_headers"]:
            print("  strips " + ", ".join(h + "*" for h in result["stripped_headers"]))
        if "user_has_credentials" in result:
            print(f"  user has credentials: {'yes' if result['user_has_credentials'] else 'no'}")


AdminCommand = Callable[[argparse.Namespace, Settings, Admin], Awaitable[None]]
ADMIN_COMMANDS: dict[str, AdminCommand] = {"users": _users, "apps": _apps, "usage": _usage,
                                   "plan": _plan, "events": _events, "route": _route,
                                   "shadow": report_from_redis}


def check_config(settings: Settings) -> None:
    policies = load_policies(settings.policies_dir)
    for declared in SETTINGS:
        path = getattr(settings, declared.name)
        if declared.setting.file and path is not None and not path.is_file():
            raise CommandError(f"file not found: {path}")
    print(f"settings OK: listen {settings.listen}, "
          f"redis {'embedded' if not settings.redis_url else 'configured'}, "
          f"upstream {settings.upstream or 'capture folder (development)'}")
    print(f"policies OK: {settings.policies_dir}: plans "
          + ", ".join(f"{p.name}={p.monthly_limit}" for p in policies.plans.values())
          + "; notify at " + ", ".join(f"{t}%" for t in policies.notifications.thresholds)
          + f"; passwords of {policies.passwords.user_min_length}+ characters for users, "
            f"{policies.passwords.app_min_length}+ for apps")
    print(describe_shadow(settings, policies))
    print(f"admin API: {settings.admin_listen if settings.admin_token else 'off'}; "
          f"in-app webhook: {'on' if settings.notify_webhook_url else 'off'}")
    print(f"public listener: {settings.public_listen or 'off'} (webhooks: mandrill "
          f"{'on' if settings.mandrill_webhook_key else 'off'}, command "
          f"{'on' if settings.command_webhook_secret else 'off'})")
    print(f"metrics: {settings.metrics_listen or 'off'}; "
          f"notifier metrics: {settings.notifier_metrics_listen or 'off'}")
    changed = settings_changed(settings)
    print("settings other than the defaults:" + ("" if changed else " none"))
    for line in changed:
        print(f"  {line}")


def settings_changed(settings: Settings) -> list[str]:
    """``RELAY_NAME=value`` for each setting that differs from its default, in the order of
    docs/configuration.md, secrets masked as in ``repr``; an empty value is a listener
    turned off."""
    lines = []
    for declared in SETTINGS:
        value = getattr(settings, declared.name)
        if value == declared.default_value():
            continue
        shown = declared.shown(value)
        if declared.setting.family is None:
            lines.append(f"{declared.variable}={as_text(shown)}")
        else:
            lines += [f"RELAY_{declared.member_key(name).upper()}={as_text(member)}"
                      for name, member in sorted(shown.items())]
    return lines
