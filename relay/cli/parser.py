"""The command line's grammar: every command, option and help text (argparse)."""

from __future__ import annotations

import argparse
from pathlib import Path

import structlog

log = structlog.get_logger()

PROG = "command-relay"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Command Email SMTP relay")
    parser.add_argument("--config", type=Path, help="TOML settings file (also RELAY_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = sub.add_parser("serve", help="run the SMTP relay")
    serve_parser.add_argument(
        "--workers", type=_positive_int, metavar="N",
        help="worker processes sharing the listeners (default: RELAY_WORKERS, else one per "
             "core); 1 serves in this process")
    # Internal: how the supervisor starts a worker (relay/process/supervisor.py).
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
    imports = users.add_parser(
        "import", help="create or update users from a CSV or JSON-lines file (idempotent)",
        description="One user a line: CSV with a header row, or JSON lines (docs/onboarding.md)."
                    " Exit status 0 when every line was imported, 1 when a line was refused "
                    "(the others are imported) or the import failed.")
    imports.add_argument("file", help="the file, or - for standard input")
    imports.add_argument("--format", choices=("csv", "jsonl"),
                         help="the file's format (default: by its extension, .csv or "
                              ".jsonl/.ndjson, else by its first line)")
    imports.add_argument("--dry-run", action="store_true",
                         help="check every line and report what would change; write nothing")
    imports.add_argument("--changes", action="store_true",
                         help="also list each user created or updated")
    imports.add_argument("--by", help="who is making the plan changes (audit trail; default "
                                      "cli:$USER)")
    imports.add_argument("--json", action="store_true", help="one JSON summary on stdout")

    apps = sub.add_parser("apps", help="manage application credentials").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    app_add = apps.add_parser("add", help="create an app credential (smartplans, campaigns…)")
    app_add.add_argument("name")
    app_add.add_argument("--password-stdin", action="store_true", required=True,
                         help="read the app's SMTP password from standard input")
    app_list = apps.add_parser("list", help="list app credentials")
    app_list.add_argument("--json", action="store_true")

    usage = sub.add_parser(
        "usage", help="a user's sends this month (or --all users); usage link USER: a signed "
                      "link to the user's usage page")
    usage.add_argument("user", nargs="?", help="user id or email (or: link)")
    usage.add_argument("link_user", nargs="?", metavar="USER",
                       help="after `link`: the user whose page the link opens")
    usage.add_argument("--ttl", default="24h", metavar="DURATION",
                       help="with link: how long it opens the page (90s, 30m, 12h, 7d; "
                            "default 24h, at most 31d)")
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

    suppress = sub.add_parser(
        "suppress", help="the suppression list: recipients never sent to").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    scope_help = "user id or email (default: the global list; * names it too)"
    supp_add = suppress.add_parser("add", help="suppress an address (replaces its entry)")
    supp_add.add_argument("address")
    supp_add.add_argument("--user", help=scope_help)
    supp_add.add_argument("--reason", required=True,
                          help="unsubscribe, complaint, bounce or manual")
    supp_remove = suppress.add_parser("remove", help="take an address off a list")
    supp_remove.add_argument("address")
    supp_remove.add_argument("--user", help=scope_help)
    supp_list = suppress.add_parser("list", help="the entries of a list (default: every list)")
    supp_list.add_argument("--user", help="user id or email, or * for the global list")
    supp_list.add_argument("--json", action="store_true")
    supp_import = suppress.add_parser(
        "import", help="add the entries of a CSV file (header address,scope,reason,source,time)")
    supp_import.add_argument("file", metavar="FILE", help="the CSV file, - for standard input")
    supp_import.add_argument("--json", action="store_true", help="the summary as JSON")
    supp_export = suppress.add_parser("export", help="the lists as CSV on standard output")
    supp_export.add_argument("--user", help="user id or email, or * for the global list "
                                            "(default: every list)")
    shadow = sub.add_parser("shadow", help="policies trialled in shadow").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    report = shadow.add_parser("report", help="what the candidate policies would have done "
                               "otherwise: counts by kind and app, examples")
    report.add_argument("--days", type=_positive_int, metavar="N",
                        help="the last N UTC days (default 7; with --log: every line)")
    report.add_argument("--log", metavar="FILE",
                        help="read the shadow.differs lines of a JSON log (- for standard "
                             "input) instead of the counts in Redis")
    report.add_argument("--examples", type=_positive_int, default=3, metavar="N",
                        help="examples shown per kind (default 3)")
    report.add_argument("--json", action="store_true")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value

