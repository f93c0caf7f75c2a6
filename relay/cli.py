"""``command-relay`` (also ``python -m relay``): parses arguments, calls ``app.py`` or the stores.

Operators script these commands, so output is stable: ``--json`` prints one JSON document,
errors go to stderr as ``command-relay: error: …`` with exit status 1 (2 for bad usage).
Admin commands use the same settings as ``serve``, so ``RELAY_REDIS_URL=… command-relay users
add …`` acts on the Redis that ``serve`` uses (or on the embedded development one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import structlog

from relay import eventloop
from relay.accounts import AccountError
from relay.admin import Admin, AdminError
from relay.app import StartupError, redis_for, run_notifier, serve, wait_for_redis
from relay.credentials import CredentialStore, load_key
from relay.embedded import EmbeddedRedisError
from relay.errors import StoreUnavailableError
from relay.events import Event, format_event
from relay.logs import configure_logging
from relay.period import SystemClock
from relay.policies import PolicyError, load_policies
from relay.settings import Settings, SettingsError, load_settings
from relay.usage import format_report
from relay.workers import Supervisor, WorkerLink, tag_logs

PROG = "command-relay"
# events tail -f: seconds between attempts while Redis is unreachable (doubling).
FOLLOW_RETRY_FIRST = 0.2
FOLLOW_RETRY_MAX = 5.0

log = structlog.get_logger()


class CommandError(Exception):
    """A clear, expected failure of a command: printed without a traceback, exit 1."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Command Email SMTP relay")
    parser.add_argument("--config", type=Path, help="TOML settings file (also RELAY_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = sub.add_parser("serve", help="run the SMTP relay")
    serve_parser.add_argument(
        "--workers", type=_positive_int, metavar="N",
        help="worker processes sharing the listeners (default: RELAY_WORKERS, else one per "
             "core); 1 serves in this process")
    # Internal: how the supervisor starts a worker (relay/workers.py).
    serve_parser.add_argument("--worker", help=argparse.SUPPRESS)
    sub.add_parser("check-config", help="validate settings and policies/ without serving")

    users = sub.add_parser("users", help="manage users (agents)").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    add = users.add_parser("add", help="create a user")
    add.add_argument("email")
    login = add.add_mutually_exclusive_group()
    login.add_argument("--password-stdin", action="store_true",
                       help="read an SMTP password for this user from standard input")
    login.add_argument("--no-password", action="store_true",
                       help="no SMTP login for this user: they send only through app "
                            "credentials (smartplans, campaigns…)")
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

    usage = sub.add_parser("usage", help="a user's sends this month (or --all users)")
    usage.add_argument("user", nargs="?", help="user id or email")
    usage.add_argument("--all", action="store_true",
                       help="every user's current month, highest percentage first")
    usage.add_argument("--json", action="store_true")
    usage.add_argument("--period", help="month as YYYY-MM (default: the current one)")

    plan = sub.add_parser("plan", help="change a user's plan").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    plan_set = plan.add_parser("set", help="upgrade (now) or downgrade (next month)")
    plan_set.add_argument("user", help="user id or email")
    plan_set.add_argument("plan", help="plan name from policies/plans.toml")
    plan_set.add_argument("--limit", type=int, help="custom monthly limit replacing the plan's")
    plan_cancel = plan.add_parser("cancel", help="back to the default plan at the next reset")
    plan_cancel.add_argument("user", help="user id or email")
    for p in (plan_set, plan_cancel):
        p.add_argument("--by", help="who is making the change (audit trail; default cli:$USER)")
        p.add_argument("--json", action="store_true")
    plan_history = plan.add_parser("history", help="the user's plan-change audit trail")
    plan_history.add_argument("user", help="user id or email")
    plan_history.add_argument("--json", action="store_true")

    route = sub.add_parser("route", help="routing: Command Email or MailChimp").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    route_set = route.add_parser("set", help="save a user's route for an app (preference)")
    route_set.add_argument("user", help="user id or email")
    route_set.add_argument("app", help="app name, e.g. campaigns")
    route_set.add_argument("route", nargs="?", help="route name (omit with --clear)")
    route_set.add_argument("--clear", action="store_true", help="forget the saved route")
    creds = route.add_parser("credentials", help="a user's own credentials for a route")
    creds.add_argument("user", help="user id or email")
    creds.add_argument("route", help="route name, e.g. mailchimp")
    creds.add_argument("--username", default="", help="SMTP user name for the route")
    creds.add_argument("--secret-stdin", action="store_true",
                       help="read the secret (e.g. the Mailchimp API key) from standard input")
    creds.add_argument("--delete", action="store_true", help="remove the saved credentials")
    explain = route.add_parser("explain", help="which rule picks which route")
    explain.add_argument("--app", required=True, help="app name (smartplans, campaigns…)")
    explain.add_argument("--user", help="user id or email (their saved preference is used)")
    explain.add_argument("--header", default="", help="the X-KW-Route value, if any")
    explain.add_argument("--preference", help="a saved preference to assume")
    explain.add_argument("--json", action="store_true")

    sub.add_parser("notifier", help="deliver events (in-app webhook and email notices)")
    events = sub.add_parser("events", help="the event stream").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    tail = events.add_parser("tail", help="the latest events")
    tail.add_argument("-n", "--count", type=int, default=20, help="how many (default 20)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    tail.add_argument("--kind", action="append", help="only this kind (repeatable)")
    tail.add_argument("--json", action="store_true", help="JSON lines")
    dead = events.add_parser("dead", help="events a channel gave up on")
    dead.add_argument("--json", action="store_true")
    retry = events.add_parser("retry", help="re-queue dead letters for the notifier")
    retry.add_argument("ids", nargs="*", help="dead-letter ids from `events dead`")
    retry.add_argument("--all", action="store_true")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    """One relay process, one worker of a supervisor, or the supervisor of N workers."""
    if args.worker:
        try:
            link = WorkerLink.from_spec(args.worker)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        tag_logs(link.index)
        eventloop.run(serve(settings, link), settings.event_loop)
        return 0
    workers = args.workers or settings.workers or os.cpu_count() or 1
    if workers == 1:
        eventloop.run(serve(settings), settings.event_loop)
        return 0
    # Refuse a bad RELAY_EVENT_LOOP here rather than in every worker.
    eventloop.loop_factory(settings.event_loop)
    return asyncio.run(Supervisor(settings, workers, config=args.config).run())


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
_ADMIN: dict[str, AdminCommand] = {"users": _users, "apps": _apps, "usage": _usage,
                                   "plan": _plan, "events": _events, "route": _route}


async def _run_admin(command: AdminCommand, args: argparse.Namespace,
                     settings: Settings) -> None:
    policies = load_policies(settings.policies_dir)
    async with redis_for(settings) as redis:
        await wait_for_redis(redis, 2)
        credentials = CredentialStore(redis, lambda: load_key(settings.credentials_key,
                                                              settings.state_dir))
        await command(args, settings, Admin(redis, policies, SystemClock(),
                                            settings.default_tz, credentials))


def _check_config(settings: Settings) -> None:
    policies = load_policies(settings.policies_dir)
    for path in (settings.tls_cert, settings.tls_key, settings.upstream_ca_file):
        if path is not None and not path.is_file():
            raise CommandError(f"file not found: {path}")
    print(f"settings OK: listen {settings.listen}, "
          f"redis {'embedded' if not settings.redis_url else 'configured'}, "
          f"upstream {settings.upstream or 'capture folder (development)'}")
    print(f"policies OK: {settings.policies_dir}: plans "
          + ", ".join(f"{p.name}={p.monthly_limit}" for p in policies.plans.values())
          + "; notify at " + ", ".join(f"{t}%" for t in policies.notifications.thresholds)
          + f"; passwords of {policies.passwords.user_min_length}+ characters for users, "
            f"{policies.passwords.app_min_length}+ for apps")
    print(f"admin API: {settings.admin_listen if settings.admin_token else 'off'}; "
          f"in-app webhook: {'on' if settings.notify_webhook_url else 'off'}")
    print(f"metrics: {settings.metrics_listen or 'off'}; "
          f"notifier metrics: {settings.notifier_metrics_listen or 'off'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "usage" and not args.user and not args.all:
        parser.error("usage: name a USER, or use --all")
    try:
        settings = load_settings(config_file=args.config)
        serving = args.command in ("serve", "notifier")
        if serving:
            configure_logging(settings.log_format, settings.log_level)
        else:
            # Admin commands print their results on stdout (one JSON document with --json),
            # so their warnings go to stderr: one readable line each next to human output,
            # JSON lines with --json (or RELAY_LOG_FORMAT=json) for a script to parse.
            machine = getattr(args, "json", False) or settings.log_format == "json"
            configure_logging("json" if machine else "line", "warning", stream=sys.stderr)
        if args.command == "serve":
            return _serve(args, settings)
        elif args.command == "notifier":
            eventloop.run(run_notifier(settings), settings.event_loop)
        elif args.command == "check-config":
            _check_config(settings)
        else:
            asyncio.run(_run_admin(_ADMIN[args.command], args, settings))
    except (SettingsError, PolicyError, AccountError, AdminError, CommandError, StartupError,
            EmbeddedRedisError, eventloop.EventLoopError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except StoreUnavailableError:
        print(f"{PROG}: error: Redis is unreachable", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`command-relay users list | head`): not an error worth a
        # traceback. Point stdout at /dev/null so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0
